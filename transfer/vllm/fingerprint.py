"""A digest of a model's weights, so KV computed by other weights is never a hit.

The namespace already carries the model's shape and path, but a fine-tune or a
re-quantized checkpoint at the same path has the same shape: its KV would be
served to an engine whose weights differ, and the output would be silently
wrong. So the digest covers the *content* of every weight file.

Hashing a checkpoint costs one read of it (about 1 GB/s on one core); the result
is remembered in ``~/.cache/kvstore/fingerprints.json`` keyed by each file's path,
size and modification time, so an engine restart on the same files costs nothing.
Operators who know their weights better (or run a model too large to hash at
start) set ``weights_fingerprint`` to a string of their own instead of ``auto``.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".npz", ".msgpack", ".h5")
_CHUNK = 8 << 20
_lock = threading.Lock()


class FingerprintError(ValueError):
    """The weights could not be found to fingerprint; the message says what to set instead."""


def _cache_path() -> Path:
    root = os.environ.get("KVSTORE_CACHE_DIR") or os.path.join(Path.home(), ".cache", "kvstore")
    return Path(root) / "fingerprints.json"


def _file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def weight_files(model: str | os.PathLike[str]) -> list[Path]:
    """The weight files of a checkpoint directory (or the one file named)."""
    path = Path(model)
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    return []


def _resolve(model: str, revision: str | None) -> Path:
    path = Path(model)
    if path.exists():
        return path
    try:  # a hub name that is already in the local cache; never a download
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, revision=revision, local_files_only=True))
    except Exception as exc:
        raise FingerprintError(
            f"cannot find the weights of {model!r} locally to fingerprint them ({type(exc).__name__}); "
            "set kv_connector_extra_config.weights_fingerprint to a string that changes with the weights"
        ) from None


def weights_fingerprint(model: str, revision: str | None = None) -> str:
    """Hex digest of the content of every weight file of ``model`` (a path or a cached hub name)."""
    files = weight_files(_resolve(model, revision))
    if not files:
        raise FingerprintError(
            f"no weight files ({', '.join(WEIGHT_SUFFIXES)}) under {model!r}; "
            "set kv_connector_extra_config.weights_fingerprint"
        )
    with _lock:
        cache_file = _cache_path()
        try:
            cache: dict[str, str] = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            cache = {}
        total = hashlib.blake2b(digest_size=16)
        changed = False
        for f in files:
            st = f.stat()
            key = f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}"
            if key not in cache:
                cache[key] = _file_digest(f)
                changed = True
            total.update(f.name.encode() + b"\0" + cache[key].encode())
        if changed:
            try:
                cache_file.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(cache))
                os.replace(tmp, cache_file)
            except OSError:
                pass  # a cache we cannot write only costs a re-hash next start
    return total.hexdigest()
