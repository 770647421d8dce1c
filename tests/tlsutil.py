"""Throwaway CAs and server certificates (for localhost, for other names, without names), made at test time."""

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


def makeNamedCertificates(directory: str) -> dict[str, str]:
    """Server certificates (certificate + key in one PEM) that a client of ``localhost`` must tell apart:

    - ``right``: signed by ``ca``, subjectAltName localhost and 127.0.0.1;
    - ``other``: signed by ``ca``, subjectAltName other.example only;
    - ``cn-only``: self-signed, CN=localhost and no subjectAltName (trust it with itself as --ca).
    """
    now = datetime.datetime.now(datetime.timezone.utc)
    pem = serialization.Encoding.PEM
    caKey = ec.generate_private_key(ec.SECP256R1())
    caCert = (
        x509.CertificateBuilder().subject_name(_name("tcplab names CA")).issuer_name(_name("tcplab names CA"))
        .public_key(caKey.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(caKey, hashes.SHA256())
    )
    paths = {"ca": os.path.join(directory, "names-ca.pem")}
    with open(paths["ca"], "wb") as f:
        f.write(caCert.public_bytes(pem))

    def server(label: str, common: str, names: list[x509.GeneralName] | None, selfSigned: bool = False) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder().subject_name(_name(common))
            .issuer_name(_name(common) if selfSigned else caCert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        )
        if names is not None:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(key if selfSigned else caKey, hashes.SHA256())
        paths[label] = os.path.join(directory, f"{label}.pem")
        with open(paths[label], "wb") as f:
            f.write(cert.public_bytes(pem))
            f.write(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        if selfSigned:
            paths[f"{label}-ca"] = os.path.join(directory, f"{label}-ca.pem")
            with open(paths[f"{label}-ca"], "wb") as f:
                f.write(cert.public_bytes(pem))

    server("right", "localhost", [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    server("other", "other.example", [x509.DNSName("other.example")])
    server("cn-only", "localhost", None, selfSigned=True)
    return paths
