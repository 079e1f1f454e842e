"""End to end: real Ray actors, a real kvstore server over gRPC, the real SmolLM2 model.

One Ray, one server and one pipeline (one prefill and one decode actor) serve the
whole module; the local reference runs the same runner in this process without
the store, splitting the prompt at the same boundary (like with like).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from tests.fixtures.store import store_config
from transfer.rpc.client import KVClient
from workers.decode import TokenEvent
from workers.pipeline import Pipeline, RequestResult, init_ray, shutdown_ray
from workers.prefill import PrefillRequest, WorkerConfig
from workers.runner import ModelRunner, chat_prompt_ids, reuse_boundary

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

CHUNK = 32
MAX_NEW = 12
MAX_NEW_LOSSY = 24  # a bigger sample: at 97% one disagreement in ~33 tokens decides pass or fail
SYSTEM = (
    "You are a careful assistant that answers questions about the document the user gives you. "
    "Answer in one short sentence using only facts from the document."
)
DOC = (
    "Redistribution and use in source and binary forms, with or without modification, are permitted "
    "provided that the following conditions are met: redistributions of source code must retain the "
    "above copyright notice, this list of conditions and the following disclaimer; redistributions in "
    "binary form must reproduce the above copyright notice in the documentation and other materials "
    "provided with the distribution; and neither the name of the University nor the names of its "
    "contributors may be used to endorse or promote products derived from this software without "
    "specific prior written permission."
)
QUESTIONS = (
    "What must redistributions of source code retain?",
    "May the name of the University be used to promote products?",
    "What must binary redistributions reproduce?",
)


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    # Ray forks its daemons at init; doing that before this process runs a gRPC server keeps
    # gRPC's fork handlers out of the way (otherwise Ray's dashboard process aborts).
    init_ray(num_cpus=2)
    yield
    shutdown_ray()


@pytest.fixture(scope="module")
def server(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from kvstore.server import serve

    handle = serve(store_config(tmp_path_factory.mktemp("e2e-store")))
    yield handle
    handle.stop(grace=0)


@pytest.fixture(scope="module")
def stack(server: object, smollm2: tuple[Any, Any]) -> Iterator[tuple[Pipeline, ModelRunner]]:
    """The pipeline's actors load the model while this process wraps the session's copy."""
    config = WorkerConfig(store_target=server.target, profile="lossless", tenant="e2e", chunk_tokens=CHUNK)
    pipe = Pipeline(config, num_prefill=1, num_decode=1)
    threads = torch.get_num_threads()
    try:
        local = ModelRunner(num_threads=1, model=smollm2[0], tokenizer=smollm2[1])
        pipe.wait_ready(timeout_s=600)
        yield pipe, local
    finally:
        pipe.shutdown()
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipeline(stack: tuple[Pipeline, ModelRunner]) -> Pipeline:
    return stack[0]


@pytest.fixture(scope="module")
def local(stack: tuple[Pipeline, ModelRunner]) -> ModelRunner:
    return stack[1]


def prompt(runner: ModelRunner, question: str) -> tuple[int, ...]:
    return tuple(chat_prompt_ids(runner.tokenizer, SYSTEM, DOC, f"\n\nQuestion: {question}"))


def common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def run(
    pipe: Pipeline, request: PrefillRequest, max_new: int = MAX_NEW
) -> tuple[RequestResult, list[TokenEvent]]:
    events: list[TokenEvent] = []
    result = pipe.generate(request, max_new, on_token=events.append)
    return result, events


def test_lossless_disaggregated_generation_equals_local(
    pipeline: Pipeline, local: ModelRunner, server: object
) -> None:
    ids = prompt(local, QUESTIONS[0])
    result, events = run(pipeline, PrefillRequest("lossless-0", ids))
    h, s = result.handle, result.summary
    assert h.num_cached_tokens == 0 and h.num_prefilled_tokens == len(ids)  # a cold store
    assert h.num_stored_chunks == len(ids) // CHUNK and h.stored_bytes > 0
    assert s.num_fetched_tokens == reuse_boundary(len(ids), CHUNK)  # decode read the prefix from the store
    assert s.num_recomputed_tokens == len(ids) - s.num_fetched_tokens
    assert s.first_token_match
    # Streaming delivered every token, in order, before the summary.
    assert [e.token for e in events] == list(s.tokens)
    assert [e.index for e in events] == list(range(len(events)))
    assert list(s.tokens) == local.generate(ids, MAX_NEW, chunk_tokens=CHUNK)
    with KVClient(server.target) as client:
        assert client.lookup(h.namespace, list(h.keys), local.shape.num_layers) == len(h.keys)


def test_shared_prefix_is_reused_and_output_unchanged(pipeline: Pipeline, local: ModelRunner) -> None:
    first, second = prompt(local, QUESTIONS[0]), prompt(local, QUESTIONS[1])
    pipeline.prefill(PrefillRequest("seed", first))  # no-op if the previous test stored it already
    result, _ = run(pipeline, PrefillRequest("lossless-1", second))
    h = result.handle
    shared = min(common_prefix(first, second) // CHUNK * CHUNK, reuse_boundary(len(second), CHUNK))
    assert shared >= 4 * CHUNK  # the system prompt and the document
    assert h.num_cached_tokens == shared
    assert h.num_prefilled_tokens == len(second) - shared < len(second)
    assert result.summary.first_token_match
    assert list(result.summary.tokens) == local.generate(second, MAX_NEW, chunk_tokens=CHUNK)
    # Reuse paid off in compute: the worker ran the model on the suffix only.
    again = pipeline.prefill(PrefillRequest("lossless-1-again", second))
    assert again.num_cached_tokens == reuse_boundary(len(second), CHUNK)
    assert again.num_stored_chunks == 0


def test_balanced_profile_top1_agreement(pipeline: Pipeline, local: ModelRunner) -> None:
    """Teacher-forced: each token the disaggregated run produced on lossy KV is checked against the
    exact local model's argmax after the same history, so one disagreement does not cascade."""
    agree = total = 0
    cached = []
    for i, question in enumerate(QUESTIONS):
        ids = prompt(local, question)
        result, _ = run(pipeline, PrefillRequest(f"balanced-{i}", ids, profile="balanced"), MAX_NEW_LOSSY)
        assert result.handle.namespace.endswith("/balanced")
        cached.append(result.handle.num_cached_tokens)
        tokens = list(result.summary.tokens)
        agree += round(local.teacher_forced_top1(ids, tokens) * len(tokens))
        total += len(tokens)
    assert cached[0] == 0 and all(c > 0 for c in cached[1:])  # later questions ran on lossy reused KV
    rate = agree / total
    print(f"balanced: top-1 agreement {agree}/{total} = {rate:.3f}")
    assert rate >= 0.97


def test_direct_handoff_of_object_refs_matches_store_path(pipeline: Pipeline, local: ModelRunner) -> None:
    ids = prompt(local, QUESTIONS[2])
    result = pipeline.generate(PrefillRequest("handoff-0", ids, store=False), MAX_NEW, handoff=True)
    s = result.summary
    assert s.num_fetched_tokens == reuse_boundary(len(ids), CHUNK)  # the prefix came over the refs
    assert s.first_token_match
    assert list(s.tokens) == local.generate(ids, MAX_NEW, chunk_tokens=CHUNK)


def test_warm_up_runs_in_every_actor(pipeline: Pipeline) -> None:
    # What warm_up leaves compiled is checked in tests/unit/test_codec_warmup.py; here: every actor
    # answers it (the demo calls it before its first timed request) and unknown profiles are named.
    assert pipeline.warm_up(["balanced", "lossless"]) > 0
    with pytest.raises(ValueError, match="unknown codec profile"):
        pipeline.warm_up(["no-such-profile"])
