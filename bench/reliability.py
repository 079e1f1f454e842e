"""Reliability of a real kvstore server under faults, fuzzing and load.

Each workload is a function here, shared with the test suite (tests/integration/
test_fuzz.py, test_bitflips.py, test_crash_restart.py, test_concurrency.py,
test_backend_kill_under_load.py run the same code at a small size), so the
figures below and the assertions of the suite measure the same thing:

* ``fuzz``: malformed and oversize requests (bad namespaces, keys, layer numbers,
  blobs, foreign tenants, bad tokens, oversize messages, random and mutated raw
  bytes sent through a generic channel) against ``kvstore serve`` as a child
  process. Counted: crashes, statuses outside the precise set each case allows
  (UNKNOWN/INTERNAL are never allowed). Baseline: valid requests before and after.
* ``bitflips``: bit flips at random positions in blobs stored in every tier (RAM
  internals, disk segment bytes, Redis ``SETRANGE``, S3 object rewrite), then a
  gRPC Get. Counted: corrupt blocks served (must be 0), repaired reads (an intact
  copy in a lower tier was served), reads lost (DATA_LOSS / NOT_FOUND).
  Baseline: the same reads with no flips.
* ``crash``: Puts acknowledged by a child server with the disk tier, SIGKILL
  mid-load, restart on the same directory: acknowledged blocks lost (must be 0)
  and deleted blocks resurrected, per fsync policy.
* ``concurrency``: N clients (transfer.client.KVClient) putting and reading back
  for S seconds: errors, wrong bytes, throughput and p50/p99 latency; baseline 1
  client.
* ``starvation``: one tenant stalls 10x the worker count of streams (Puts that
  stop sending, Gets never read) while another keeps calling: streams held and
  refused, the other tenant's latency and failures against its own baseline
  before the stall, how the stalled streams ended, partial Puts stored (must be 0).
* ``backend_kill``: Redis and S3 killed and restarted while clients read and
  write through a server with a tiny RAM tier: answers that are neither correct
  bytes nor a miss (must be 0), server health, tiers serving again afterwards.

Prints one JSON document, then a one-line summary. ``--quick`` runs everything
reduced in under a minute.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from google.protobuf.message import DecodeError  # noqa: E402

from kvstore import integrity  # noqa: E402
from kvstore.auth import bearer_metadata  # noqa: E402
from kvstore.backends.base import BlobKey  # noqa: E402
from kvstore.keys import KEY_BYTES  # noqa: E402
from kvstore.v1 import kvstore_pb2 as pb  # noqa: E402
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc  # noqa: E402

SERVICE = "/kvstore.v1.KVStore/"
C = grpc.StatusCode
#: Statuses a server chooses on purpose. UNKNOWN, INTERNAL (a bug or an unhandled
#: exception), UNAVAILABLE and DEADLINE_EXCEEDED (server down or hung) never count as precise.
PRECISE = frozenset(
    {
        C.OK,
        C.INVALID_ARGUMENT,
        C.NOT_FOUND,
        C.RESOURCE_EXHAUSTED,
        C.DATA_LOSS,
        C.PERMISSION_DENIED,
        C.UNAUTHENTICATED,
    }
)


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def rpc_code(fn: Callable[[], Any]) -> tuple[grpc.StatusCode, str, Any]:
    """Run one call; (status, details, result) instead of an exception."""
    try:
        result = fn()
        return C.OK, "", result
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or "", None


# ====================================================================== fuzz


@dataclass(frozen=True)
class Limits:
    """The server limits the fuzzer aims just past."""

    max_blob_bytes: int = 256 * 1024
    max_message_bytes: int = 320 * 1024
    max_keys_per_request: int = 256
    max_layers: int = 64


@dataclass
class Case:
    label: str
    method: str  # Lookup Put Get Delete Stats
    request: Any  # a message, a list of messages (Put), or raw bytes
    expect: frozenset[grpc.StatusCode]
    metadata: tuple[tuple[str, str], ...] | None = None  # None: the valid token's


_REQUEST_TYPES = {
    "Lookup": pb.LookupRequest,
    "Put": pb.PutRequest,
    "Get": pb.GetRequest,
    "Delete": pb.DeleteRequest,
    "Stats": pb.StatsRequest,
}
_BAD_NAMESPACES = [
    "",
    "a",
    "a/b",
    "a/b/c/d",
    "/m/p",
    "t//p",
    "t/m/",
    "../../etc/passwd",
    "t/m/p\x00",
    "tén/m/p",
    "t m/m/p",
    "t/m/p\n",
    "*/*/*",
    "t/m/" + "p" * 65,
    "t" * 65 + "/m/p",
    "t/" + "m" * 129 + "/p",
    "t\\m\\p",
    "%2e%2e/m/p",
]


def _bad_namespace(rng: random.Random) -> str:
    if rng.random() < 0.6:
        return rng.choice(_BAD_NAMESPACES)
    alphabet = "ab/\x00\xff \t.:-_%*?\u2603\ud7ff"
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
    return (
        text if text.count("/") != 2 or any(c in text for c in " \x00\xff\t%*?\u2603\ud7ff") else text + "/"
    )


def _bad_key(rng: random.Random) -> bytes:
    length = rng.choice([0, 1, 16, 31, 33, 64, 1000, rng.randint(0, 200)])
    if length == KEY_BYTES:
        length += 1
    return rng.randbytes(length)


def _huge(rng: random.Random, floor: int) -> int:
    top = (1 << 32) - 1
    return min(
        top, rng.choice([floor, floor + 1, rng.randint(floor, max(floor, 1 << 20)), (1 << 31) - 1, top])
    )


class FuzzGenerator:
    """Malformed, oversize and hostile requests, each with the statuses it may get.

    ``namespace`` belongs to the fuzzing tenant; ``foreign`` to another tenant;
    ``stored`` are (key, num_layers) chunks present in ``namespace``.
    """

    def __init__(
        self,
        rng: random.Random,
        limits: Limits,
        namespace: str,
        foreign: str | None,
        stored: Sequence[tuple[bytes, int]],
        auth: bool,
    ) -> None:
        self.rng = rng
        self.limits = limits
        self.ns = namespace
        self.foreign = foreign
        self.stored = list(stored)
        self.auth = auth
        self.makers: list[Callable[[], Case]] = [
            self.lookup_bad_namespace,
            self.lookup_bad_keys,
            self.lookup_layers,
            self.lookup_too_many_keys,
            self.put_bad_blob,
            self.put_bad_layer,
            self.put_bad_key,
            self.put_oversize_blob,
            self.put_oversize_message,
            self.put_empty,
            self.put_poisoned_stream,
            self.get_bad_range,
            self.get_missing,
            self.get_present,
            self.get_no_keys,
            self.delete_bad,
            self.raw_random,
            self.raw_mutated,
            self.unknown_fields,
        ]
        if foreign:
            self.makers.append(self.foreign_namespace)
        if auth:
            self.makers.append(self.bad_token)

    def __iter__(self) -> Iterator[Case]:
        # An oversize message costs the transport ~0.2 s to refuse; keep it rarer than the rest.
        weights = [0.15 if m == self.put_oversize_message else 1.0 for m in self.makers]
        while True:
            yield self.rng.choices(self.makers, weights)[0]()

    # -- helpers
    def key(self) -> bytes:
        return self.rng.randbytes(KEY_BYTES)

    def blob(self, nbytes: int | None = None) -> bytes:
        return integrity.seal(self.rng.randbytes(self.rng.randint(0, 4096) if nbytes is None else nbytes))

    def put(self, **fields: Any) -> pb.PutRequest:
        base = {"namespace": self.ns, "key": self.key(), "layer": 0, "num_layers": 1, "blob": self.blob(64)}
        base.update(fields)
        return pb.PutRequest(**base)

    # -- cases
    def lookup_bad_namespace(self) -> Case:
        req = pb.LookupRequest(namespace=_bad_namespace(self.rng), keys=[self.key()], num_layers=1)
        return Case("lookup_bad_namespace", "Lookup", req, frozenset({C.INVALID_ARGUMENT}))

    def lookup_bad_keys(self) -> Case:
        keys = [self.key() for _ in range(self.rng.randint(0, 5))]
        keys.insert(self.rng.randint(0, len(keys)), _bad_key(self.rng))
        req = pb.LookupRequest(namespace=self.ns, keys=keys, num_layers=1)
        return Case("lookup_bad_keys", "Lookup", req, frozenset({C.INVALID_ARGUMENT}))

    def lookup_layers(self) -> Case:
        n = self.rng.choice([0, _huge(self.rng, self.limits.max_layers + 1)])
        req = pb.LookupRequest(namespace=self.ns, keys=[self.key()], num_layers=n)
        return Case("lookup_bad_num_layers", "Lookup", req, frozenset({C.INVALID_ARGUMENT}))

    def lookup_too_many_keys(self) -> Case:
        n = self.limits.max_keys_per_request + self.rng.randint(1, 64)
        req = pb.LookupRequest(namespace=self.ns, keys=[self.key() for _ in range(n)], num_layers=1)
        return Case(
            "lookup_too_many_keys", "Lookup", req, frozenset({C.INVALID_ARGUMENT, C.RESOURCE_EXHAUSTED})
        )

    def put_bad_blob(self) -> Case:
        blob = self.rng.randbytes(self.rng.choice([0, 1, 7, 8, 9, self.rng.randint(10, 4096)]))
        if integrity.is_intact(blob):  # astronomically unlikely; keep the expectation exact
            blob = blob[:-1] + bytes([blob[-1] ^ 1])
        return Case(
            "put_bad_checksum", "Put", [self.put(blob=blob)], frozenset({C.DATA_LOSS, C.INVALID_ARGUMENT})
        )

    def put_bad_layer(self) -> Case:
        rng = self.rng
        num_layers = rng.choice(
            [0, rng.randint(1, self.limits.max_layers), _huge(rng, self.limits.max_layers + 1)]
        )
        layer = rng.choice([num_layers, _huge(rng, max(num_layers, 1))])
        req = self.put(layer=layer, num_layers=num_layers)
        return Case("put_bad_layer", "Put", [req], frozenset({C.INVALID_ARGUMENT}))

    def put_bad_key(self) -> Case:
        return Case("put_bad_key", "Put", [self.put(key=_bad_key(self.rng))], frozenset({C.INVALID_ARGUMENT}))

    def put_oversize_blob(self) -> Case:
        size = self.limits.max_blob_bytes + self.rng.randint(1, 32 * 1024)
        req = self.put(blob=integrity.seal(bytes(size - integrity.TRAILER_BYTES)))
        return Case("put_oversize_blob", "Put", [req], frozenset({C.RESOURCE_EXHAUSTED}))

    def put_oversize_message(self) -> Case:
        size = self.limits.max_message_bytes + self.rng.randint(1, 64 * 1024)
        req = self.put(blob=bytes(size))
        return Case("put_oversize_message", "Put", [req], frozenset({C.RESOURCE_EXHAUSTED}))

    def put_empty(self) -> Case:
        return Case("put_empty_stream", "Put", [], frozenset({C.INVALID_ARGUMENT}))

    def put_poisoned_stream(self) -> Case:
        good = [self.put(layer=i, num_layers=4) for i in range(self.rng.randint(1, 4))]
        bad = self.rng.choice([self.put_bad_blob, self.put_bad_key, self.put_bad_layer])().request[0]
        good.insert(self.rng.randint(0, len(good)), bad)
        return Case("put_poisoned_stream", "Put", good, frozenset({C.DATA_LOSS, C.INVALID_ARGUMENT}))

    def get_bad_range(self) -> Case:
        rng = self.rng
        start = rng.choice([0, rng.randint(0, 100), (1 << 32) - 1])
        end = rng.choice([start, max(0, start - rng.randint(1, 5)), _huge(rng, self.limits.max_layers + 1)])
        if end > start and end <= self.limits.max_layers:
            end = self.limits.max_layers + 1
        req = pb.GetRequest(namespace=self.ns, keys=[self.key()], layer_start=start, layer_end=end)
        return Case("get_bad_layer_range", "Get", req, frozenset({C.INVALID_ARGUMENT}))

    def get_missing(self) -> Case:
        req = pb.GetRequest(namespace=self.ns, keys=[self.key()], layer_start=0, layer_end=1)
        return Case("get_missing", "Get", req, frozenset({C.NOT_FOUND}))

    def get_present(self) -> Case:
        key, num_layers = self.rng.choice(self.stored)
        end = self.rng.randint(1, self.limits.max_layers)
        req = pb.GetRequest(
            namespace=self.ns, keys=[key], layer_start=self.rng.randint(0, end - 1), layer_end=end
        )
        return Case(
            "get_present_any_range",
            "Get",
            req,
            frozenset({C.OK} if end <= num_layers else {C.OK, C.NOT_FOUND}),
        )

    def get_no_keys(self) -> Case:
        req = pb.GetRequest(namespace=self.ns, keys=[], layer_start=0, layer_end=1)
        return Case("get_no_keys", "Get", req, frozenset({C.INVALID_ARGUMENT}))

    def delete_bad(self) -> Case:
        if self.rng.random() < 0.5:
            req = pb.DeleteRequest(namespace=_bad_namespace(self.rng), keys=[self.key()])
        else:
            req = pb.DeleteRequest(namespace=self.ns, keys=[self.key(), _bad_key(self.rng)])
        return Case("delete_bad", "Delete", req, frozenset({C.INVALID_ARGUMENT}))

    def foreign_namespace(self) -> Case:
        method = self.rng.choice(["Lookup", "Put", "Get", "Delete"])
        key = self.key()
        req: Any = {
            "Lookup": lambda: pb.LookupRequest(namespace=self.foreign, keys=[key], num_layers=1),
            "Put": lambda: [self.put(namespace=self.foreign, key=key)],
            "Get": lambda: pb.GetRequest(namespace=self.foreign, keys=[key], layer_start=0, layer_end=1),
            "Delete": lambda: pb.DeleteRequest(namespace=self.foreign, keys=[key]),
        }[method]()
        return Case(f"foreign_tenant_{method.lower()}", method, req, frozenset({C.PERMISSION_DENIED}))

    def bad_token(self) -> Case:
        rng = self.rng
        metadata: tuple[tuple[str, str], ...] = rng.choice(
            [
                (),
                (("authorization", "Bearer " + rng.randbytes(16).hex()),),
                (("authorization", "Basic " + rng.randbytes(8).hex()),),
                (("authorization", "Bearer"),),
                (("authorization", "bearer  "),),
                (("x-other", "Bearer nothing"),),
            ]
        )
        if rng.random() < 0.5:
            method, req = "Lookup", pb.LookupRequest(namespace=self.ns, keys=[self.key()], num_layers=1)
        else:
            method, req = "Stats", pb.StatsRequest()
        return Case("bad_token", method, req, frozenset({C.UNAUTHENTICATED}), metadata)

    def raw_random(self) -> Case:
        method = self.rng.choice(list(_REQUEST_TYPES))
        raw = self.rng.randbytes(self.rng.choice([1, 2, 5, 17, self.rng.randint(1, 2048)]))
        return self._raw_case("raw_random_bytes", method, raw)

    def raw_mutated(self) -> Case:
        rng = self.rng
        method = rng.choice(["Lookup", "Put", "Get", "Delete"])
        msg = {
            "Lookup": lambda: pb.LookupRequest(namespace=self.ns, keys=[self.key()], num_layers=2),
            "Put": lambda: self.put(),
            "Get": lambda: pb.GetRequest(namespace=self.ns, keys=[self.key()], layer_start=0, layer_end=1),
            "Delete": lambda: pb.DeleteRequest(namespace=self.ns, keys=[self.key()]),
        }[method]()
        raw = bytearray(msg.SerializeToString())
        for _ in range(rng.randint(1, 4)):
            op = rng.randrange(3)
            if op == 0 and raw:
                raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
            elif op == 1 and raw:
                del raw[rng.randrange(len(raw)) :]
            else:
                raw += rng.randbytes(rng.randint(1, 16))
        return self._raw_case("raw_mutated_message", method, bytes(raw))

    def unknown_fields(self) -> Case:
        # Valid messages followed by fields this version does not know: must be ignored.
        msg = pb.LookupRequest(namespace=self.ns, keys=[self.key()], num_layers=1).SerializeToString()
        tag = self.rng.randint(100, 10_000) << 3 | 2
        extra = _varint(tag) + _varint(5) + b"hello"
        return Case("unknown_fields", "Lookup", msg + extra, frozenset({C.OK}))

    def _raw_case(self, label: str, method: str, raw: bytes) -> Case:
        try:
            _REQUEST_TYPES[method].FromString(raw)
            expect = PRECISE  # parses: any deliberate answer is fine
        except DecodeError:
            expect = frozenset({C.INVALID_ARGUMENT})
        return Case(label, method, raw if method != "Put" else [raw], expect)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def committed(requests: Any) -> Iterator[Any]:
    """A Put request stream ended by its commit message (the server stores nothing without it)."""
    yield from requests
    yield pb.PutRequest(commit=True)


#: The commit message as bytes, appended to every raw Put stream the fuzzer sends.
COMMIT_BYTES = pb.PutRequest(commit=True).SerializeToString()


class RawCaller:
    """Calls every method with either messages or raw bytes (identity serializers)."""

    def __init__(self, channel: grpc.Channel, token: str | None) -> None:
        self.metadata = tuple(bearer_metadata(token)) if token else ()
        ident = {"request_serializer": None, "response_deserializer": None}
        self.raw = {
            "Lookup": channel.unary_unary(SERVICE + "Lookup", **ident),
            "Delete": channel.unary_unary(SERVICE + "Delete", **ident),
            "Stats": channel.unary_unary(SERVICE + "Stats", **ident),
            "Get": channel.unary_stream(SERVICE + "Get", **ident),
            "Put": channel.stream_unary(SERVICE + "Put", **ident),
        }

    def call(self, case: Case, timeout_s: float = 10.0) -> tuple[grpc.StatusCode, str]:
        fn = self.raw[case.method]
        md = self.metadata if case.metadata is None else case.metadata

        def encode(msg: Any) -> bytes:
            return msg if isinstance(msg, bytes) else msg.SerializeToString()

        if case.method == "Put":
            body: Any = iter([*(encode(m) for m in case.request), COMMIT_BYTES])
            run: Callable[[], Any] = lambda: fn(body, timeout=timeout_s, metadata=md)  # noqa: E731
        elif case.method == "Get":
            run = lambda: list(fn(encode(case.request), timeout=timeout_s, metadata=md))  # noqa: E731
        else:
            run = lambda: fn(encode(case.request), timeout=timeout_s, metadata=md)  # noqa: E731
        code, details, _ = rpc_code(run)
        return code, details


def roundtrip_ok(target: str, namespace: str, token: str | None, credentials: Any = None) -> bool:
    """A valid Put then Get of a fresh blob answers OK with the same bytes."""
    channel = grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
    with channel:
        stub = pb_grpc.KVStoreStub(channel)
        md = bearer_metadata(token) if token else None
        key, blob = os.urandom(KEY_BYTES), integrity.seal(os.urandom(1000))
        try:
            stub.Put(
                committed([pb.PutRequest(namespace=namespace, key=key, layer=0, num_layers=1, blob=blob)]),
                timeout=10,
                metadata=md,
            )
            got = list(
                stub.Get(
                    pb.GetRequest(namespace=namespace, keys=[key], layer_start=0, layer_end=1),
                    timeout=10,
                    metadata=md,
                )
            )
        except grpc.RpcError:
            return False
        return len(got) == 1 and got[0].blob == blob


def seed_chunks(
    target: str, namespace: str, token: str | None, count: int = 8, num_layers: int = 4
) -> list[tuple[bytes, int]]:
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.KVStoreStub(channel)
        out = []
        for _ in range(count):
            key = os.urandom(KEY_BYTES)
            reqs = [
                pb.PutRequest(
                    namespace=namespace,
                    key=key,
                    layer=i,
                    num_layers=num_layers,
                    blob=integrity.seal(os.urandom(512)),
                )
                for i in range(num_layers)
            ]
            stub.Put(committed(reqs), timeout=10, metadata=bearer_metadata(token) if token else None)
            out.append((key, num_layers))
        return out


def run_fuzz(
    target: str,
    n: int,
    *,
    seed: int = 0,
    token: str | None = None,
    limits: Limits = Limits(),
    namespace: str = "fuzz/model/profile",
    foreign: str | None = "other/model/profile",
    alive: Callable[[], bool] = lambda: True,
) -> dict[str, Any]:
    """Send ``n`` fuzz cases; returns counts, violations and whether the server survived."""
    rng = random.Random(seed)
    stored = seed_chunks(target, namespace, token)
    baseline_ok = roundtrip_ok(target, namespace, token)
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    by_code: Counter[str] = Counter()
    by_label: Counter[str] = Counter()
    violations: list[dict[str, str]] = []
    violation_kinds: Counter[str] = Counter()
    timing: Counter[str] = Counter()
    started = time.perf_counter()
    with grpc.insecure_channel(target, options=options) as channel:
        caller = RawCaller(channel, token)
        gen = iter(FuzzGenerator(rng, limits, namespace, foreign, stored, auth=token is not None))
        for _ in range(n):
            case = next(gen)
            t0 = time.perf_counter()
            code, details = caller.call(case)
            timing[case.label] += time.perf_counter() - t0
            by_code[code.name] += 1
            by_label[case.label] += 1
            if code not in case.expect:
                violation_kinds[f"{case.label} {case.method} -> {code.name}"] += 1
                if len(violations) < 10:
                    violations.append(
                        {
                            "case": case.label,
                            "method": case.method,
                            "code": code.name,
                            "expected": ",".join(sorted(c.name for c in case.expect)),
                            "details": details[:200],
                        }
                    )
    elapsed = time.perf_counter() - started
    survived = alive()
    return {
        "requests": n,
        "seconds": round(elapsed, 2),
        "requests_per_s": round(n / elapsed, 1) if elapsed else 0.0,
        "violations": sum(violation_kinds.values()),
        "violations_by_kind": dict(violation_kinds),
        "crashed": not survived,
        "by_code": dict(by_code),
        "by_case": dict(by_label),
        "ms_per_case": {k: round(v / by_label[k] * 1e3, 2) for k, v in timing.items()},
        "examples": violations,
        "baseline_roundtrip_ok_before": baseline_ok,
        "roundtrip_ok_after": survived and roundtrip_ok(target, namespace, token),
    }


def fuzz_server_args(workdir: Path, limits: Limits, token: str, tenant: str) -> list[str]:
    """``kvstore serve`` flags (via a config file) for a fuzz target with ``limits`` and auth on."""
    import yaml

    config = {
        "server": {
            "max_blob_bytes": limits.max_blob_bytes,
            "max_message_bytes": limits.max_message_bytes,
            "max_keys_per_request": limits.max_keys_per_request,
            "max_layers": limits.max_layers,
            "workers": 8,
            "max_put_stream_bytes": limits.max_message_bytes * 4,
        },
        "memory": {"max_bytes": 64 << 20},
        "disk": {"enabled": True, "path": str(workdir / "disk"), "fsync": "never"},
        "auth": {"tokens": {token: tenant, "other-token": "other"}},
    }
    path = workdir / "fuzz.yaml"
    path.write_text(yaml.safe_dump(config))
    return ["--config", str(path), "--log-level", "WARNING"]


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


# ====================================================================== crash + restart


def _put_chunk(
    stub: Any, namespace: str, key: bytes, blobs: Sequence[bytes], timeout_s: float = 10.0
) -> None:
    stub.Put(
        committed(
            [
                pb.PutRequest(namespace=namespace, key=key, layer=i, num_layers=len(blobs), blob=b)
                for i, b in enumerate(blobs)
            ]
        ),
        timeout=timeout_s,
    )


def run_crash_restart(
    start: Callable[[], Any],
    rounds: int,
    *,
    seed: int = 0,
    writers: int = 2,
    layers: int = 4,
    blob_bytes: int = 4096,
    kill_after_s: tuple[float, float] = (0.3, 0.8),
    namespace: str = "crash/model/profile",
) -> dict[str, Any]:
    """``start()`` returns a fresh ServerProcess on the same disk dir each time.

    Writers put chunks (and delete some) until the server is SIGKILLed at a random
    moment; after each restart every acknowledged chunk must read back intact and
    every acknowledged delete must stay deleted.
    """
    rng = random.Random(seed)
    acked: dict[bytes, list[bytes]] = {}
    deleted: set[bytes] = set()
    lock = threading.Lock()
    figures: Counter[str] = Counter()
    restart_s: list[float] = []
    server = start()
    try:
        for _ in range(rounds):
            stop = threading.Event()

            def writer(wseed: int, target: str = server.target, stop: threading.Event = stop) -> None:
                wrng = random.Random(wseed)
                with grpc.insecure_channel(target) as channel:
                    stub = pb_grpc.KVStoreStub(channel)
                    while not stop.is_set():
                        key = wrng.randbytes(KEY_BYTES)
                        blobs = [integrity.seal(wrng.randbytes(blob_bytes)) for _ in range(layers)]
                        try:
                            _put_chunk(stub, namespace, key, blobs, 5.0)
                        except grpc.RpcError:
                            figures["puts_cut_by_crash"] += 1
                            continue
                        with lock:
                            acked[key] = blobs
                        figures["puts_acked"] += 1
                        if wrng.random() < 0.1:
                            # Out of ``acked`` before the call: a delete cut off by the crash
                            # may or may not have happened, so that chunk is checked for neither.
                            with lock:
                                victim = wrng.choice(list(acked))
                                acked.pop(victim)
                            try:
                                stub.Delete(pb.DeleteRequest(namespace=namespace, keys=[victim]), timeout=5.0)
                            except grpc.RpcError:
                                continue
                            with lock:
                                deleted.add(victim)
                            figures["deletes_acked"] += 1

            threads = [threading.Thread(target=writer, args=(rng.random(),)) for _ in range(writers)]
            for t in threads:
                t.start()
            time.sleep(rng.uniform(*kill_after_s))  # the crash comes at a random moment under load
            server.kill()
            stop.set()
            for t in threads:
                t.join()
            t0 = time.perf_counter()
            server = start()
            restart_s.append(time.perf_counter() - t0)
            lost, corrupt, resurrected = _verify(server.target, namespace, acked, deleted, layers)
            figures["acked_blocks_lost"] += lost
            figures["acked_blocks_corrupt"] += corrupt
            figures["deleted_resurrected"] += resurrected
            figures["kills"] += 1
    finally:
        server.kill()
    return {
        **dict(figures),
        "acked_chunks_checked": len(acked),
        "acked_blocks_checked": len(acked) * layers,
        "restart_s_p50": round(percentile(restart_s, 0.5), 2),
        "restart_s_max": round(max(restart_s, default=0.0), 2),
    }


def _verify(
    target: str, namespace: str, acked: dict[bytes, list[bytes]], deleted: set[bytes], layers: int
) -> tuple[int, int, int]:
    lost = corrupt = resurrected = 0
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.KVStoreStub(channel)
        for key, blobs in acked.items():
            code, _, got = rpc_code(
                lambda k=key: list(
                    stub.Get(
                        pb.GetRequest(namespace=namespace, keys=[k], layer_start=0, layer_end=layers),
                        timeout=30,
                    )
                )
            )
            if code is not C.OK:
                lost += layers if code is C.NOT_FOUND else 0
                corrupt += layers if code is not C.NOT_FOUND else 0
                continue
            for resp in got:
                corrupt += int(resp.blob != blobs[resp.layer])
            lost += layers - len(got)
        for key in deleted:
            resp = stub.Lookup(pb.LookupRequest(namespace=namespace, keys=[key], num_layers=1), timeout=30)
            resurrected += resp.num_present
    return lost, corrupt, resurrected


# ====================================================================== concurrency


def run_concurrency(
    target: str,
    clients: int,
    seconds: float,
    *,
    seed: int = 0,
    token: str | None = None,
    namespace: str = "conc/model/profile",
    layers: int = 4,
    blob_bytes: int = 16 * 1024,
    client_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``clients`` threads, each with its own KVClient: put a chunk, look it up, read it back, and
    read a chunk another client wrote; every answer is checked against the bytes put."""
    from transfer.client import KVClient, PutItem

    shared: dict[bytes, list[bytes]] = {}
    shared_lock = threading.Lock()
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: Counter[str] = Counter()
    wrong = Counter()
    ops = [0] * clients
    moved = [0] * clients
    barrier = threading.Barrier(clients + 1)
    deadline: list[float] = [0.0]

    def client(idx: int) -> None:
        rng = random.Random(seed * 1000 + idx)
        kv = KVClient(target, token=token, **(client_options or {}))
        lat = latencies[idx]
        try:
            barrier.wait()
            while time.perf_counter() < deadline[0]:
                key = rng.randbytes(KEY_BYTES)
                blobs = [integrity.seal(rng.randbytes(blob_bytes)) for _ in range(layers)]
                try:
                    t0 = time.perf_counter()
                    kv.put(namespace, [PutItem(key, i, layers, b) for i, b in enumerate(blobs)])
                    t1 = time.perf_counter()
                    present = kv.lookup(namespace, [key], layers)
                    t2 = time.perf_counter()
                    got = [b for _, part in kv.get_layers(namespace, [key], 0, layers) for b in part]
                    t3 = time.perf_counter()
                    lat += [t1 - t0, t2 - t1, t3 - t2]
                    wrong["lookup"] += int(present != 1)
                    wrong["get"] += int(got != blobs)
                    with shared_lock:
                        shared[key] = blobs
                        other = rng.choice(list(shared))
                        expected = shared[other]
                    t4 = time.perf_counter()
                    got = [b for _, part in kv.get_layers(namespace, [other], 0, layers) for b in part]
                    lat.append(time.perf_counter() - t4)
                    wrong["get_other"] += int(got != expected)
                    ops[idx] += 4
                    moved[idx] += 3 * layers * len(blobs[0])
                except Exception as exc:  # noqa: BLE001 - every failure is a figure
                    errors[f"{type(exc).__name__}: {str(exc)[:120]}"] += 1
        finally:
            kv.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    deadline[0] = time.perf_counter() + seconds
    barrier.wait()
    for t in threads:
        t.join()
    all_lat = [x for lat in latencies for x in lat]
    total_ops = sum(ops)
    return {
        "clients": clients,
        "seconds": seconds,
        "ops": total_ops,
        "ops_per_s": round(total_ops / seconds, 1),
        "mb_per_s": round(sum(moved) / seconds / 1e6, 2),
        "latency_ms_p50": round(percentile(all_lat, 0.5) * 1e3, 2),
        "latency_ms_p99": round(percentile(all_lat, 0.99) * 1e3, 2),
        "errors": sum(errors.values()),
        "error_examples": dict(errors.most_common(5)),
        "wrong_answers": sum(wrong.values()),
    }


