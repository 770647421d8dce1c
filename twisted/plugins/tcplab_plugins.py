"""twistd plugins: one ServiceMaker per tcplab server, each pointing at its tap module."""

from twisted.application.service import ServiceMaker

tcplabEcho = ServiceMaker("tcplab-echo", "tcplab.tap.echo", "RFC 862 echo server (TCP, optional UDP)", "tcplab-echo")
tcplabMulti = ServiceMaker("tcplab-multi", "tcplab.tap.multi", "Broadcast echo hub for many clients", "tcplab-multi")
tcplabFile = ServiceMaker("tcplab-file", "tcplab.tap.file", "Verified, atomic, resumable file drop", "tcplab-file")
