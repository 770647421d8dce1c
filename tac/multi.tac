# twistd -n --pidfile= -y tac/multi.tac : the broadcast echo hub on port 7001 (edit the options below).
from twisted.application import service

from tcplab.multi import tap as multi

options = multi.Options()
options.parseOptions(["--port", "7001", "--send-queue", "1048576", "--max-line", "65536"])

application = service.Application("tcplab-multi")
multi.makeService(options).setServiceParent(application)
