"""Typed settings of the vLLM connector, its namespaces, and how it reaches the store.

Everything an operator sets lives in ``kv_transfer_config.kv_connector_extra_config``;
:meth:`ConnectorSettings.from_extra` validates it once at start-up so a typo is a
clear error at engine start, not a silent miss at request time.

Keys and namespaces: vLLM KV is only reusable by an engine with the same model,
KV dtype, block layout and tensor-parallel shard, so all of them go into the
namespace. Chunk keys (:func:`kvstore.keys.chunk_keys`) are chained over a
rank-free namespace (tenant / model+dtype+block size / profile), computed once by
the scheduler; each worker stores under its own rank's namespace, so two ranks
(or two incompatible engines) never read each other's blocks.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from kvstore.keys import Namespace, model_fingerprint

#: The codec's profile names, kept here so settings can be checked without importing the codec
#: (it loads numba, which must not load before vLLM's worker starts); a test keeps them equal.
PROFILE_NAMES = ("balanced", "dense", "int8", "lossless")
LOAD_MODES = ("layerwise", "async")
#: Stored chunks hold about this many tokens when ``chunk_blocks`` is not set (16 blocks of 16 on GPU
#: backends, 2 of 128 on the CPU backend): small chunks cost a store record per layer each.
CHUNK_TOKENS = 256

DEFAULTS: dict[str, Any] = {
    "target": "127.0.0.1:50051",  # host:port, a member list, or dns:///name:port
    "token": None,  # bearer token of the tenant, if the server requires one
    "tenant": "default",
    "profile": "lossless",  # codec profile: lossless, int8, balanced, dense
    "chunk_blocks": None,  # vLLM blocks per stored chunk (default: CHUNK_TOKENS // block_size)
    "replication": 2,  # copies per chunk on a replicated store (ignored for one host:port)
    "load_mode": "layerwise",  # layerwise: in the step, layer by layer; async: outside the step
    "lookup_timeout_s": 2.0,  # the scheduler's one Lookup per request
    "load_timeout_s": 30.0,  # bound on a whole load
    "save_timeout_s": 60.0,  # bound on wait_for_save
    "model_tag": None,  # overrides the model part of the namespace (e.g. to share KV between two paths)
    "weights_fingerprint": "auto",  # auto: digest of the checkpoint's weight files; or a string of yours
    "require_store": False,  # True: refuse to start when the store does not answer at start
}

_KEY = "kv_connector_extra_config"
_NAME_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def _fail(name: str, value: Any, rule: str) -> ValueError:
    return ValueError(f"{_KEY}.{name}={value!r}: {rule}")


@dataclass(frozen=True)
class ConnectorSettings:
    """The connector's configuration, validated once, where it is read."""

    target: str
    token: str | None
    tenant: str
    profile: str
    chunk_blocks: int | None
    replication: int
    load_mode: str
    lookup_timeout_s: float
    load_timeout_s: float
    save_timeout_s: float
    model_tag: str | None
    weights_fingerprint: str
    require_store: bool

    @classmethod
    def from_extra(cls, extra: dict[str, Any] | None) -> ConnectorSettings:
        """Every key checked here, each error naming its key; nothing is imported or contacted."""
        extra = dict(extra or {})
        unknown = sorted(set(extra) - set(DEFAULTS))
        if unknown:
            raise ValueError(f"{_KEY}: unknown key(s) {unknown}; known: {sorted(DEFAULTS)}")
        m = {**DEFAULTS, **extra}
        if m["profile"] not in PROFILE_NAMES:
            raise _fail("profile", m["profile"], f"choose one of {list(PROFILE_NAMES)}")
        if m["load_mode"] not in LOAD_MODES:
            raise _fail("load_mode", m["load_mode"], f"choose one of {list(LOAD_MODES)}")
        for name in ("chunk_blocks", "replication"):
            value = m[name]
            if name == "chunk_blocks" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise _fail(name, value, "must be an integer >= 1")
        for name in ("lookup_timeout_s", "load_timeout_s", "save_timeout_s"):
            value = m[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise _fail(name, value, "must be a number of seconds > 0")
            m[name] = float(value)
        if not isinstance(m["require_store"], bool):
            raise _fail("require_store", m["require_store"], "must be true or false")
        for name in ("token", "model_tag"):
            if m[name] is not None and (not isinstance(m[name], str) or not m[name]):
                raise _fail(name, m[name], "must be a non-empty string or absent")
        if m["model_tag"] is not None and not re.fullmatch(r"[A-Za-z0-9._:-]{1,80}", m["model_tag"]):
            raise _fail("model_tag", m["model_tag"], "1-80 characters of [A-Za-z0-9._:-]")
        if not isinstance(m["tenant"], str) or not _NAME_RE.fullmatch(m["tenant"]):
            raise _fail("tenant", m["tenant"], "1-64 characters of [A-Za-z0-9._:-]")
        fp = m["weights_fingerprint"]
        if not isinstance(fp, str) or not re.fullmatch(r"[A-Za-z0-9._:-]{1,64}", fp):
            raise _fail("weights_fingerprint", fp, "'auto' or 1-64 characters of [A-Za-z0-9._:-]")
        _check_target(m["target"])
        return cls(**m)

    def chunk_blocks_for(self, block_size: int) -> int:
        """Blocks per stored chunk for an engine with ``block_size``-token blocks."""
        return self.chunk_blocks or max(1, CHUNK_TOKENS // block_size)


def _check_target(target: Any) -> None:
    from transfer.replicas.membership import InvalidTarget, parse_target

    rule = "must be 'host:port', 'host:port,host:port,...' or 'dns:///name:port'"
    if not isinstance(target, str):
        raise _fail("target", target, f"{rule} (a string)")
    if "://" in target.replace("dns:///", ""):
        raise _fail("target", target, f"{rule}; no URL scheme (gRPC is spoken, not HTTP)")
    try:
        parse_target(target)
    except InvalidTarget as exc:
        raise _fail("target", target, f"{rule}: {exc}") from None


@dataclass(frozen=True)
class EngineShape:
    """What makes KV of one engine usable by another."""

    architecture: str
    num_layers: int
    num_kv_heads: int  # per tensor-parallel rank (1 for an MLA latent)
    head_dim: int  # of K and V; the latent's width for MLA
    kv_dtype: str  # e.g. "bfloat16"
    block_size: int
    model_name: str  # the served model's path or name, hashed into the fingerprint
    tp_rank: int = 0
    tp_size: int = 1
    weights: str = ""  # digest of the weights (transfer.vllm.fingerprint), or the operator's string
    mla: bool = False  # one latent per token, the same on every rank


def _safe(text: str, limit: int) -> str:
    return re.sub(r"[^A-Za-z0-9._:-]", "-", text)[:limit]


def key_namespace(settings: ConnectorSettings, shape: EngineShape) -> Namespace:
    """Rank-free namespace the chunk keys are chained over.

    The weights digest is part of it whatever ``model_tag`` says: KV computed by other
    weights must never be a hit, and the shape alone does not see a fine-tune.
    """
    digest = hashlib.blake2b(shape.model_name.encode(), digest_size=6).hexdigest()
    heads = shape.num_kv_heads if shape.mla else shape.num_kv_heads * shape.tp_size
    arch = f"{shape.architecture}-mla" if shape.mla else shape.architecture
    model = model_fingerprint(arch, shape.num_layers, heads, shape.head_dim, shape.kv_dtype, digest)
    if settings.model_tag:
        model = settings.model_tag
    weights = hashlib.blake2b(shape.weights.encode(), digest_size=5).hexdigest()
    blocks = settings.chunk_blocks_for(shape.block_size)
    return Namespace(
        settings.tenant, _safe(f"{model}.w{weights}.bs{shape.block_size}x{blocks}", 110), settings.profile
    )


def rank_namespace(settings: ConnectorSettings, shape: EngineShape, rank: int | None = None) -> Namespace:
    """Namespace one tensor-parallel rank stores its heads under (an MLA latent: one for all ranks)."""
    base = key_namespace(settings, shape)
    if shape.mla:
        return Namespace(base.tenant, f"{base.model}.latent", base.profile)
    r = shape.tp_rank if rank is None else rank
    return Namespace(base.tenant, f"{base.model}.tp{r}of{shape.tp_size}", base.profile)


def open_store(settings: ConnectorSettings) -> Any:
    """The one place the connector opens its store client: one server (``host:port``) or a
    replicated store (``a:p,b:p`` or ``dns:///name:port``, see :func:`transfer.replicas.client.connect`).

    One quick retry and the connector's own deadlines: a store that is down must cost the
    engine a miss, not seconds of backoff.
    """
    from transfer.replicas.client import connect
    from transfer.rpc.client import RetryPolicy

    return connect(
        settings.target,
        token=settings.token,
        replication=settings.replication,
        timeout_s=settings.lookup_timeout_s,
        stream_timeout_s=max(settings.load_timeout_s, settings.save_timeout_s),
        retry=RetryPolicy(max_attempts=2),
    )


if __name__ == "__main__":  # a pre-flight check: python -m transfer.vllm.settings '{"target": ...}'
    import json
    import sys

    try:
        print(ConnectorSettings.from_extra(json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}))
    except ValueError as exc:
        sys.exit(f"error: {exc}")
