"""The client of one kvstore server: options and checks (``core``), every call once as a generator of
effects (``ops``), the public methods (``api``), and the blocking and asyncio drivers (``client``,
``aio_client``) that carry the effects out."""
