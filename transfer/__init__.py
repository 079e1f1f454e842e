"""Client side of kvstore: the codec (tensor <-> blob) and the store client.

Kept import-light on purpose: importing ``transfer`` must not pull torch or gRPC.
"""
