"""``fuzz``: malformed and oversize requests against a real server, counted by the status they get.

Bad namespaces, keys, layer numbers, blobs, foreign tenants, bad tokens, oversize
messages, random and mutated raw bytes sent through a generic channel
(:class:`RawCaller`). Every answer must be in the precise set its case allows;
UNKNOWN and INTERNAL never are.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from kvstore import integrity
from kvstore.auth import bearer_metadata
from kvstore.keys import KEY_BYTES
from kvstore.testing.reliability.calls import (
    COMMIT_BYTES,
    PRECISE,
    SERVICE,
    C,
    roundtrip_ok,
    rpc_code,
    seed_chunks,
)
from kvstore.v1 import kvstore_pb2 as pb

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
