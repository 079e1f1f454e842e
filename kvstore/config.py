"""The one typed configuration of a kvstore server.

Precedence, lowest first: built-in defaults, a YAML or TOML file, environment
variables ``KVSTORE_<SECTION>__<FIELD>`` (e.g. ``KVSTORE_SERVER__PORT=6000``,
``KVSTORE_REDIS__ENABLED=true``), then CLI flags. All of that is resolved once,
at the entrypoint, by :func:`load_config`; everything below receives a frozen
:class:`StoreConfig` and never reads the environment itself.

Every check lives in :func:`validate` and raises ``ValueError`` naming the field,
so a bad deployment fails at startup with a message an operator can act on,
never later inside a request.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB

ENV_PREFIX = "KVSTORE_"


def default_cache_dir() -> Path:
    """The per-user cache directory (XDG on Linux), where the disk tier lives by default."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kvstore"


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    #: Largest gRPC message either way; must hold one blob plus its envelope.
    max_message_bytes: int = 72 * MiB
    #: Largest single blob accepted by Put (RESOURCE_EXHAUSTED above it).
    max_blob_bytes: int = 64 * MiB
    max_layers: int = 1024
    max_keys_per_request: int = 4096
    #: Threads doing the blocking store work (tier I/O, validation). RPCs are served by an
    #: asyncio server: a stream waiting on its client holds no thread.
    workers: int = 16
    #: A Put stream is validated whole before anything is written (all-or-nothing);
    #: it may buffer at most this many bytes, beyond that it fails RESOURCE_EXHAUSTED.
    max_put_stream_bytes: int = 512 * MiB
    #: Put/Get streams one tenant (auth on) may have open at once; RESOURCE_EXHAUSTED past it.
    max_streams_per_tenant: int = 256
    #: Put/Get streams one client connection (gRPC peer) may have open at once.
    max_streams_per_peer: int = 128
    #: A Put stream whose client sends nothing for this long, or a Get stream whose client
    #: reads nothing for this long, ends with DEADLINE_EXCEEDED (nothing of a Put is stored).
    stream_idle_timeout_s: float = 30.0
    #: Longest a Put or Get stream may take from start to end, however steadily it moves.
    stream_timeout_s: float = 600.0
    #: When a Put is acknowledged: "memory" (any tier took it) or "durable" (a persistent tier,
    #: disk, Redis or S3, took it; UNAVAILABLE otherwise). A client may ask for durable per Put.
    ack: str = "memory"


@dataclass(frozen=True)
class MemoryConfig:
    max_bytes: int = 2 * GiB
    #: Map the whole budget at start-up (kvstore.allocator.prefault_heap), so stored blobs land in
    #: pages that already exist instead of faulting in fresh ones: RSS starts at the budget.
    prefault: bool = False


@dataclass(frozen=True)
class DiskConfig:
    enabled: bool = True
    path: str = field(default_factory=lambda: str(default_cache_dir() / "disk"))
    max_bytes: int = 64 * GiB
    fsync: str = "batch"
    segment_bytes: int = 256 * MiB


@dataclass(frozen=True)
class RedisConfig:
    enabled: bool = False
    url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "kvstore:"
    ttl_seconds: int = 0
    max_bytes: int = 0
    #: Longest wait for one reply (each read); with the connect timeout it bounds a hung Redis.
    socket_timeout_s: float = 0.25
    pool_size: int = 32
    #: Longest wait to open a connection.
    connect_timeout_s: float = 0.1
    #: Time budget of one call (connect + read, pool wait and any retry); 0: connect + read + 0.15 s.
    budget_s: float = 0.0
    #: Failed calls in a row that open the circuit breaker (the tier is then skipped).
    breaker_threshold: int = 3
    #: How often an open breaker probes the server in the background; it closes on the first answer.
    breaker_reset_s: float = 0.5
    #: The breaker also opens when this share of the calls in the last ``breaker_window_s``
    #: failed, once there were at least ``breaker_min_calls`` of them (isolated slow calls never do).
    breaker_error_rate: float = 0.5
    breaker_window_s: float = 10.0
    breaker_min_calls: int = 20
    #: Blob bytes kept (in RAM) for this tier while it is skipped, written behind once it answers
    #: again; past it the oldest are dropped and counted (``write_behind_dropped``). 0: off.
    write_behind_max_bytes: int = 256 * MiB
    #: Redis Cluster mode: ``url`` is one node; ``cluster_nodes`` (comma-separated host:port)
    #: adds more startup nodes, so the tier starts while any one of them is up.
    cluster: bool = False
    cluster_nodes: str = ""