# ====================================================================== backend kill under load


def run_backend_kill(
    target: str,
    store: Any,
    redis_proc: Any,
    s3_proc: Any,
    seconds: float,
    *,
    clients: int = 4,
    seed: int = 0,
    namespace: str = "kill/model/profile",
    blob_bytes: int = 4096,
) -> dict[str, Any]:
    """Clients read and write while Redis, then S3, are SIGKILLed and restarted (empty).

    Allowed answers: Put OK; Lookup OK; Get OK with the exact bytes put, or NOT_FOUND.
    Anything else (wrong bytes, UNAVAILABLE, INTERNAL...) is a violation.
    """
    rng = random.Random(seed)
    truth: dict[bytes, bytes] = {}
    lock = threading.Lock()
    stop = threading.Event()
    answers: Counter[str] = Counter()
    violations: Counter[str] = Counter()

    def worker(idx: int) -> None:
        wrng = random.Random(seed * 100 + idx)
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.KVStoreStub(channel)
            while not stop.is_set():
                if wrng.random() < 0.4 or not truth:
                    key, blob = wrng.randbytes(KEY_BYTES), integrity.seal(wrng.randbytes(blob_bytes))
                    code, details, _ = rpc_code(
                        lambda k=key, b=blob: stub.Put(
                            committed(
                                [pb.PutRequest(namespace=namespace, key=k, layer=0, num_layers=1, blob=b)]
                            ),
                            timeout=10,
                        )
                    )
                    answers[f"put_{code.name}"] += 1
                    if code is C.OK:
                        with lock:
                            truth[key] = blob
                    else:
                        violations[f"put {code.name}: {details[:100]}"] += 1
                    continue
                with lock:
                    key = wrng.choice(list(truth))
                code, details, got = rpc_code(
                    lambda k=key: list(
                        stub.Get(
                            pb.GetRequest(namespace=namespace, keys=[k], layer_start=0, layer_end=1),
                            timeout=10,
                        )
                    )
                )
                answers[f"get_{code.name}"] += 1
                if code is C.OK:
                    if len(got) != 1 or got[0].blob != truth[key]:
                        violations["get served wrong bytes"] += 1
                elif code is not C.NOT_FOUND:
                    violations[f"get {code.name}: {details[:100]}"] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    events: list[tuple[float, str]] = []
    t0 = time.perf_counter()
    try:
        step = seconds / 6
        for proc, name in ((redis_proc, "redis"), (s3_proc, "s3")):
            time.sleep(step * rng.uniform(0.8, 1.2))
            proc.kill()
            events.append((round(time.perf_counter() - t0, 2), f"{name} killed"))
            time.sleep(step * rng.uniform(0.8, 1.2))
            proc.restart()
            events.append((round(time.perf_counter() - t0, 2), f"{name} restarted"))
        time.sleep(max(0.0, seconds - (time.perf_counter() - t0)))
    finally:
        stop.set()
        for t in threads:
            t.join()
    # After the restarts, each tier takes writes and serves reads again.
    recovered = _tiers_recovered(target, store, namespace)
    return {
        "seconds": round(time.perf_counter() - t0, 2),
        "answers": dict(answers),
        "violations": sum(violations.values()),
        "violation_examples": dict(violations.most_common(5)),
        "events": events,
        "tiers_recovered": recovered,
    }


