# twistd -n --pidfile= -y tac/echo.tac : the echo server on port 7000 (edit the options below).
from twisted.application import service

from tcplab.echo import tap as echo

options = echo.Options()
options.parseOptions(["--port", "7000"])

application = service.Application("tcplab-echo")
echo.makeService(options).setServiceParent(application)
