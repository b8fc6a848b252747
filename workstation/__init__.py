"""What runs on a practice PC: ``tlsroll client test-connection`` (the seed's "Test connection",
the port check for 9443, the auth password, the workstation's settings).

It talks only to a node (https on 8443, bootstrap on 9443), never to the leader.
"""
