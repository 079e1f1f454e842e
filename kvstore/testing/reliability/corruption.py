"""``bitflips`` and ``disk_flips``: damage stored blobs the way a failing medium would.

:class:`TierCorruptor` flips bits in the copy one tier holds, through that tier's raw
medium (a RAM tier's dict, a disk segment's bytes, a Redis ``SETRANGE``, an S3
object rewrite): raw hooks on purpose, the way zarr's store tests bypass the store.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import grpc

from kvstore import integrity
from kvstore.backends.base import BlobKey
from kvstore.keys import KEY_BYTES
from kvstore.testing.reliability.calls import C, committed, rpc_code
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc

# ====================================================================== bit flips


class TierCorruptor:
    """Flips bits in the copy of a blob one tier holds, through that tier's raw medium."""

    def __init__(self, store: Any, redis_client: Any = None, s3_client: Any = None) -> None:
        self.store = store
        self.redis = redis_client
        self.s3 = s3_client
        self._s3_originals: dict[str, bytes] = {}

    def names(self) -> list[str]:
        return [t.name for t in self.store.tiers]

    def flip(self, tier_name: str, key: BlobKey, rng: random.Random) -> bool:
        """Flip 1-3 bits of ``key``'s copy in the tier; False if the tier holds no copy."""
        tier = self.store.tier(tier_name)
        return getattr(self, f"_flip_{tier_name}")(tier, key, rng)

    def restore(self, tier_name: str, key: BlobKey, blob: bytes) -> None:
        """Put the intact ``blob`` back into the tier (an S3 object: its bytes before the flip)."""
        tier = self.store.tier(tier_name)
        if tier_name == "s3":
            obj = self._s3_object(tier, key)
            original = self._s3_originals.pop(obj, None)
            if original is not None:  # one PUT instead of the backend's read-modify-write
                self.s3.put_object(Bucket=tier.bucket, Key=obj, Body=original)
                return
        tier.put(key, blob)

    @staticmethod
    def _s3_object(tier: Any, key: BlobKey) -> str:
        return f"{tier.prefix}{key.namespace}/{key.chunk.hex()}"

    @staticmethod
    def _mutate(data: bytes, rng: random.Random) -> bytes:
        out = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
        if bytes(out) == data:  # two flips cancelled: flip once more
            out[0] ^= 1
        return bytes(out)

    def _flip_memory(self, tier: Any, key: BlobKey, rng: random.Random) -> bool:
        with tier._lock:  # raw hook: the RAM tier has no medium but its dict
            blob = tier._blobs.get(key)
            if blob is None:
                return False
            tier._blobs[key] = self._mutate(blob, rng)
        return True

    def _flip_disk(self, tier: Any, key: BlobKey, rng: random.Random) -> bool:
        where = tier.locate(key)
        if where is None:
            return False
        path, offset, length = where
        fd = os.open(path, os.O_RDWR)
        try:
            data = os.pread(fd, length, offset)
            os.pwrite(fd, self._mutate(data, rng), offset)
        finally:
            os.close(fd)
        return True

    def _flip_redis(self, tier: Any, key: BlobKey, rng: random.Random) -> bool:
        name = tier.key_prefix + key.name()
        blob = self.redis.get(name)
        if blob is None:
            return False
        pos = rng.randrange(len(blob))
        self.redis.setrange(name, pos, bytes([blob[pos] ^ (1 << rng.randrange(8))]))
        return True

    def _flip_s3(self, tier: Any, key: BlobKey, rng: random.Random) -> bool:
        from kvstore.backends.s3 import CorruptObject, parse_header

        obj = self._s3_object(tier, key)
        try:
            data = self.s3.get_object(Bucket=tier.bucket, Key=obj)["Body"].read()
        except (self.s3.exceptions.NoSuchKey, self.s3.exceptions.NoSuchBucket):
            return False
        try:
            parsed = parse_header(data)
        except CorruptObject:  # already damaged by an earlier flip in its header
            return False
        if isinstance(parsed, int) or key.layer not in parsed[0]:
            return False
        start, length = parsed[0][key.layer]
        out = bytearray(data)
        # Mostly the layer's blob, sometimes the object's own header/index.
        pos = rng.randrange(parsed[1]) if rng.random() < 0.1 else start + rng.randrange(length)
        out[pos] ^= 1 << rng.randrange(8)
        self._s3_originals.setdefault(obj, data)
        self.s3.put_object(Bucket=tier.bucket, Key=obj, Body=bytes(out))
        return True


