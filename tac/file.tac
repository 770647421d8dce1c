# twistd -n --pidfile= -y tac/file.tac : the file drop on port 9000, storing into the current folder as
# received_<name> (edit the options below, e.g. "--dir", "/srv/drop", "--token-file", "token").
from twisted.application import service

from tcplab.file import tap as file

options = file.Options()
options.parseOptions(["--port", "9000", "--dir", ".", "--prefix", "received_"])

application = service.Application("tcplab-file")
file.makeService(options).setServiceParent(application)
