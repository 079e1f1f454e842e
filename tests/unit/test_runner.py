"""The model runner on the real SmolLM2 model: split prefill, reuse of a restored cache, greedy decode.

Also the driver's routing pool, which needs no Ray to test (it only counts).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from workers.pipeline import WorkerPool
from workers.runner import ModelRunner, PrefillOutput, chat_prompt_ids, reuse_boundary

CHUNK = 16
NEW = 6
SYSTEM = "You are a concise assistant. Answer in one short sentence."
DOC = (
    "The kvstore service keeps the attention key and value cache of a language model so that a "
    "prompt prefix computed once can be reused by later requests on other machines."
)


@pytest.fixture(scope="module")
def runner(smollm2: tuple[Any, Any]) -> Iterator[ModelRunner]:
    threads = torch.get_num_threads()
    yield ModelRunner(num_threads=1, model=smollm2[0], tokenizer=smollm2[1])
    torch.set_num_threads(threads)  # the runner pins threads process-wide; give later tests theirs back


@pytest.fixture(scope="module")
def prompt(runner: ModelRunner) -> list[int]:
    return runner.chat_ids(SYSTEM, DOC, "\n\nQuestion: What does kvstore keep?")


@pytest.fixture(scope="module")
def reference(runner: ModelRunner, prompt: list[int]) -> tuple[PrefillOutput, list[int]]:
    """One full prefill (split at the reuse boundary) and the local greedy continuation from it."""
    full = runner.prefill(prompt, boundary=reuse_boundary(len(prompt), CHUNK))
    tokens = list(runner.iter_decode(clone_cache(runner, full.cache, len(prompt)), full.first_token, NEW))
    return full, tokens


def clone_cache(runner: ModelRunner, cache: object, tokens: int) -> object:
    """A fresh cache holding copies of the first ``tokens`` positions, as a store round trip would."""
    layers = [(k[:, :tokens].clone(), v[:, :tokens].clone()) for k, v in runner.cache_layers(cache)]
    return runner.cache_from_layers(layers)


def test_reuse_boundary_leaves_a_tail() -> None:
    assert reuse_boundary(1, 16) == 0
    assert reuse_boundary(16, 16) == 0
    assert reuse_boundary(17, 16) == 16
    assert reuse_boundary(32, 16) == 16
    assert reuse_boundary(33, 16) == 32
    with pytest.raises(ValueError):
        reuse_boundary(0, 16)
    with pytest.raises(ValueError):
        reuse_boundary(10, 0)


@pytest.mark.slow
def test_chat_prompts_share_their_prefix(runner: ModelRunner) -> None:
    a = chat_prompt_ids(runner.tokenizer, SYSTEM, DOC, "\n\nQuestion: one?")
    b = chat_prompt_ids(runner.tokenizer, SYSTEM, DOC, "\n\nQuestion: two, longer?")
    head = chat_prompt_ids(runner.tokenizer, SYSTEM, DOC)
    shared = len(head) - len(runner.encode("<|im_end|>\n<|im_start|>assistant\n"))
    assert a[:shared] == b[:shared] == head[:shared]
    assert a != b
    assert runner.decode_text(a).startswith("system\n" + SYSTEM)


@pytest.mark.slow
def test_prefill_on_restored_prefix_matches_full_prefill(
    runner: ModelRunner, prompt: list[int], reference: tuple[PrefillOutput, list[int]]
) -> None:
    full, _ = reference
    boundary = reuse_boundary(len(prompt), CHUNK)
    assert boundary >= 2 * CHUNK  # the prompt spans several chunks
    assert full.num_computed == len(prompt)
    resumed = runner.prefill(
        prompt, clone_cache(runner, full.cache, boundary), past_tokens=boundary, boundary=boundary
    )
    assert resumed.num_computed == len(prompt) - boundary
    assert resumed.first_token == full.first_token
    # Same forward passes on the same numbers: bit-identical logits.
    assert torch.equal(resumed.logits, full.logits)
    # Reusing only part of the prefix (an earlier chunk boundary) runs the rest, same result.
    mid = runner.prefill(prompt, clone_cache(runner, full.cache, CHUNK), past_tokens=CHUNK, boundary=boundary)
    assert mid.num_computed == len(prompt) - CHUNK
    assert torch.equal(mid.logits, full.logits)


@pytest.mark.slow
def test_decode_from_restored_cache_equals_local_generate(
    runner: ModelRunner, prompt: list[int], reference: tuple[PrefillOutput, list[int]]
) -> None:
    full, local = reference
    assert 1 <= len(local) <= NEW
    boundary = reuse_boundary(len(prompt), CHUNK)
    out = runner.prefill(
        prompt, clone_cache(runner, full.cache, boundary), past_tokens=boundary, boundary=boundary
    )
    assert list(runner.iter_decode(out.cache, out.first_token, NEW)) == local
    assert runner.generate(prompt, 2, chunk_tokens=CHUNK) == local[:2]


@pytest.mark.slow
def test_decode_stops_at_limit_and_stop_token(
    runner: ModelRunner, prompt: list[int], reference: tuple[PrefillOutput, list[int]]
) -> None:
    full, local = reference
    cache = clone_cache(runner, full.cache, len(prompt))
    assert list(runner.iter_decode(cache, full.first_token, 1, stop_ids=frozenset())) == [full.first_token]
    assert list(runner.iter_decode(cache, full.first_token, 5, stop_ids=frozenset([full.first_token]))) == [
        full.first_token
    ]
    with pytest.raises(ValueError):
        list(runner.iter_decode(cache, full.first_token, 0))


@pytest.mark.slow
def test_teacher_forced_top1(
    runner: ModelRunner, prompt: list[int], reference: tuple[PrefillOutput, list[int]]
) -> None:
    _, local = reference
    assert len(local) >= 2
    assert runner.teacher_forced_top1(prompt, local) == 1.0
    bad = local[:1] + [(t + 1) % runner.model.config.vocab_size for t in local[1:]]
    assert runner.teacher_forced_top1(prompt, bad) == pytest.approx(1 / len(local))


@pytest.mark.slow
def test_prefill_rejects_inconsistent_inputs(runner: ModelRunner, prompt: list[int]) -> None:
    with pytest.raises(ValueError):
        runner.prefill(prompt, past_tokens=len(prompt))
    with pytest.raises(ValueError):  # cache is empty but the caller claims a reused prefix
        runner.prefill(prompt, runner.empty_cache(), past_tokens=CHUNK)
    with pytest.raises(ValueError):
        runner.forward([], runner.empty_cache())


@pytest.mark.slow
def test_demo_prompts_share_long_prefixes(runner: ModelRunner) -> None:
    from workers.demo import build_prompts, parse_args

    args = parse_args(["--size", "small", "--profiles", "lossless, balanced"])
    assert (args.docs, args.questions, args.profiles) == (2, 2, ["lossless", "balanced"])
    prompts = build_prompts(runner.tokenizer, args.docs, args.questions)
    assert [p.document for p in prompts] == ["doc_apache.txt"] * 2 + ["doc_bsd.txt"] * 2
    same_doc = common_prefix(prompts[0].token_ids, prompts[1].token_ids)
    other_doc = common_prefix(prompts[1].token_ids, prompts[2].token_ids)
    assert same_doc > 0.8 * len(prompts[1].token_ids)  # system prompt + document
    assert 128 <= other_doc < same_doc  # the system prompt alone fills a 128-token chunk


def common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_pool_least_loaded_and_round_robin() -> None:
    pool = WorkerPool(["a", "b", "c"])
    first = [pool.acquire() for _ in range(3)]
    assert sorted(first) == [0, 1, 2]  # idle pool: spread, not piled on one actor
    pool.release(1)
    assert pool.acquire() == 1  # the only one with nothing in flight
    rr = WorkerPool(["a", "b"], routing="round_robin")
    assert [rr.acquire() for _ in range(4)] == [0, 1, 0, 1]
    with pytest.raises(ValueError):
        WorkerPool([])
    with pytest.raises(ValueError):
        WorkerPool(["a"], routing="random")
