"""What both Redis layouts share: the delete script and the blob key names.

The standalone tier (:mod:`kvstore.backends.redis`) and the cluster tier
(:mod:`kvstore.backends.redis_cluster`) store a blob under ``<prefix>[<tag>]<BlobKey.name()>``
and account for it in a ``#sizes``/``#lru``/``#meta`` triple; the one server keeps one triple
for the whole prefix, the cluster one per hash-tagged bucket. Deleting a blob and its
accounting is the same script for both (its four keys share a slot in cluster mode), and
listing parses names back the same way. They live here, below both, so neither layout
imports the other's privates.
"""

from __future__ import annotations

from kvstore.backends.base import BlobKey

# KEYS: data, sizes, lru, meta; ARGV: name, only_if_gone ('1': reap accounting of an expired blob)
DELETE_SCRIPT = """
if ARGV[2] == '1' and redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local existed = redis.call('DEL', KEYS[1])
local old = redis.call('HGET', KEYS[2], ARGV[1])
if old then
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[3], ARGV[1])
  redis.call('HINCRBY', KEYS[4], 'bytes', -tonumber(old))
end
return existed
"""

_GLOB_SPECIAL = "\\*?[]^"


def glob_escape(text: str) -> str:
    """``text`` as a literal in a ``SCAN MATCH`` pattern."""
    return "".join("\\" + c if c in _GLOB_SPECIAL else c for c in text)


def parse_name(name: str) -> BlobKey | None:
    """Inverse of BlobKey.name(); None for bookkeeping keys and foreign keys."""
    parts = name.rsplit("/", 2)
    if len(parts) != 3:
        return None
    namespace, chunk_hex, layer = parts
    try:
        return BlobKey(namespace, bytes.fromhex(chunk_hex), int(layer))
    except ValueError:
        return None