@dataclass(frozen=True)
class S3Config:
    enabled: bool = False
    endpoint_url: str = ""
    bucket: str = "kvstore"
    prefix: str = "kv/"
    region: str = "us-east-1"
    access_key_id: str | None = None
    secret_access_key: str | None = None
    max_bytes: int = 0
    #: Longest wait for bytes of one response (botocore read_timeout).
    timeout_s: float = 0.35
    max_concurrency: int = 16
    multipart_threshold_bytes: int = 64 * MiB
    #: Longest wait to open a connection (botocore connect_timeout).
    connect_timeout_s: float = 0.1
    #: Time budget of one call (connect + read and any retry); 0: connect + read + 0.05 s.
    budget_s: float = 0.0
    #: Failed calls in a row that open the circuit breaker (the tier is then skipped).
    breaker_threshold: int = 3
    #: How often an open breaker probes S3 in the background; it closes on the first answer.
    breaker_reset_s: float = 0.5
    #: The breaker also opens when this share of the calls in the last ``breaker_window_s``
    #: failed, once there were at least ``breaker_min_calls`` of them (isolated slow calls never do).
    breaker_error_rate: float = 0.5
    breaker_window_s: float = 10.0
    breaker_min_calls: int = 20
    #: Blob bytes kept (in RAM) for this tier while it is skipped, written behind once it answers
    #: again; past it the oldest are dropped and counted (``write_behind_dropped``). 0: off.
    write_behind_max_bytes: int = 256 * MiB


@dataclass(frozen=True)
class AuthConfig:
    #: Bearer token -> tenant. Empty: authentication is off.
    tokens: dict[str, str] = field(default_factory=dict)
    tls_cert: str | None = None
    tls_key: str | None = None
    #: When set, clients must present a certificate signed by this CA (mutual TLS).
    tls_client_ca: str | None = None


@dataclass(frozen=True)
class QuotaConfig:
    #: Bytes a tenant may store; 0 means unlimited.
    default_max_bytes: int = 0
    per_tenant: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class MetricsConfig:
    #: Port of the Prometheus endpoint; 0 turns it off.
    port: int = 0
    host: str = "0.0.0.0"


