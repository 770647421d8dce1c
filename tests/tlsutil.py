"""A throwaway CA and a server certificate for 127.0.0.1/localhost, made at test time."""

from __future__ import annotations

import datetime
import ipaddress
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def makeCertificates(directory: str, rsaServer: bool = False) -> dict[str, str]:
    """Write ca.pem, server.pem (certificate + key) and other-ca.pem; return their paths.

    The server key is ECDSA P-256, or RSA 2048 with ``rsaServer`` (which plain-RSA key exchange needs)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    paths: dict[str, str] = {}

    def ca(label: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder().subject_name(_name(label)).issuer_name(_name(label))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        return key, cert

    caKey, caCert = ca("tcplab test CA")
    _, otherCert = ca("some other CA")
    serverKey: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey = (
        rsa.generate_private_key(65537, 2048) if rsaServer else ec.generate_private_key(ec.SECP256R1()))
    serverCert = (
        x509.CertificateBuilder().subject_name(_name("localhost")).issuer_name(caCert.subject)
        .public_key(serverKey.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(caKey, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    for label, cert in (("ca", caCert), ("other-ca", otherCert)):
        paths[label] = os.path.join(directory, f"{label}.pem")
        with open(paths[label], "wb") as f:
            f.write(cert.public_bytes(pem))
    paths["server"] = os.path.join(directory, "server.pem")
    with open(paths["server"], "wb") as f:
        f.write(serverCert.public_bytes(pem))
        f.write(serverKey.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return paths