def _tiers_recovered(target: str, store: Any, namespace: str, deadline_s: float = 15.0) -> dict[str, bool]:
    """Put fresh blobs until each persistent tier holds one (breakers close after their reset time)."""
    names = [t.name for t in store.tiers if t.persistent]
    ok = dict.fromkeys(names, False)
    end = time.monotonic() + deadline_s
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.KVStoreStub(channel)
        while not all(ok.values()) and time.monotonic() < end:
            key = os.urandom(KEY_BYTES)
            blob = integrity.seal(os.urandom(256))
            with contextlib.suppress(grpc.RpcError):
                stub.Put(
                    committed(
                        [pb.PutRequest(namespace=namespace, key=key, layer=0, num_layers=1, blob=blob)]
                    ),
                    timeout=10,
                )
            for name in names:
                with contextlib.suppress(Exception):
                    ok[name] = ok[name] or store.tier(name).get(BlobKey(namespace, key, 0)) == blob
            time.sleep(0.1)  # paced retries, bounded by the deadline
    return ok


# ====================================================================== backend freeze under load


def _wait_breaker_closed(store: Any, name: str, deadline_s: float = 15.0) -> float | None:
    """Seconds until tier ``name``'s breaker closes (and Stats calls it healthy), None past the deadline."""
    t0 = time.monotonic()
    tier = store.tier(name)
    while time.monotonic() - t0 < deadline_s:
        breaker = getattr(tier, "breaker", None)
        if (breaker is None or breaker.state == "closed") and all(
            s.healthy for s in store.tier_stats() if s.name == name
        ):
            return round(time.monotonic() - t0, 3)
        time.sleep(0.02)
    return None


