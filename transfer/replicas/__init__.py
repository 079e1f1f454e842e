"""One keyspace over N store replicas: members (``membership``), owners (``placement``), decisions
(``routing``), the calls as generators of effects (``ops``), repair of copies (``repair``), the one
stats merger (``stats``) and the blocking and asyncio drivers (``client``, ``aio_client``)."""
