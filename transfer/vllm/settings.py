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

DEFAULTS: dict[str, Any] = {
    "target": "127.0.0.1:50051",  # host:port of a kvstore server
    "token": None,  # bearer token of the tenant, if the server requires one
    "tenant": "default",
    "profile": "lossless",  # codec profile: lossless, int8, balanced, dense
    "chunk_blocks": 2,  # vLLM blocks per stored chunk
    "replication": 2,  # copies per chunk on a replicated store (ignored for one host:port)
    "lookup_timeout_s": 2.0,  # the scheduler's one Lookup per request
    "load_timeout_s": 30.0,  # bound on a whole layer-wise load
    "save_timeout_s": 60.0,  # bound on wait_for_save
    "model_tag": None,  # overrides the model part of the namespace (e.g. a weights digest)
}


@dataclass(frozen=True)
class ConnectorSettings:
    """The connector's configuration, validated."""

    target: str
    token: str | None
    tenant: str
    profile: str
    chunk_blocks: int
    replication: int
    lookup_timeout_s: float
    load_timeout_s: float
    save_timeout_s: float
    model_tag: str | None

    @classmethod
    def from_extra(cls, extra: dict[str, Any] | None) -> ConnectorSettings:
        extra = dict(extra or {})
        unknown = sorted(set(extra) - set(DEFAULTS))
        if unknown:
            raise ValueError(
                f"kv_connector_extra_config: unknown key(s) {unknown}; known: {sorted(DEFAULTS)}"
            )
        merged = {**DEFAULTS, **extra}
        # Imported here, not at module level: transfer.codec loads numba, and a numba imported before
        # vLLM's worker has started breaks vLLM's kernel-registry scan (vLLM 0.32, CPU).
        from transfer.codec.profiles import PROFILES

        if merged["profile"] not in PROFILES:
            raise ValueError(
                f"kv_connector_extra_config.profile={merged['profile']!r}; choose one of {sorted(PROFILES)}"
            )
        for name in ("chunk_blocks", "replication"):
            if not isinstance(merged[name], int) or merged[name] < 1:
                raise ValueError(
                    f"kv_connector_extra_config.{name} must be an integer >= 1, got {merged[name]!r}"
                )
        for name in ("lookup_timeout_s", "load_timeout_s", "save_timeout_s"):
            merged[name] = float(merged[name])
            if merged[name] <= 0:
                raise ValueError(f"kv_connector_extra_config.{name} must be > 0")
        from transfer.membership import InvalidTarget, parse_target

        try:
            if not isinstance(merged["target"], str):
                raise InvalidTarget(f"a string is needed, got {type(merged['target']).__name__}")
            parse_target(merged["target"])
        except InvalidTarget as exc:
            raise ValueError(
                f"kv_connector_extra_config.target must be 'host:port', 'host:port,host:port,...' or "
                f"'dns:///name:port', got {merged['target']!r}: {exc}"
            ) from None
        Namespace(str(merged["tenant"]), "m", merged["profile"])  # validates the tenant's characters
        return cls(**merged)


@dataclass(frozen=True)
class EngineShape:
    """What makes KV of one engine usable by another."""

    architecture: str
    num_layers: int
    num_kv_heads: int  # per tensor-parallel rank
    head_dim: int
    kv_dtype: str  # e.g. "bfloat16"
    block_size: int
    model_name: str  # the served model's path or name, hashed into the fingerprint
    tp_rank: int = 0
    tp_size: int = 1


def _safe(text: str, limit: int) -> str:
    return re.sub(r"[^A-Za-z0-9._:-]", "-", text)[:limit]


def key_namespace(settings: ConnectorSettings, shape: EngineShape) -> Namespace:
    """Rank-free namespace the chunk keys are chained over."""
    digest = hashlib.blake2b(shape.model_name.encode(), digest_size=6).hexdigest()
    model = settings.model_tag or model_fingerprint(
        shape.architecture,
        shape.num_layers,
        shape.num_kv_heads * shape.tp_size,
        shape.head_dim,
        shape.kv_dtype,
        digest,
    )
    return Namespace(
        settings.tenant, _safe(f"{model}.bs{shape.block_size}x{settings.chunk_blocks}", 110), settings.profile
    )


def rank_namespace(settings: ConnectorSettings, shape: EngineShape, rank: int | None = None) -> Namespace:
    """Namespace one tensor-parallel rank stores its heads under."""
    base = key_namespace(settings, shape)
    r = shape.tp_rank if rank is None else rank
    return Namespace(base.tenant, f"{base.model}.tp{r}of{shape.tp_size}", base.profile)


def open_store(settings: ConnectorSettings) -> Any:
    """The one place the connector opens its store client: one server (``host:port``) or a
    replicated store (``a:p,b:p`` or ``dns:///name:port``, see :func:`transfer.cluster.connect`).

    One quick retry and the connector's own deadlines: a store that is down must cost the
    engine a miss, not seconds of backoff.
    """
    from transfer.client import RetryPolicy
    from transfer.cluster import connect

    return connect(
        settings.target,
        token=settings.token,
        replication=settings.replication,
        timeout_s=settings.lookup_timeout_s,
        stream_timeout_s=max(settings.load_timeout_s, settings.save_timeout_s),
        retry=RetryPolicy(max_attempts=2),
    )