def run_backend_freeze(
    target: str,
    store: Any,
    procs: dict[str, Any],
    freeze_s: float,
    *,
    clients: int = 4,
    seed: int = 0,
    namespace: str = "freeze/model/profile",
    blob_bytes: int = 4096,
    warmup_s: float = 1.0,
) -> dict[str, Any]:
    """Clients Put, Get and Lookup while each remote tier in ``procs`` is frozen (SIGSTOP) in turn.

    A frozen server accepts connections and never answers, so only the time budget and the
    circuit breaker keep RPCs short. Per freeze it reports the latency of every RPC that
    overlapped the freeze (p50/p99/max vs the tier's budget), the answers (allowed: Put OK;
    Lookup OK; Get OK with the exact bytes put or NOT_FOUND), the breaker trips, how long the
    breaker took to close after SIGCONT, and whether the tier takes writes again.
    ``procs`` maps a tier name to its server process, whose pause()/resume() send the signals:
    only pass servers this run started.
    """
    truth: dict[bytes, bytes] = {}
    lock = threading.Lock()
    stop = threading.Event()
    records: list[tuple[float, float, str]] = []  # (start, end, answer)
    violations: Counter[str] = Counter()

    def worker(idx: int) -> None:
        wrng = random.Random(seed * 100 + idx)
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.KVStoreStub(channel)
            while not stop.is_set():
                roll = wrng.random()
                t0 = time.monotonic()
                if roll < 0.35 or not truth:
                    key, blob = wrng.randbytes(KEY_BYTES), integrity.seal(wrng.randbytes(blob_bytes))
                    code, details, _ = rpc_code(
                        lambda k=key, b=blob: stub.Put(
                            committed(
                                [pb.PutRequest(namespace=namespace, key=k, layer=0, num_layers=1, blob=b)]
                            ),
                            timeout=10,
                        )
                    )
                    answer = f"put_{code.name}"
                    if code is C.OK:
                        with lock:
                            truth[key] = blob
                    else:
                        violations[f"put {code.name}: {details[:100]}"] += 1
                elif roll < 0.5:
                    with lock:
                        keys = wrng.sample(list(truth), min(4, len(truth)))
                    code, details, _ = rpc_code(
                        lambda k=keys: stub.Lookup(
                            pb.LookupRequest(namespace=namespace, keys=k, num_layers=1), timeout=10
                        )
                    )
                    answer = f"lookup_{code.name}"
                    if code is not C.OK:
                        violations[f"lookup {code.name}: {details[:100]}"] += 1
                else:
                    with lock:
                        key = wrng.choice(list(truth))
                    code, details, got = rpc_code(
                        lambda k=key: list(
                            stub.Get(
                                pb.GetRequest(namespace=namespace, keys=[k], layer_start=0, layer_end=1),
                                timeout=10,
                            )
                        )
                    )
                    answer = f"get_{code.name}"
                    if code is C.OK:
                        if len(got) != 1 or got[0].blob != truth[key]:
                            violations["get served wrong bytes"] += 1
                    elif code is not C.NOT_FOUND:
                        violations[f"get {code.name}: {details[:100]}"] += 1
                with lock:
                    records.append((t0, time.monotonic(), answer))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    freezes: dict[str, dict[str, Any]] = {}
    try:
        for name, proc in procs.items():
            tier = store.tier(name)
            warm_from = time.monotonic()
            time.sleep(warmup_s)
            with lock:
                before = [end - start for start, end, _ in records if start >= warm_from]
            trips_before = tier.breaker.num_trips
            errors_before = tier.counters.errors
            frozen_at = time.monotonic()
            proc.pause()
            try:
                time.sleep(freeze_s)
            finally:
                proc.resume()
            resumed_at = time.monotonic()
            closed_after = _wait_breaker_closed(store, name)
            with lock:
                window = [
                    (end - start, answer)
                    for start, end, answer in records
                    if end >= frozen_at and start <= resumed_at
                ]
            latencies = [lat for lat, _ in window]
            budget = float(getattr(tier, "budget_s", 0.0))
            freezes[name] = {
                "frozen_s": round(resumed_at - frozen_at, 2),
                "budget_s": budget,
                "rpcs": len(window),
                "answers": dict(Counter(answer for _, answer in window)),
                "latency_ms_p50": round(percentile(latencies, 0.50) * 1000, 1),
                "latency_ms_p99": round(percentile(latencies, 0.99) * 1000, 1),
                "latency_ms_max": round(max(latencies, default=0.0) * 1000, 1),
                "rpcs_over_budget": sum(1 for lat in latencies if lat > budget),
                # Same run, same load, the second before the freeze: the baseline.
                "unfrozen_latency_ms_p50": round(percentile(before, 0.50) * 1000, 1),
                "unfrozen_latency_ms_p99": round(percentile(before, 0.99) * 1000, 1),
                "breaker_trips": tier.breaker.num_trips - trips_before,
                "tier_errors": tier.counters.errors - errors_before,
                "breaker_closed_after_resume_s": closed_after,
            }
    finally:
        stop.set()
        for t in threads:
            t.join()
    recovered = _tiers_recovered(target, store, namespace)
    for name in freezes:
        freezes[name]["used_again"] = recovered.get(name, False)
    return {
        "freezes": freezes,
        "answers": dict(Counter(answer for _, _, answer in records)),
        "violations": sum(violations.values()),
        "violation_examples": dict(violations.most_common(5)),
    }


