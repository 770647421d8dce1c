"""Peer servers the bench compares tcplab with, each a stand-alone script taking its port as argv[1]."""
