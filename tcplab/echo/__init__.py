"""Task 1: the RFC 862 echo server (TCP and UDP), its client and its twistd glue."""