# ====================================================================== disk recovery after bit flips

#: Where in a disk record a flip lands: (part, offset from the record start, or from the payload).
_RECORD_PARTS = (
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
    by_part: dict[str, Counter[str]] = {p: Counter() for p in _RECORD_PARTS}
    lost_per_flip: list[int] = []
    wrong_served = 0
    for trial in range(trials):
        part = _RECORD_PARTS[trial % len(_RECORD_PARTS)]
        where = "sealed" if (trial // len(_RECORD_PARTS)) % 2 == 0 else "newest"
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


# ====================================================================== main


def _bench_fuzz(n: int, seed: int) -> dict[str, Any]:
    from tests.fixtures.store import start_server_process

    limits = Limits()
    with tempfile.TemporaryDirectory(prefix="kvstore-fuzz-") as tmp:
        server = start_server_process(fuzz_server_args(Path(tmp), limits, "fuzz-token", "fuzz"), workdir=tmp)
        try:
            return run_fuzz(
                server.target,
                n,
                seed=seed,
                token="fuzz-token",
                limits=limits,
                alive=lambda: server.proc.poll() is None,
            )
        finally:
            server.kill()


def _bench_crash(rounds: int, seed: int) -> dict[str, Any]:
    from tests.fixtures.store import start_server_process

    out = {}
    for fsync in ("always", "batch"):
        with tempfile.TemporaryDirectory(prefix="kvstore-crash-") as tmp:
            args = ["--disk-path", str(Path(tmp) / "disk"), "--fsync", fsync, "--log-level", "WARNING"]
            out[fsync] = run_crash_restart(
                lambda a=args, w=tmp: start_server_process(a, workdir=w), rounds, seed=seed
            )
    return out


def _in_process_server(tmp: Path, **overrides: Any) -> Any:
    from kvstore.config import load_config
    from kvstore.server import serve

    base = {
        "server.port": 0,
        "server.workers": 32,
        "memory.max_bytes": 256 << 20,
        "disk.path": str(tmp / "disk"),
        "disk.fsync": "never",
    }
    base.update(overrides)
    return serve(load_config(None, environ={}, overrides=base))


def _bench_bitflips(flips: int, seed: int, r: Any, s3: Any) -> dict[str, Any]:
    """Two servers: RAM+disk+Redis takes most flips (fast); all four tiers with S3 drawn most
    often takes a tenth (each S3 flip costs ~7 requests to moto)."""
    import boto3
    import redis

    out: dict[str, Any] = {}
    phases = [
        ("ram_disk_redis", flips - flips // 10, False, None),
        ("all_four_tiers", flips // 10, True, {"memory": 0.3, "disk": 0.3, "redis": 0.3, "s3": 1.0}),
    ]
    for name, count, with_s3, weights in phases:
        with tempfile.TemporaryDirectory(prefix="kvstore-flips-") as tmp:
            overrides: dict[str, Any] = {
                "redis.enabled": True,
                "redis.url": r.url,
                "redis.key_prefix": f"{name}:",
            }
            s3_client = None
            if with_s3:
                overrides.update(
                    {
                        "s3.enabled": True,
                        "s3.endpoint_url": s3.endpoint_url,
                        "s3.bucket": name,
                        "s3.access_key_id": "test",
                        "s3.secret_access_key": "test",
                    }
                )
                s3_client = boto3.client(
                    "s3",
                    endpoint_url=s3.endpoint_url,
                    region_name="us-east-1",
                    aws_access_key_id="test",
                    aws_secret_access_key="test",
                )
            handle = _in_process_server(Path(tmp), **overrides)
            try:
                corruptor = TierCorruptor(handle.store, redis.Redis.from_url(r.url), s3_client)
                t0 = time.perf_counter()
                report = run_bitflips(
                    handle.target, handle.store, corruptor, count, seed=seed, tier_weights=weights
                ).as_dict()
                report["seconds"] = round(time.perf_counter() - t0, 1)
                out[name] = report
            finally:
                handle.stop(grace=0)
    total: dict[str, Any] = {}
    for key in (
        "flips",
        "reads",
        "corrupt_served",
        "repaired",
        "lost",
        "unrepaired_with_intact_copy",
        "baseline_reads",
        "baseline_wrong",
    ):
        total[key] = sum(phase[key] for phase in out.values())
    tiers: Counter[str] = Counter()
    for phase in out.values():
        tiers.update(phase["flips_by_tier"])
    total["flips_by_tier"] = dict(tiers)
    return {**total, "phases": out}


def _bench_concurrency(clients: int, seconds: float, seed: int) -> dict[str, Any]:
    from tests.fixtures.store import start_server_process

    with tempfile.TemporaryDirectory(prefix="kvstore-conc-") as tmp:
        server = start_server_process(
            [
                "--disk-path",
                str(Path(tmp) / "disk"),
                "--fsync",
                "never",
                "--workers",
                str(max(16, clients)),
                "--log-level",
                "WARNING",
            ],
            workdir=tmp,
        )
        try:
            baseline = run_concurrency(server.target, 1, min(seconds, 10.0), seed=seed)
            loaded = run_concurrency(server.target, clients, seconds, seed=seed + 1)
            loaded["server_alive"] = server.proc.poll() is None
            return {"baseline_1_client": baseline, "loaded": loaded}
        finally:
            server.kill()


def _bench_backend_kill(seconds: float, seed: int, r: Any, s3: Any) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="kvstore-kill-") as tmp:
        handle = _in_process_server(
            Path(tmp),
            **{
                "memory.max_bytes": 64 * 1024,
                "disk.enabled": False,
                "redis.enabled": True,
                "redis.url": r.url,
                "redis.socket_timeout_s": 0.5,
                "s3.enabled": True,
                "s3.endpoint_url": s3.endpoint_url,
                "s3.bucket": "kill",
                "s3.timeout_s": 1.0,
                "s3.access_key_id": "test",
                "s3.secret_access_key": "test",
            },
        )
        try:
            out = run_backend_kill(handle.target, handle.store, r, s3, seconds, seed=seed)
            out["server_healthy"] = roundtrip_ok(handle.target, "kill/model/profile", None)
            return out
        finally:
            handle.stop(grace=0)


def _legacy_store(r: Any, s3: Any, name: str) -> Any:
    """The tiers as they were before budgets: 1 s Redis and 5 s S3 timeouts (connect and read), retry
    deadline 2 x timeout, and the caller-probe breaker that opens after 3 failures in a row."""
    from kvstore.backends.memory import MemoryBackend
    from kvstore.backends.redis import RedisBackend
    from kvstore.backends.retry import CircuitBreaker
    from kvstore.backends.s3 import S3Backend
    from kvstore.backends.tiered import TieredStore

    tiers = [
        MemoryBackend(max_bytes=64 * 1024),
        RedisBackend(
            url=r.url,
            key_prefix=f"{name}:",
            socket_timeout_s=1.0,
            connect_timeout_s=1.0,
            budget_s=4.0,
            breaker=CircuitBreaker("redis", 3, 1.0),
        ),
        S3Backend(
            endpoint_url=s3.endpoint_url,
            bucket=name,
            access_key_id="test",
            secret_access_key="test",
            timeout_s=5.0,
            connect_timeout_s=5.0,
            budget_s=20.0,
            breaker=CircuitBreaker("s3", 3, 1.0),
        ),
    ]
    return TieredStore(tiers, write_through=["redis", "s3"])


def _bench_backend_freeze(seconds: float, seed: int, r: Any, s3: Any, legacy: bool = False) -> dict[str, Any]:
    """Default budgets (``redis.budget_s``/``s3.budget_s`` 0: connect + read + margin, 0.5 s); with
    ``legacy`` the same load against the pre-budget settings, as the baseline."""
    from kvstore.config import load_config
    from kvstore.server import serve

    with tempfile.TemporaryDirectory(prefix="kvstore-freeze-") as tmp:
        name = "freeze-legacy" if legacy else "freeze"
        if legacy:
            config = load_config(
                None, environ={}, overrides={"server.port": 0, "server.workers": 32, "disk.enabled": False}
            )
            handle = serve(config, store=_legacy_store(r, s3, name))
        else:
            handle = _in_process_server(
                Path(tmp),
                **{
                    "memory.max_bytes": 64 * 1024,
                    "disk.enabled": False,
                    "redis.enabled": True,
                    "redis.url": r.url,
                    "redis.key_prefix": f"{name}:",
                    "s3.enabled": True,
                    "s3.endpoint_url": s3.endpoint_url,
                    "s3.bucket": name,
                    "s3.access_key_id": "test",
                    "s3.secret_access_key": "test",
                },
            )
        try:
            out = run_backend_freeze(handle.target, handle.store, {"redis": r, "s3": s3}, seconds, seed=seed)
            out["server_healthy"] = roundtrip_ok(handle.target, "freeze/model/profile", None)
            return out
        finally:
            handle.stop(grace=0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="reduced sizes, under a minute")
    parser.add_argument(
        "--only",
        default="fuzz,bitflips,disk_flips,crash,concurrency,starvation,backend_freeze,"
        "backend_freeze_legacy,backend_kill",
        help="comma-separated subset of workloads",
    )
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    q = args.quick
    sizes = {
        "fuzz": 1000 if q else 10_000,
        "flips": 400 if q else 10_000,
        "crash_rounds": 1 if q else 10,
        "clients": 16 if q else 64,
        "conc_s": 3.0 if q else 60.0,
        "kill_s": 5.0 if q else 30.0,
        "disk_flips": 36 if q else 360,
        "freeze_s": 3.0 if q else 10.0,
    }
    wanted = set(args.only.split(","))
    results: dict[str, Any] = {"quick": q, "sizes": sizes}
    logging.basicConfig(level=logging.ERROR)  # the faults below make the server warn, by design
    with contextlib.ExitStack() as stack:
        services: list[Any] = []
        if wanted & {
            "bitflips",
            "backend_kill",
            "backend_freeze",
            "backend_freeze_legacy",
        }:  # one Redis and one S3 for both (moto starts slowly)
            from kvstore.testing.services import RedisProcess, S3Process

            services = [stack.enter_context(RedisProcess()), stack.enter_context(S3Process())]
        runners: dict[str, Callable[[], dict[str, Any]]] = {
            "fuzz": lambda: _bench_fuzz(sizes["fuzz"], args.seed),
            "bitflips": lambda: _bench_bitflips(sizes["flips"], args.seed, *services),
            "crash": lambda: _bench_crash(sizes["crash_rounds"], args.seed),
            "concurrency": lambda: _bench_concurrency(sizes["clients"], sizes["conc_s"], args.seed),
            "disk_flips": lambda: run_disk_flips(sizes["disk_flips"], seed=args.seed),
            # SIGSTOP/SIGCONT of the Redis and S3 started above (never any other process).
            "backend_freeze": lambda: _bench_backend_freeze(sizes["freeze_s"], args.seed, *services),
            "backend_freeze_legacy": lambda: _bench_backend_freeze(
                sizes["freeze_s"], args.seed, *services, legacy=True
            ),
            "starvation": lambda: _bench_starvation(q, args.seed),
            # Last: it kills and restarts the shared Redis and S3 (they come back empty).
            "backend_kill": lambda: _bench_backend_kill(sizes["kill_s"], args.seed, *services),
        }
        for name, run in runners.items():
            if name in wanted:
                t0 = time.perf_counter()
                results[name] = run()
                results[name]["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(results, indent=2, default=str))
    print(summary(results))
    return 0


def summary(r: dict[str, Any]) -> str:
    parts = []
    if "fuzz" in r:
        f = r["fuzz"]
        parts.append(f"fuzz {f['requests']} reqs: {f['violations']} imprecise, crashed={f['crashed']}")
    if "bitflips" in r:
        b = r["bitflips"]
        parts.append(f"bitflips {b['flips']}: {b['corrupt_served']} corrupt served, {b['repaired']} repaired")
    if "crash" in r:
        parts.append(
            "crash: "
            + ", ".join(
                f"fsync={k} {v.get('acked_blocks_lost', 0)} lost of {v['acked_blocks_checked']}"
                for k, v in r["crash"].items()
                if isinstance(v, dict)
            )
        )
    if "concurrency" in r:
        c = r["concurrency"]["loaded"]
        b = r["concurrency"]["baseline_1_client"]
        parts.append(
            f"{c['clients']} clients: {c['errors']} errors, {c['ops_per_s']} ops/s "
            f"(1 client {b['ops_per_s']}), p99 {c['latency_ms_p99']} ms"
        )
    if "disk_flips" in r:
        d = r["disk_flips"]
        parts.append(
            f"disk flips {d['flips']}: {d['other_records_lost_total']} other records lost "
            f"(max {d['other_records_lost_max_per_flip']}/flip), {d['wrong_bytes_served']} wrong served"
        )
    if "backend_freeze" in r:
        fr = r["backend_freeze"]["freezes"]
        parts.append(
            "freeze: "
            + ", ".join(
                f"{n} max {f['latency_ms_max']} ms / p99 {f['latency_ms_p99']} ms vs budget {f['budget_s']:.2f} s, "
                f"back in {f['breaker_closed_after_resume_s']} s"
                for n, f in fr.items()
            )
            + f", {r['backend_freeze']['violations']} bad answers"
        )
    if "backend_freeze_legacy" in r:
        fr = r["backend_freeze_legacy"]["freezes"]
        parts.append(
            "pre-budget settings: "
            + ", ".join(
                f"{n} max {f['latency_ms_max']} ms / p99 {f['latency_ms_p99']} ms" for n, f in fr.items()
            )
            + f", {r['backend_freeze_legacy']['violations']} bad answers"
        )
    if "backend_kill" in r:
        k = r["backend_kill"]
        back = ",".join(name for name, ok in k["tiers_recovered"].items() if ok) or "none"
        parts.append(f"redis+s3 kill: {k['violations']} bad answers, tiers back: {back}")
    if "starvation" in r:
        st = r["starvation"]
        d = st["during_stall_other_tenant"]
        parts.append(
            f"starvation {st['streams_attempted']} stalled streams ({st['streams_held']} held, "
            f"{st['refused_resource_exhausted']} refused): other tenant p99 {d['latency_ms_p99']} ms, "
            f"max {d['latency_ms_max']} ms, {d['failures']} failures, "
            f"{st['partial_puts_stored']} partial Puts stored"
        )
    return "reliability: " + "; ".join(parts)


# ---------------------------------------------------------------- starvation (issue 16)


def run_starvation(
    target: str,
    observer_token: str,
    *,
    workers: int,
    tenant_limit: int,
    idle_s: float,
    probe_s: float,
    seed: int = 0,
) -> dict[str, Any]:
    """Tenant "a" stalls 10x ``workers`` streams while tenant "b" keeps calling; what held, how fast.

    Half of a's streams are Puts that send one blob and stop (no commit), half are
    Gets never read (on connections without BDP probing, so their flow-control
    windows fill). Measured: streams the server held and refused
    (RESOURCE_EXHAUSTED past ``tenant_limit``), b's health/Lookup/Get/Put/Stats
    latency before (baseline) and during the stall, how a's streams ended and
    after how long, and whether anything of the stalled Puts was stored.
    """
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from kvstore.auth import bearer_metadata
    from transfer.client import KVClient

    rng = random.Random(seed)
    ns_a, ns_b = "a/m/p", "b/m/p"
    md_a = bearer_metadata("tok-a")
    blob = integrity.seal(rng.randbytes(256 * 1024 - 8))
    big = [rng.randbytes(KEY_BYTES) for _ in range(64)]
    b_keys = [rng.randbytes(KEY_BYTES) for _ in range(4)]
    with KVClient(target, token="tok-a") as a, KVClient(target, token="tok-b") as b:
        a.put(ns_a, [(k, 0, 1, blob) for k in big])
        b.put(ns_b, [(k, 0, 1, integrity.seal(rng.randbytes(4088))) for k in b_keys])

    def probe(seconds: float) -> dict[str, Any]:
        lat: dict[str, list[float]] = {m: [] for m in ("health", "lookup", "get", "put", "stats")}
        failures = 0
        with grpc.insecure_channel(target) as ch, KVClient(target, token="tok-b", timeout_s=5) as kv:
            health = health_pb2_grpc.HealthStub(ch)
            calls = {
                "health": lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5),
                "lookup": lambda: kv.lookup(ns_b, b_keys, 1),
                "get": lambda: list(kv.get_layers(ns_b, b_keys, 0, 1)),
                "put": lambda: kv.put(ns_b, [(rng.randbytes(KEY_BYTES), 0, 1, integrity.seal(b"x" * 1000))]),
                "stats": lambda: kv.stats(),
            }
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                for name, call in calls.items():
                    t0 = time.perf_counter()
                    try:
                        call()
                    except Exception:  # noqa: BLE001 - counted, the probe goes on
                        failures += 1
                    lat[name].append(time.perf_counter() - t0)
        every = [x for v in lat.values() for x in v]
        return {
            "calls": len(every),
            "failures": failures,
            "latency_ms_p50": round(percentile(every, 0.5) * 1e3, 2),
            "latency_ms_p99": round(percentile(every, 0.99) * 1e3, 2),
            "latency_ms_max": round(max(every) * 1e3, 2),
            "max_ms_by_call": {k: round(max(v) * 1e3, 2) for k, v in lat.items() if v},
            "over_1s": sum(x > 1.0 for x in every),
        }

    baseline = probe(probe_s)
    options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.http2.bdp_probe", 0)]
    channels = [grpc.insecure_channel(target, options=options) for _ in range(4)]
    stubs = [pb_grpc.KVStoreStub(c) for c in channels]
    release = threading.Event()
    stalled_keys: list[bytes] = []

    def stalled_put(key: bytes) -> Iterator[pb.PutRequest]:
        yield pb.PutRequest(namespace=ns_a, key=key, layer=0, num_layers=1, blob=blob)
        release.wait(idle_s * 4 + 60)

    attempted = 10 * workers
    puts, gets = [], []
    end_s: list[float] = []  # seconds from opening each stalled Put to its end (refused ones: ~0)
    try:
        for i in range(attempted):
            stub = stubs[i % len(stubs)]
            if i % 2 == 0:
                key = rng.randbytes(KEY_BYTES)
                stalled_keys.append(key)
                future = stub.Put.future(stalled_put(key), metadata=md_a)
                opened = time.monotonic()
                future.add_done_callback(lambda _f, opened=opened: end_s.append(time.monotonic() - opened))
                puts.append(future)
            else:
                gets.append(
                    stub.Get(
                        pb.GetRequest(
                            namespace=ns_a, keys=big, layer_start=0, layer_end=1, pack_bytes=1 << 20
                        ),
                        metadata=md_a,
                    )
                )
        time.sleep(0.5)
        with grpc.insecure_channel(target) as ch:
            held = (
                pb_grpc.KVStoreStub(ch)
                .Stats(pb.StatsRequest(), timeout=5, metadata=bearer_metadata(observer_token))
                .counters["streams_open"]
            )
        during = probe(probe_s)
        ends: Counter[str] = Counter()
        for f in puts:
            code, _, _ = rpc_code(lambda f=f: f.result(timeout=idle_s * 4 + 30))
            ends[code.name] += 1
        time.sleep(idle_s)
        for call in gets:
            code, _, _ = rpc_code(lambda call=call: sum(1 for _ in call))
            ends[code.name] += 1
    finally:
        release.set()
        for call in gets:
            call.cancel()
        for c in channels:
            c.close()
    with KVClient(target, token="tok-a") as a:
        partial = sum(a.lookup(ns_a, [k], 1) for k in stalled_keys)
    return {
        "workers": workers,
        "streams_attempted": attempted,
        "tenant_limit": tenant_limit,
        "streams_held": held,
        "stalled_ends_by_code": dict(ends),
        "refused_resource_exhausted": ends.get("RESOURCE_EXHAUSTED", 0),
        "stalled_put_end_s_max": round(max(end_s), 2) if end_s else None,
        "idle_timeout_s": idle_s,
        "partial_puts_stored": partial,
        "baseline_other_tenant": baseline,
        "during_stall_other_tenant": during,
    }


def _bench_starvation(quick: bool, seed: int) -> dict[str, Any]:
    workers = 4 if quick else 16
    idle_s = 2.0 if quick else 5.0
    tenant_limit = 5 * workers
    with tempfile.TemporaryDirectory(prefix="kvstore-starve-") as tmp:
        handle = _in_process_server(
            Path(tmp),
            **{
                "server.workers": workers,
                "auth.tokens": {"tok-a": "a", "tok-b": "b"},
                "server.max_streams_per_tenant": tenant_limit,
                "server.max_streams_per_peer": 10 * workers,
                "server.stream_idle_timeout_s": idle_s,
            },
        )
        try:
            return run_starvation(
                handle.target,
                "tok-b",
                workers=workers,
                tenant_limit=tenant_limit,
                idle_s=idle_s,
                probe_s=2.0 if quick else 10.0,
                seed=seed,
            )
        finally:
            handle.stop(grace=0)


if __name__ == "__main__":
    raise SystemExit(main())
