"""The model runner: prefill of an uncached suffix on top of reused KV, and greedy decode.

Both workers and the local reference go through the same few methods, so a
disaggregated run and a local one execute the *same* forward passes and can be
compared token for token:

* a prompt of ``N`` tokens is computed in at most two forwards, split at the
  *reuse boundary* ``B = ((N - 1) // chunk_tokens) * chunk_tokens``: first
  ``[past, B)`` (the uncached full chunks), then the tail ``[B, N)``. The tail
  is never empty, so whoever holds the stored prefix ``[0, B)`` can recompute
  it and get the last position's logits without storing a partial chunk;
* decoding feeds one token at a time into a transformers cache and takes the
  argmax (greedy), stopping at an end-of-sequence token or a length limit.

The runner never touches the store; :mod:`workers.prefill` and
:mod:`workers.decode` add that.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kvstore.keys import DEFAULT_CHUNK_TOKENS, model_fingerprint
from workers.model import KVShape, cache_to_layers, kv_shape, layers_to_cache, load_model

if TYPE_CHECKING:  # annotations only: importing the codec loads numba, which workers defer
    from transfer.codec import LayerKV


def reuse_boundary(num_tokens: int, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> int:
    """Tokens of a prompt that may come from the store: whole chunks, leaving at least one token.

    The last prompt token must be run through the model to get the logits of the
    first generated token, so a prompt that is an exact multiple of
    ``chunk_tokens`` reuses one chunk less than it stores.
    """
    if num_tokens < 1:
        raise ValueError("a prompt needs at least one token")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    return ((num_tokens - 1) // chunk_tokens) * chunk_tokens


def chat_prompt_ids(tokenizer: Any, system: str, *user_parts: str) -> list[int]:
    """A ChatML prompt built piece by piece.

    Prompts that share a system prompt and leading user parts then share their
    leading token ids exactly; tokenising the whole string at once could merge
    tokens across a part boundary and break the shared prefix.
    """

    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    ids = encode(f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n")
    for part in user_parts:
        ids += encode(part)
    return ids + encode("<|im_end|>\n<|im_start|>assistant\n")


@dataclass
class PrefillOutput:
    """A prompt run through the model: its full cache and the greedy next token."""

    cache: Any
    logits: torch.Tensor  # [vocab] of the last prompt position, fp32
    first_token: int
    num_computed: int  # prompt tokens that went through the model (not reused)


def _weights_digest(path: Path | None) -> str:
    """Cheap, stable identity of a checkpoint: its config and the size of every weights file."""
    if path is None or not path.is_dir():
        return ""
    h = hashlib.blake2b(digest_size=8)
    config = path / "config.json"
    if config.is_file():
        h.update(config.read_bytes())
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()


class ModelRunner:
    """A HF causal LM on one device, with the forward passes the workers need.

    ``model_path`` is any local HF model directory; ``None`` is the bundled
    SmolLM2-135M-Instruct. ``num_threads`` pins torch's intra-op threads (a Ray
    actor should use the CPUs it was given, not every core of the machine).
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        *,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        num_threads: int | None = None,
        model: Any = None,
        tokenizer: Any = None,
    ) -> None:
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        # Dequantised GGUF weights yield subnormal activations that are ~100x slower on x86 FPUs;
        # flushing them to zero changes no greedy token and makes prefill several times faster.
        torch.set_flush_denormal(True)
        if model is None or tokenizer is None:
            model, tokenizer = load_model(model_path, dtype=dtype, device=device)
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.shape: KVShape = kv_shape(model)
        src = Path(model_path) if model_path is not None else getattr(model, "name_or_path", None)
        arch = (model.config.architectures or [type(model).__name__])[0]
        self.fingerprint = model_fingerprint(
            arch,
            self.shape.num_layers,
            self.shape.num_kv_heads,
            self.shape.head_dim,
            str(dtype).removeprefix("torch."),
            _weights_digest(Path(src) if src else None),
        )
        eos = tokenizer.eos_token_id
        self.stop_ids: frozenset[int] = frozenset([eos] if isinstance(eos, int) else (eos or []))

    def warm_up(self, profiles: Sequence[str], chunk_tokens: int = 256) -> float:
        """Compile or load the codec kernels of ``profiles`` for this model's layer shape and run one
        short forward pass; returns the seconds it took. Callers that time requests call it first,
        so no timed request pays a one-off compilation (see transfer.codec.warmup)."""
        from transfer.codec.warmup import warm_up

        started = time.perf_counter()
        warm_up(
            profiles,
            heads=self.shape.num_kv_heads,
            head_dim=self.shape.head_dim,
            chunk_tokens=chunk_tokens,
            num_layers=min(2, self.shape.num_layers),
        )
        self.prefill(self.encode("Warm-up."))
        return time.perf_counter() - started

    # -- prompts -----------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with no special tokens added."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def chat_ids(self, system: str, *user_parts: str) -> list[int]:
        return chat_prompt_ids(self.tokenizer, system, *user_parts)

    def decode_text(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    # -- forward passes ----------------------------------------------------------------------------

    def empty_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def cache_from_layers(self, layers: Sequence[LayerKV]) -> Any:
        return layers_to_cache(list(layers), self.model.config)

    @staticmethod
    def cache_layers(cache: Any) -> list[LayerKV]:
        return cache_to_layers(cache)

    @torch.inference_mode()
    def forward(self, token_ids: Sequence[int], cache: Any) -> torch.Tensor:
        """Run ``token_ids`` after what ``cache`` holds (extending it); logits of the last position."""
        if not token_ids:
            raise ValueError("forward needs at least one token")
        ids = torch.tensor([list(token_ids)], dtype=torch.long, device=self.device)
        out = self.model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1].float()

    def prefill(
        self,
        token_ids: Sequence[int],
        cache: Any = None,
        *,
        past_tokens: int = 0,
        boundary: int | None = None,
    ) -> PrefillOutput:
        """Complete the cache of a prompt whose first ``past_tokens`` are already in ``cache``.

        Runs ``[past_tokens, boundary)`` then ``[max(past_tokens, boundary), N)``
        (see the module docstring); ``boundary`` defaults to no split.
        """
        n = len(token_ids)
        if not 0 <= past_tokens < n:
            raise ValueError(f"past_tokens={past_tokens} must leave at least one of {n} tokens to run")
        cache = self.empty_cache() if cache is None else cache
        have = cache.get_seq_length()
        if have != past_tokens:
            raise ValueError(f"cache holds {have} tokens, expected past_tokens={past_tokens}")
        split = past_tokens if boundary is None else max(past_tokens, min(boundary, n - 1))
        if split > past_tokens:
            self.forward(token_ids[past_tokens:split], cache)
        logits = self.forward(token_ids[split:], cache)
        return PrefillOutput(cache, logits, int(torch.argmax(logits)), n - past_tokens)

    @torch.inference_mode()
    def iter_decode(
        self, cache: Any, first_token: int, max_new_tokens: int, stop_ids: frozenset[int] | None = None
    ) -> Iterator[int]:
        """Greedy continuation: yields ``first_token`` then each next token, extending ``cache``.

        Stops after ``max_new_tokens`` tokens or right after yielding a stop token.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        stop = self.stop_ids if stop_ids is None else stop_ids
        token = first_token
        for produced in range(1, max_new_tokens + 1):
            yield token
            if token in stop or produced == max_new_tokens:
                return
            token = int(torch.argmax(self.forward([token], cache)))

    def generate(
        self, token_ids: Sequence[int], max_new_tokens: int, *, chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    ) -> list[int]:
        """Local reference: prefill and greedy decode in this process, no store.

        Splits the prompt at the same reuse boundary the workers use, so its
        forward passes match a disaggregated run's exactly.
        """
        out = self.prefill(token_ids, boundary=reuse_boundary(len(token_ids), chunk_tokens))
        return list(self.iter_decode(out.cache, out.first_token, max_new_tokens))

    @torch.inference_mode()
    def teacher_forced_top1(self, prompt_ids: Sequence[int], generated: Sequence[int]) -> float:
        """Share of ``generated`` that equals this model's own argmax given the same history.

        Scores a run that used lossy KV: each generated token is checked against
        what exact local computation predicts after the same prefix, so a single
        disagreement does not cascade into every later position.
        """
        if not generated:
            raise ValueError("nothing generated to score")
        ids = torch.tensor([list(prompt_ids) + list(generated[:-1])], dtype=torch.long, device=self.device)
        logits = self.model(input_ids=ids, use_cache=False, logits_to_keep=len(generated)).logits[0]
        predicted = torch.argmax(logits, dim=-1).tolist()
        return sum(int(p == g) for p, g in zip(predicted, generated, strict=True)) / len(generated)