@dataclass
class FlipReport:
    flips: int = 0
    reads: int = 0
    corrupt_served: int = 0
    repaired: int = 0  # correct bytes served although a faster tier held a corrupt copy
    lost: int = 0  # DATA_LOSS or NOT_FOUND: every copy was corrupt
    unavailable_after_repair: int = 0  # an intact lower copy existed but was not served
    other_status: Counter[str] = field(default_factory=Counter)
    by_tier: Counter[str] = field(default_factory=Counter)
    baseline_reads: int = 0
    baseline_wrong: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "flips": self.flips,
            "reads": self.reads,
            "corrupt_served": self.corrupt_served,
            "repaired": self.repaired,
            "lost": self.lost,
            "unrepaired_with_intact_copy": self.unavailable_after_repair,
            "other_status": dict(self.other_status),
            "flips_by_tier": dict(self.by_tier),
            "baseline_reads": self.baseline_reads,
            "baseline_wrong": self.baseline_wrong,
        }


def run_bitflips(
    target: str,
    store: Any,
    corruptor: TierCorruptor,
    flips: int,
    *,
    seed: int = 0,
    namespace: str = "flips/model/profile",
    num_keys: int = 64,
    num_layers: int = 2,
    blob_bytes: int = 2048,
    batch: int = 32,
    all_copies_p: float = 0.25,
    tier_weights: dict[str, float] | None = None,
) -> FlipReport:
    """Store blobs in every tier, corrupt copies at random, read each back over gRPC.

    Each round picks ``batch`` chunks and one layer of each; for each, a tier T
    (drawn with ``tier_weights``; S3 requests cost ~50 ms on moto, so it is drawn
    less often by default) gets 1-3 bit flips and the copies in the tiers faster
    than T are removed, so the read reaches T. With probability ``all_copies_p``
    every copy from T down is corrupted too, so nothing intact is left. Then each
    blob is read with its own Get, and every touched tier is restored directly.
    """
    rng = random.Random(seed)
    report = FlipReport()
    tiers = corruptor.names()
    weights = {"s3": 0.4, **(tier_weights or {})}
    tier_w = [weights.get(t, 1.0) for t in tiers]
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.KVStoreStub(channel)
        chunks = [os.urandom(KEY_BYTES) for _ in range(num_keys)]
        truth = {
            (c, layer): integrity.seal(os.urandom(blob_bytes)) for c in chunks for layer in range(num_layers)
        }

        def read(c: bytes, layer: int) -> tuple[grpc.StatusCode, bytes | None]:
            code, _, got = rpc_code(
                lambda: list(
                    stub.Get(
                        pb.GetRequest(namespace=namespace, keys=[c], layer_start=layer, layer_end=layer + 1),
                        timeout=30,
                    )
                )
            )
            return code, (got[0].blob if got else None)

        stub.Put(
            committed(
                [
                    pb.PutRequest(namespace=namespace, key=c, layer=layer, num_layers=num_layers, blob=b)
                    for (c, layer), b in truth.items()
                ]
            ),
            timeout=60,
        )
        for c, layer in rng.sample(list(truth), min(len(truth), 64)):  # baseline: no flips
            code, blob = read(c, layer)
            report.baseline_reads += 1
            report.baseline_wrong += int(code is not C.OK or blob != truth[(c, layer)])

        while report.flips < flips:
            # One layer per chunk and round: an S3 object packs every layer of its chunk,
            # so a flip in its header must not spill into another pick's expectations.
            picked = [(c, rng.randrange(num_layers)) for c in rng.sample(chunks, min(batch, len(chunks)))]
            plan: list[tuple[BlobKey, bool, list[str]]] = []  # key, intact copy left below?, touched tiers
            for c, layer in picked:
                key = BlobKey(namespace, c, layer)
                level = rng.choices(range(len(tiers)), tier_w)[0]
                for upper in tiers[:level]:
                    store.tier(upper).delete(key)
                spread = tiers[level:] if rng.random() < all_copies_p else [tiers[level]]
                for name in spread:
                    if corruptor.flip(name, key, rng):
                        report.flips += 1
                        report.by_tier[name] += 1
                intact_below = any(store.tier(t).exists(key) for t in tiers[level:] if t not in spread)
                plan.append((key, intact_below, tiers[:level] + spread))
            for key, intact_below, _ in plan:
                code, blob = read(key.chunk, key.layer)
                report.reads += 1
                if code is C.OK:
                    if blob != truth[(key.chunk, key.layer)]:
                        report.corrupt_served += 1
                    elif intact_below:
                        report.repaired += 1
                elif code in (C.DATA_LOSS, C.NOT_FOUND):
                    report.lost += 1
                    report.unavailable_after_repair += int(intact_below)
                else:
                    report.other_status[code.name] += 1
            for key, _, touched in plan:
                for name in touched:
                    corruptor.restore(name, key, truth[(key.chunk, key.layer)])
    return report