@dataclass(frozen=True)
class StoreConfig:
    server: ServerConfig = field(default_factory=ServerConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    disk: DiskConfig = field(default_factory=DiskConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    s3: S3Config = field(default_factory=S3Config)
    auth: AuthConfig = field(default_factory=AuthConfig)
    quotas: QuotaConfig = field(default_factory=QuotaConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def __post_init__(self) -> None:
        validate(self)

    def replace(self, **sections: Any) -> StoreConfig:
        """A copy with whole sections or ``section={field: value}`` dicts replaced."""
        changes = {}
        for name, value in sections.items():
            current = getattr(self, name)
            changes[name] = dataclasses.replace(current, **value) if isinstance(value, Mapping) else value
        return dataclasses.replace(self, **changes)


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(StoreConfig)}  # type: ignore[misc]

FSYNC_MODES = ("batch", "always", "never")
ACK_MODES = ("memory", "durable")


#: A tenant name: the tenant part of a namespace (kvstore.keys.NAMESPACE_RE), checked here so that
#: a typo in auth.tokens or quotas.per_tenant fails at start-up, not at the first request.
TENANT_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


def validate(config: StoreConfig) -> None:
    """Every check of every field, maps included, in one place.

    Raises ValueError with one line that names the field and says why; ``kvstore serve``
    prints it and exits 2. Nothing later in start-up (auth, quotas, backends) may find a
    config value it rejects: whatever they would refuse is refused here first.
    """
    s = config.server

    def positive(name: str, value: float) -> None:
        if value <= 0:
            raise ValueError(f"{name} must be > 0, got {value}")

    def non_negative(name: str, value: float) -> None:
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")

    def port(name: str, value: int) -> None:
        if not 0 <= value <= 65535:
            raise ValueError(f"{name} must be a TCP port in 0..65535 (0 = pick a free one), got {value}")

    def tenant(where: str, name: object) -> None:
        if not isinstance(name, str) or not TENANT_RE.fullmatch(name):
            raise ValueError(f"{where}: invalid tenant name {name!r}: use 1-64 characters of [A-Za-z0-9._:-]")

    def one_line(where: str, value: object) -> None:
        if isinstance(value, str) and ("\n" in value or "\r" in value):
            raise ValueError(f"{where} must be a single line")

    # Floats first, for every section: NaN passes every comparison and inf every bound.
    for section in dataclasses.fields(config):
        values = getattr(config, section.name)
        for f in dataclasses.fields(values):
            value = getattr(values, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{section.name}.{f.name} must be a finite number, got {value}")
            one_line(f"{section.name}.{f.name}", value)

    if not s.host:
        raise ValueError("server.host must not be empty")
    port("server.port", s.port)
    for name in (
        "max_message_bytes",
        "max_blob_bytes",
        "max_layers",
        "max_keys_per_request",
        "workers",
        "max_put_stream_bytes",
    ):
        positive(f"server.{name}", getattr(s, name))
    if s.max_blob_bytes + 64 * KiB > s.max_message_bytes:
        raise ValueError(
            f"server.max_message_bytes ({s.max_message_bytes}) must exceed server.max_blob_bytes "
            f"({s.max_blob_bytes}) by at least 64 KiB so that one blob plus its envelope fits a message"
        )
    if s.max_put_stream_bytes < s.max_blob_bytes:
        raise ValueError("server.max_put_stream_bytes must be >= server.max_blob_bytes")
    for name in (
        "max_streams_per_tenant",
        "max_streams_per_peer",
        "stream_idle_timeout_s",
        "stream_timeout_s",
    ):
        positive(f"server.{name}", getattr(s, name))
    if s.ack not in ACK_MODES:
        raise ValueError(f"server.ack must be one of {', '.join(ACK_MODES)}, got {s.ack!r}")
    if s.ack == "durable" and not (config.disk.enabled or config.redis.enabled or config.s3.enabled):
        # Such a server would start and then refuse every Put that takes its default.
        raise ValueError(
            "server.ack is durable but no persistent tier is configured: enable disk (disk.enabled), "
            "redis (redis.enabled) or s3 (s3.enabled), or set server.ack: memory"
        )
    non_negative("memory.max_bytes", config.memory.max_bytes)
    d = config.disk
    if d.enabled and not d.path:
        raise ValueError("disk.path must be set when disk.enabled is true")
    non_negative("disk.max_bytes", d.max_bytes)
    positive("disk.segment_bytes", d.segment_bytes)
    if d.fsync not in FSYNC_MODES:
        raise ValueError(f"disk.fsync must be one of {', '.join(FSYNC_MODES)}, got {d.fsync!r}")
    if d.enabled and Path(d.path).exists() and not Path(d.path).is_dir():
        raise ValueError(f"disk.path {d.path!r} exists and is not a directory")
    r = config.redis
    if r.enabled and not re.match(r"^(redis|rediss|unix)://", r.url):
        raise ValueError(f"redis.url must start with redis://, rediss:// or unix://, got {r.url!r}")
    for name in ("ttl_seconds", "max_bytes", "budget_s"):
        non_negative(f"redis.{name}", getattr(r, name))
    for name in (
        "socket_timeout_s",
        "connect_timeout_s",
        "pool_size",
        "breaker_threshold",
        "breaker_reset_s",
        "breaker_window_s",
        "breaker_min_calls",
    ):
        positive(f"redis.{name}", getattr(r, name))
    if not 0 < r.breaker_error_rate <= 1:
        raise ValueError(f"redis.breaker_error_rate must be in (0, 1], got {r.breaker_error_rate}")
    non_negative("redis.write_behind_max_bytes", r.write_behind_max_bytes)
    if r.budget_s and r.budget_s < r.connect_timeout_s + r.socket_timeout_s:
        raise ValueError(
            f"redis.budget_s ({r.budget_s}) must be 0 (auto) or >= redis.connect_timeout_s + "
            f"redis.socket_timeout_s ({r.connect_timeout_s + r.socket_timeout_s:g})"
        )
    if (
        r.enabled
        and r.cluster
        and (r.url.startswith("unix://") or "{" in r.key_prefix or "}" in r.key_prefix)
    ):
        raise ValueError(
            "redis.cluster needs a redis:// or rediss:// url and a key_prefix without '{' or '}'"
        )
    s3 = config.s3
    if s3.enabled and not s3.bucket:
        raise ValueError("s3.bucket must be set when s3.enabled is true")
    if s3.bucket and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", s3.bucket):
        raise ValueError(
            f"s3.bucket {s3.bucket!r} is not a bucket name (up to 63 characters of [A-Za-z0-9._-]; "
            "AWS itself wants 3-63 of [a-z0-9.-])"
        )
    if s3.endpoint_url and not re.match(r"^https?://", s3.endpoint_url):
        raise ValueError(f"s3.endpoint_url must start with http:// or https://, got {s3.endpoint_url!r}")
    if (s3.access_key_id is None) != (s3.secret_access_key is None):
        raise ValueError("s3.access_key_id and s3.secret_access_key must be set together")
    non_negative("s3.max_bytes", s3.max_bytes)
    non_negative("s3.budget_s", s3.budget_s)
    for name in (
        "timeout_s",
        "connect_timeout_s",
        "max_concurrency",
        "multipart_threshold_bytes",
        "breaker_threshold",
        "breaker_reset_s",
        "breaker_window_s",
        "breaker_min_calls",
    ):
        positive(f"s3.{name}", getattr(s3, name))
    if not 0 < s3.breaker_error_rate <= 1:
        raise ValueError(f"s3.breaker_error_rate must be in (0, 1], got {s3.breaker_error_rate}")
    non_negative("s3.write_behind_max_bytes", s3.write_behind_max_bytes)
    if s3.budget_s and s3.budget_s < s3.connect_timeout_s + s3.timeout_s:
        raise ValueError(
            f"s3.budget_s ({s3.budget_s}) must be 0 (auto) or >= s3.connect_timeout_s + "
            f"s3.timeout_s ({s3.connect_timeout_s + s3.timeout_s:g})"
        )
    a = config.auth
    for token, name in a.tokens.items():
        if not isinstance(token, str) or not token or any(c.isspace() for c in token):
            raise ValueError("auth.tokens: a token is empty or contains whitespace (tokens are not shown)")
        tenant(f"auth.tokens[<token for {name!r}>]", name)
    if (a.tls_cert is None) != (a.tls_key is None):
        raise ValueError("auth.tls_cert and auth.tls_key must be set together")
    if a.tls_client_ca and not a.tls_cert:
        raise ValueError("auth.tls_client_ca needs auth.tls_cert and auth.tls_key (mutual TLS is TLS first)")
    for name in ("tls_cert", "tls_key", "tls_client_ca"):
        path = getattr(a, name)
        if path is not None and not path:
            raise ValueError(f"auth.{name} must not be empty (leave it out to turn it off)")
        if path and not Path(path).is_file():
            raise ValueError(f"auth.{name}: no such file {path!r}")
    check_tls_files(a)
    non_negative("quotas.default_max_bytes", config.quotas.default_max_bytes)
    for name, limit in config.quotas.per_tenant.items():
        tenant(f"quotas.per_tenant[{name!r}]", name)
        if isinstance(limit, bool) or not isinstance(limit, int):
            raise ValueError(f"quotas.per_tenant[{name!r}] must be a byte size, got {limit!r}")
        non_negative(f"quotas.per_tenant[{name!r}]", limit)
    if not config.metrics.host:
        raise ValueError("metrics.host must not be empty")
    port("metrics.port", config.metrics.port)


def check_tls_files(auth: AuthConfig) -> None:
    """Load the TLS files as the server will and match the key to the certificate.

    gRPC reads them only when it binds the port, and then reports any problem as a
    failure to listen (``cannot listen on ... is another server using the port?``),
    naming no file. Checking them here, with the stdlib's OpenSSL, turns a
    certificate that is not PEM, a key of another certificate, an encrypted key or
    an unusable CA file into one line naming the field, at start-up (exit 2).
    Only called with paths that exist (:func:`validate` checks that first).
    """
    import ssl

    def read(name: str) -> bytes:
        path = getattr(auth, name)
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise ValueError(f"auth.{name}: cannot read {path!r}: {exc.strerror or exc}") from None

    def certificates(name: str) -> None:
        path, data = getattr(auth, name), read(name)
        if b"-----BEGIN CERTIFICATE-----" not in data:
            raise ValueError(
                f"auth.{name}: {path!r} is not a PEM certificate (no '-----BEGIN CERTIFICATE-----' block)"
            )
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=data.decode("latin-1"))
        except (ssl.SSLError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or _one_line(exc)
            raise ValueError(f"auth.{name}: {path!r} holds no valid PEM certificate ({reason})") from None

    if auth.tls_cert and auth.tls_key:
        certificates("tls_cert")
        key = read("tls_key")
        if b"PRIVATE KEY-----" not in key:
            raise ValueError(
                f"auth.tls_key: {auth.tls_key!r} is not a PEM private key (no '-----BEGIN ... PRIVATE KEY-----' "
                "block)"
            )
        if b"ENCRYPTED" in key:
            raise ValueError(
                f"auth.tls_key: {auth.tls_key!r} is encrypted; gRPC needs an unencrypted PEM key "
                "(decrypt it, e.g. openssl pkey -in KEY -out KEY.plain, and protect the file instead)"
            )
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(auth.tls_cert, auth.tls_key)
        except ssl.SSLError as exc:
            if exc.reason == "KEY_VALUES_MISMATCH":
                raise ValueError(
                    f"auth.tls_key: {auth.tls_key!r} does not match the certificate of auth.tls_cert "
                    f"({auth.tls_cert!r}): it is the key of another certificate"
                ) from None
            raise ValueError(
                f"auth.tls_key: {auth.tls_key!r} is not a usable PEM private key for auth.tls_cert "
                f"({exc.reason or _one_line(exc)})"
            ) from None
    if auth.tls_client_ca:
        certificates("tls_client_ca")


# ---------------------------------------------------------------- parsing helpers

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)(b?)\s*$", re.IGNORECASE)
_SIZE_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_bytes(text: str | int) -> int:
    """``"2GiB"`` -> 2147483648. Binary units (KiB, MiB, GiB, TiB; also bare K, M, G, T)
    and decimal ones (KB, MB, GB, TB); a bare number is bytes."""
    if isinstance(text, bool):
        raise ValueError(f"not a byte size: {text!r}")
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ValueError(f"not a byte size: {text!r} (examples: 1048576, 64MiB, 2GiB, 500MB)")
    number, unit, binary, b = m.groups()
    power = _SIZE_POWERS[unit.lower()]
    base = 1000 if (unit and b and not binary) else 1024
    value = float(number) * base**power
    if value != int(value):
        raise ValueError(f"byte size {text!r} is not a whole number of bytes")
    return int(value)


def format_bytes(n: float) -> str:
    """Human-readable binary size, for tables and logs."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def _parse_bool(text: Any) -> bool:
    if isinstance(text, bool):
        return text
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r} (use true/false)")


def _parse_mapping(text: Any, value_type: type, secret_keys: bool = False) -> dict:
    """A mapping from a file (already a dict), JSON, or ``a=b,c=d`` text (env, flags).

    ``secret_keys``: the keys are secrets (auth.tokens), so errors name the entry by position.
    """
    if isinstance(text, (list, tuple, set)):
        raise ValueError("expected a mapping (key: value entries), got a list")
    if isinstance(text, Mapping):
        raw = dict(text)
    else:
        text = str(text).strip()
        if text.startswith("{"):
            raw = json.loads(text)
        else:
            raw = {}
            for item in filter(None, (p.strip() for p in text.split(","))):
                key, sep, value = item.partition("=")
                if not sep:
                    raise ValueError(f"expected key=value, got {item!r}")
                raw[key.strip()] = value.strip()
    out: dict = {}
    for n, (k, v) in enumerate(raw.items(), 1):
        k_shown = f"entry {n} (token not shown)" if secret_keys else f"entry [{str(k)!r}]"
        if v is None or isinstance(v, (dict, list, bool)):
            raise ValueError(f"{k_shown} needs a {'byte size' if value_type is int else 'string'} value")
        try:
            out[str(k)] = parse_bytes(v) if value_type is int else str(v)
        except ValueError as exc:
            raise ValueError(f"{k_shown}: {exc}") from None
    return out


def _coerce(section: str, name: str, hint: Any, value: Any) -> Any:
    """Turn a file/env/flag value into the field's type; byte sizes accept ``"2GiB"``."""
    where = f"{section}.{name}"
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    try:
        if origin in (types.UnionType, typing.Union):  # Optional[str]
            if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
                return None
            inner = next(a for a in args if a is not type(None))
            return _coerce(section, name, inner, value)
        if origin is dict:
            return _parse_mapping(value, args[1], secret_keys=where == "auth.tokens")
        if hint is bool:
            return _parse_bool(value)
        if hint is int:
            if name.endswith("bytes"):
                return parse_bytes(value)
            if isinstance(value, bool):
                raise ValueError("expected an integer")
            if isinstance(value, float) and not value.is_integer():
                raise ValueError("expected an integer")
            return int(value)
        if hint is float:
            return float(value)
        if hint is str:
            if isinstance(value, (dict, list)):
                raise ValueError("expected a string")
            return str(value)
    except (ValueError, TypeError, json.JSONDecodeError) as exc:
        if origin is dict:  # never echo a whole map: auth.tokens holds secrets
            raise ValueError(f"{where}: invalid mapping: {_one_line(exc)}") from None
        raise ValueError(f"{where}: invalid value {value!r}: {_one_line(exc)}") from None
    raise ValueError(f"{where}: unsupported type {hint!r}")  # pragma: no cover


def _field_hints(section_cls: type) -> dict[str, Any]:
    return typing.get_type_hints(section_cls)


def _apply(layers: dict[str, dict[str, Any]], section: str, name: str, value: Any, source: str) -> None:
    if section not in SECTIONS:
        raise ValueError(f"{source}: unknown config section {section!r} (known: {', '.join(SECTIONS)})")
    hints = _field_hints(SECTIONS[section])
    if name not in hints:
        raise ValueError(f"{source}: unknown field {section}.{name} (known: {', '.join(hints)})")
    layers.setdefault(section, {})[name] = _coerce(section, name, hints[name], value)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def read_config_file(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """Parse a YAML (.yaml/.yml) or TOML (.toml) file into ``{section: {field: value}}``."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"config file not found: {p}")
    text = p.read_text()
    if p.suffix == ".toml":
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"config file {p}: not valid TOML: {_one_line(exc)}") from None
    elif p.suffix in (".yaml", ".yml", ".json"):
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            problem = getattr(exc, "problem", None) or _one_line(exc)
            raise ValueError(f"config file {p}: not valid YAML{where}: {problem}") from None
    else:
        raise ValueError(f"config file {p}: use a .yaml, .yml or .toml file")
    if not isinstance(data, dict):
        raise ValueError(f"config file {p}: expected a mapping of sections at the top level")
    for section, values in data.items():
        if not isinstance(values, dict):
            raise ValueError(f"config file {p}: section {section!r} must be a mapping")
    return data


def env_overrides(environ: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """``KVSTORE_SECTION__FIELD=value`` variables as ``{section: {field: value}}``."""
    out: dict[str, dict[str, str]] = {}
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX) or "__" not in key:
            continue
        section, _, name = key[len(ENV_PREFIX) :].partition("__")
        out.setdefault(section.lower(), {})[name.lower()] = value
    return out


#: ``KVSTORE_*`` variables that clients, workers and tools read; they are not server config fields.
OTHER_ENV = frozenset(
    {
        "KVSTORE_TARGET",
        "KVSTORE_TOKEN",
        "KVSTORE_REPLICATION",
        "KVSTORE_WRITE_ACK",
        "KVSTORE_CODEC_THREADS",
        "KVSTORE_CODEC_KERNELS",
        "KVSTORE_WORKER_ROLE",
        "KVSTORE_HARNESS_KEY",
        "KVSTORE_VLLM_VENV",
    }
)


#: Variables Kubernetes puts in every pod for each Service (service links) whose name starts with
#: ``kvstore``, by name suffix and value: ``KVSTORE_SERVICE_HOST=10.0.0.1``,
#: ``KVSTORE_PORT=tcp://10.0.0.1:50051``, ``KVSTORE_HEADLESS_PORT_50051_TCP_PORT=50051``... The value
#: tells them from a mistyped field (``KVSTORE_SERVER_PORT=6000`` is no link of a "kvstore-server").
_SERVICE_LINKS = (
    (re.compile(r"_SERVICE_HOST$|_PORT_\d+_(?:TCP|UDP|SCTP)_ADDR$"), re.compile(r"^[0-9A-Fa-f.:]+$")),
    (re.compile(r"_SERVICE_PORT(?:_[A-Z0-9_]+)?$|_PORT_\d+_(?:TCP|UDP|SCTP)_PORT$"), re.compile(r"^\d+$")),
    (re.compile(r"_PORT_\d+_(?:TCP|UDP|SCTP)_PROTO$"), re.compile(r"^(?:tcp|udp|sctp)$")),
    (re.compile(r"_PORT(?:_\d+_(?:TCP|UDP|SCTP))?$"), re.compile(r"^(?:tcp|udp|sctp)://")),
)


def _service_link(key: str, value: str) -> bool:
    return any(name.search(key) and shape.match(value) for name, shape in _SERVICE_LINKS)


def env_warnings(environ: Mapping[str, str]) -> list[str]:
    """One line for each ``KVSTORE_*`` variable that names no config field and nothing else we read.

    ``KVSTORE_SERVER_PORT`` (one underscore) is not ``KVSTORE_SERVER__PORT``: it used to be
    ignored without a word, so a server came up on the default port. Variables with the
    double underscore are checked by :func:`load_config` (an unknown one is an error);
    these, without it, may belong to something else, so they are warnings, each naming
    the nearest valid variable when there is one. Kubernetes' service-link variables
    (``KVSTORE_SERVICE_HOST``, ``KVSTORE_PORT_50051_TCP``, ...) are not warned about.
    """
    valid = {
        f"{ENV_PREFIX}{section.upper()}__{name.upper()}": (section, name)
        for section, cls in SECTIONS.items()
        for name in _field_hints(cls)
    }
    out: list[str] = []
    for key in sorted(environ):
        if not key.startswith(ENV_PREFIX) or "__" in key or key in OTHER_ENV:
            continue
        if _service_link(key, environ[key]):
            continue
        rest = key[len(ENV_PREFIX) :]
        guess = next(
            (
                f"{ENV_PREFIX}{rest[:i]}__{rest[i + 1 :]}"
                for i, c in enumerate(rest)
                if c == "_" and f"{ENV_PREFIX}{rest[:i]}__{rest[i + 1 :]}".upper() in valid
            ),
            None,
        )
        if guess is None:
            close = difflib.get_close_matches(key.upper(), valid, n=1, cutoff=0.75)
            guess = close[0] if close else None
        hint = f"; did you mean {guess.upper()}?" if guess else ""
        out.append(
            f"environment variable {key} names no config field and is ignored (config fields are "
            f"{ENV_PREFIX}<SECTION>__<FIELD>, with a double underscore){hint}"
        )
    return out


def load_config(
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> StoreConfig:
    """Defaults < file < environment < ``overrides`` (``{"server.port": 6000}``, from CLI flags).

    ``environ=None`` reads ``os.environ``; pass ``{}`` to ignore the environment.
    """
    layers: dict[str, dict[str, Any]] = {}
    if path is not None:
        for section, values in read_config_file(path).items():
            for name, value in values.items():
                _apply(layers, section, name, value, f"config file {path}")
    env = os.environ if environ is None else environ
    for section, values in env_overrides(env).items():
        for name, value in values.items():
            _apply(
                layers,
                section,
                name,
                value,
                f"environment variable {ENV_PREFIX}{section.upper()}__{name.upper()}",
            )
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        section, _, name = dotted.partition(".")
        _apply(layers, section, name, value, f"override {dotted}")
    sections = {name: cls(**layers.get(name, {})) for name, cls in SECTIONS.items()}
    return StoreConfig(**sections)


def config_as_dict(config: StoreConfig, redact: bool = True) -> dict[str, Any]:
    """Plain dict of the effective config, with secrets redacted, for logs and ``--print-config``."""
    data = dataclasses.asdict(config)
    if redact:
        data["auth"]["tokens"] = {f"***{i}": t for i, t in enumerate(data["auth"]["tokens"].values())}
        if data["s3"]["secret_access_key"]:
            data["s3"]["secret_access_key"] = "***"
    return data
