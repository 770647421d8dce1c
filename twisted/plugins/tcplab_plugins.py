"""twistd plugins: one ServiceMaker per tcplab server, each pointing at its tap module."""

from twisted.application.service import ServiceMaker

tcplabEcho = ServiceMaker("tcplab-echo", "tcplab.echo.tap", "RFC 862 echo server (TCP, optional UDP)", "tcplab-echo")
tcplabMulti = ServiceMaker("tcplab-multi", "tcplab.multi.tap", "Broadcast echo hub for many clients", "tcplab-multi")
tcplabFile = ServiceMaker("tcplab-file", "tcplab.file.tap", "Verified, atomic, resumable file drop", "tcplab-file")