# ====================================================================== disk recovery after bit flips

#: Where in a disk record a flip lands: (part, offset from the record start, or from the payload).
RECORD_PARTS = (
    "magic",
    "version",
    "kind",
    "name_length",
    "length",
    "payload_checksum",
    "key",
    "header_checksum",
    "payload",
)


def run_disk_flips(
    trials: int, *, seed: int = 0, records: int = 40, blob_bytes: int = 3072
) -> dict[str, Any]:
    """Flip one bit in one record of a disk tier, restart it, count what was lost.

    Each trial writes ``records`` blobs over several segments, flips one random bit in one
    part of one random record (parts cycle through magic, version, kind, name length, length,
    payload checksum, key, header checksum and payload; the record is drawn from a sealed
    segment or from the newest one in turn), reopens the tier and reads everything back
    through a TieredStore (which checks every blob's checksum trailer). ``lost`` counts
    records not served intact besides the flipped one: the goal is 0 (before resync, a header
    flip lost every later record of its segment).
    """
    from kvstore.backends.disk import _FIXED, _SUM, DiskBackend
    from kvstore.backends.tiered import TieredStore
    from kvstore.errors import IntegrityError

    rng = random.Random(seed)
    namespace = "flip/model/profile"
    by_part: dict[str, Counter[str]] = {p: Counter() for p in RECORD_PARTS}
    lost_per_flip: list[int] = []
    wrong_served = 0
    for trial in range(trials):
        part = RECORD_PARTS[trial % len(RECORD_PARTS)]
        where = "sealed" if (trial // len(RECORD_PARTS)) % 2 == 0 else "newest"
        with tempfile.TemporaryDirectory(prefix="kvstore-diskflip-") as tmp:
            disk = DiskBackend(tmp, max_bytes=0, fsync="never", segment_bytes=16 * blob_bytes)
            keys = [BlobKey(namespace, rng.randbytes(KEY_BYTES), 0) for _ in range(records)]
            blobs = [integrity.seal(rng.randbytes(blob_bytes)) for _ in range(records)]
            disk.put_many(list(zip(keys, blobs, strict=True)))
            places = [disk.locate(k) for k in keys]
            segments = sorted({p[0] for p in places if p is not None})
            seg = segments[0] if where == "sealed" else segments[-1]
            victim = rng.choice([i for i, p in enumerate(places) if p is not None and p[0] == seg])
            path, payload_at, length = places[victim]
            name_len = len(keys[victim].name().encode())
            start = payload_at - (_FIXED.size + name_len + _SUM.size)
            span = {
                "magic": (start, 4),
                "version": (start + 4, 1),
                "kind": (start + 5, 1),
                "name_length": (start + 6, 2),
                "length": (start + 8, 8),
                "payload_checksum": (start + 16, 8),
                "key": (start + _FIXED.size, name_len),
                "header_checksum": (start + _FIXED.size + name_len, 8),
                "payload": (payload_at, length),
            }[part]
            disk.close()
            at = span[0] + rng.randrange(span[1])
            with open(path, "r+b") as f:
                f.seek(at)
                byte = f.read(1)[0]
                f.seek(at)
                f.write(bytes([byte ^ (1 << rng.randrange(8))]))
            disk = DiskBackend(tmp, max_bytes=0, fsync="never", segment_bytes=16 * blob_bytes)
            store = TieredStore([disk])
            lost = 0
            for i, (k, b) in enumerate(zip(keys, blobs, strict=True)):
                try:
                    got = store.get(k)
                except IntegrityError:
                    got = None
                if i == victim:
                    wrong_served += int(got is not None and got != b)
                    continue
                if got != b:
                    lost += 1
                    wrong_served += int(got is not None)
            by_part[part]["flips"] += 1
            by_part[part]["others_lost"] += lost
            by_part[part]["counted"] += disk.counters.corrupt_records + disk.counters.integrity_failures
            lost_per_flip.append(lost)
            disk.close()
    return {
        "flips": trials,
        "records_per_trial": records,
        "other_records_lost_total": sum(lost_per_flip),
        "other_records_lost_max_per_flip": max(lost_per_flip, default=0),
        "wrong_bytes_served": wrong_served,
        "by_part": {p: dict(c) for p, c in by_part.items()},
    }
