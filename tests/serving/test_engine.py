"""The serving engine without HTTP: slots, queue, streamed deltas, cancel/timeout/drain, request validation.

Two kinds of tiny models, on CPU with the torch backend:
  * conftest's random qwen2 target (no tokenizer: prompts are token ids) with its random draft, whose greedy and
    sampled outputs are compared token for token with offline generation;
  * the bigram target (a byte tokenizer, greedy text "café☕!café☕!...") with an oracle draft, for text and the
    speculation counters; its `GatedTarget` holds a request mid-generation for the cancel/timeout/drain tests.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import replace

import pytest

from hass_deploy.config import GenerationConfig, HybridConfig, LookupConfig, SamplingConfig, TreeConfig
from hass_deploy.generation import Pipeline
from hass_deploy.models.checkpoint import FORMAT_VERSION, DraftMetadata, save_draft, target_identity
from hass_deploy.runtime.decoder import GenerationResult, SpeculativeDecoder
from hass_deploy.serving.engine import Engine, EngineClosedError, EngineConfig, RequestError, RequestOptions
from serving.bigram import write_bigram_target, write_oracle_draft
from serving.servers import GatedTarget

# Untied embeddings: its greedy output varies (the tied llama's repeats the last token), and lookup finds repeats.
ARCH = "qwen2"
PROMPT = [3, 4, 5, 6, 3, 4, 5, 6, 3, 4]
OTHER_PROMPTS = [[7, 8, 9], [11, 12, 13, 11, 12]]


# -- fixtures and helpers -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def random_models(hf_dirs, targets, random_drafts, tmp_path_factory):
    draft = save_draft(random_drafts[ARCH], tmp_path_factory.mktemp("engine-draft") / "draft",
                       DraftMetadata(FORMAT_VERSION, "random-init", target_identity(targets[ARCH])))
    return hf_dirs[ARCH], draft


@pytest.fixture(scope="module")
def pipe(random_models) -> Pipeline:
    return Pipeline.load(*random_models)


@pytest.fixture(scope="module")
def engine(random_models):
    engine = Engine.load(*random_models, EngineConfig(parallel=2, max_queue=8)).start()
    try:
        yield engine
    finally:
        engine.stop()


@pytest.fixture(scope="module")
def bigram_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine-bigram")
    target = write_bigram_target(root / "target")
    return target, write_oracle_draft(target, root / "draft")


@pytest.fixture(scope="module")
def bigram_pipe(bigram_models) -> Pipeline:
    return Pipeline.load(*bigram_models)


@pytest.fixture(scope="module")
def bigram_engine(bigram_models):
    engine = Engine.load(*bigram_models, EngineConfig(parallel=2)).start()
    try:
        yield engine
    finally:
        engine.stop()


@pytest.fixture
def gated(bigram_pipe):
    """One slot over the bigram target, plain decoding, whose steps run only when the test allows them."""
    gate = GatedTarget(bigram_pipe.decoder.target.fork())
    engine = Engine(gate, None, bigram_pipe.target.tokenizer, bigram_pipe.target.eos_token_ids,
                    EngineConfig(parallel=1, max_queue=4, speculation="off")).start()
    try:
        yield engine, gate
    finally:
        gate.release()
        engine.stop()


def offline(pipe: Pipeline, prompt: list[int], max_tokens: int, speculation: str = "draft",
            sampling: SamplingConfig = SamplingConfig(), seed: int = 0) -> GenerationResult:
    """What offline generation gives: the pipeline's decoder, without its draft when speculation is off."""
    config = GenerationConfig(max_new_tokens=max_tokens, sampling=sampling, seed=seed,
                              lookup=LookupConfig() if speculation in ("lookup", "hybrid") else None,
                              eos_token_ids=pipe.target.eos_token_ids)
    plain = speculation in ("off", "lookup")  # lookup over the draft's decoder would be hybrid
    decoder = SpeculativeDecoder(pipe.decoder.target, None) if plain else pipe.decoder
    return decoder.generate(prompt, config)


def held_after_first_token(engine: Engine, gate: GatedTarget, prompt: str, options: RequestOptions):
    """Submit a request and let only its prefill run: it is running, its slot busy, its next round held."""
    gate.hold(1)
    handle = engine.submit(prompt, options)
    deltas = iter(handle)
    first = next(deltas)
    return handle, deltas, first


def wait_until(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


# -- the tokens are offline generation's ----------------------------------------------------------------------


@pytest.mark.parametrize("speculation", ["draft", "lookup", "hybrid", "off"])
@pytest.mark.parametrize("consume", ["iterate", "wait", "async"])
def test_greedy_tokens_are_offline_generations(engine, pipe, speculation, consume):
    options = RequestOptions(max_tokens=40, speculation=speculation)
    if consume == "iterate":
        handle = engine.submit(PROMPT, options)
        deltas = list(handle)
        completion = handle.completion
    elif consume == "wait":
        deltas, completion = None, engine.submit(PROMPT, options).wait()
    else:
        async def main():
            handle = engine.submit(PROMPT, options)  # inside the loop: the handle wakes it
            return [delta async for delta in handle], handle.completion

        deltas, completion = asyncio.run(main())
    expected = offline(pipe, PROMPT, 40, speculation)
    assert completion.token_ids == expected.output_ids
    assert len(set(completion.token_ids)) > 5  # a varied output, not one token repeated
    assert completion.finish_reason == "length" and completion.stop is None and completion.error is None
    assert completion.speculation == speculation
    assert completion.prompt_ids == PROMPT
    assert completion.rounds == expected.rounds
    assert completion.draft_tokens == sum(expected.draft_lengths)
    assert (completion.draft_tokens == 0) == (speculation == "off")
    assert completion.accepted_tokens == sum(expected.accept_lengths)
    assert completion.accepted_per_position == expected.depth_accepts
    assert completion.text is None  # no tokenizer
    if deltas is not None:
        assert [t for delta in deltas for t in delta.token_ids] == completion.token_ids
        assert all(delta.text is None for delta in deltas)
        assert len(deltas) == completion.rounds + 1  # the prefill's token, then one delta per round


def test_wait_after_iterating_returns_the_completion(engine):
    handle = engine.submit(PROMPT, RequestOptions(max_tokens=3))
    assert sum(len(delta.token_ids) for delta in handle) == 3
    waited = []
    thread = threading.Thread(target=lambda: waited.append(handle.wait()), daemon=True)
    thread.start()
    thread.join(0.5)  # the request has ended: wait() has nothing to wait for
    assert waited == [handle.completion]


def test_async_result_and_a_sync_handle_refuses_async_iteration(engine, pipe):
    async def main():
        return await engine.submit(PROMPT, RequestOptions(max_tokens=12)).result()

    assert asyncio.run(main()).token_ids == offline(pipe, PROMPT, 12).output_ids
    handle = engine.submit(PROMPT, RequestOptions(max_tokens=2))  # from a plain thread

    async def iterate():
        return [delta async for delta in handle]

    with pytest.raises(RuntimeError, match="for loop"):
        asyncio.run(iterate())
    assert handle.wait().finish_reason == "length"


@pytest.mark.parametrize("speculation", ["draft", "lookup", "hybrid", "off"])
def test_seeded_sampling_is_reproducible_and_offline_generations(engine, pipe, speculation):
    options = RequestOptions(max_tokens=30, temperature=0.8, seed=7, speculation=speculation)
    first = engine.submit(PROMPT, options).wait()
    again = engine.submit(PROMPT, options).wait()
    assert first.token_ids == again.token_ids
    # The draws depend on the trees: offline runs the same draft (or lookup, or none) with the same tree config.
    assert first.token_ids == offline(pipe, PROMPT, 30, speculation, SamplingConfig(temperature=0.8), 7).output_ids
    other = engine.submit(PROMPT, replace(options, seed=8)).wait()
    assert other.token_ids != first.token_ids  # another seed, other draws (EOS may come early)


def test_text_deltas_add_up_to_the_completion(bigram_engine, bigram_pipe):
    handle = bigram_engine.submit("café", RequestOptions(max_tokens=18))
    deltas = list(handle)
    completion = handle.completion
    # The engine tokenizes text plainly: the offline prompt is the text without the chat template.
    prompt = bigram_pipe.encode("café", chat=False)
    assert completion.prompt_ids == prompt
    assert completion.token_ids == bigram_pipe.generate(prompt, GenerationConfig(max_new_tokens=18)).output_ids
    assert [t for delta in deltas for t in delta.token_ids] == completion.token_ids
    assert "".join(delta.text for delta in deltas) == completion.text == "☕!café☕!café"
    assert not any("\ufffd" in delta.text for delta in deltas)  # split characters are held back, never sent half


@pytest.mark.parametrize("stop, max_tokens, text", [
    (("!x",), 4, "☕!"),  # "!" is held back (it could start "!x") until the request ends
    ((), 1, "\ufffd"),  # the first byte of "☕": decode gives a replacement character at the end
])
def test_held_back_text_is_released_at_the_end(bigram_engine, stop, max_tokens, text):
    handle = bigram_engine.submit("café", RequestOptions(max_tokens=max_tokens, stop=stop))
    deltas = list(handle)
    assert handle.completion.finish_reason == "length"
    assert "".join(delta.text for delta in deltas) == handle.completion.text == text


def test_a_stop_string_cuts_tokens_and_text(bigram_engine):
    handle = bigram_engine.submit("café", RequestOptions(max_tokens=18, stop=("fé",)))
    deltas = list(handle)
    completion = handle.completion
    assert completion.finish_reason == "stop" and completion.stop == "fé"
    assert completion.text == "".join(delta.text for delta in deltas) == "☕!ca"
    assert len(completion.token_ids) == 9  # up to the token that completed "fé" (é is two bytes)
    assert [t for delta in deltas for t in delta.token_ids] == completion.token_ids


class Recording:
    """A target backend that logs how many sequences each of its steps computed (1 for a step alone); its forks log
    into the same list."""

    def __init__(self, inner, log: list[int]):
        self.inner, self.log = inner, log

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def step(self, *args, **kwargs):
        self.log.append(1)
        return self.inner.step(*args, **kwargs)

    def step_batch(self, batch):
        self.log.append(len(batch))
        return self.inner.step_batch([replace(part, backend=part.backend.inner) for part in batch])

    def fork(self):
        return Recording(self.inner.fork(), self.log)


def test_batched_requests_give_what_each_gives_alone(pipe):
    """Greedy, sampled and lookup requests on two slots: their steps share batched target steps, and each request
    gets exactly its offline tokens."""
    log: list[int] = []
    engine = Engine(Recording(pipe.decoder.target.fork(), log), pipe.decoder.draft.fork(), None,
                    pipe.target.eos_token_ids, EngineConfig(parallel=2)).start()
    requests = [
        (PROMPT, RequestOptions(max_tokens=30)),
        (OTHER_PROMPTS[0], RequestOptions(max_tokens=30, temperature=0.8, seed=7)),
        (OTHER_PROMPTS[1], RequestOptions(max_tokens=30, speculation="lookup")),
    ]
    try:
        handles = [engine.submit(prompt, options) for prompt, options in requests]
        completions = [handle.wait() for handle in handles]
    finally:
        engine.stop()
    for (prompt, options), completion in zip(requests, completions):
        alone = offline(pipe, prompt, 30, options.speculation or "draft", options.sampling, options.seed or 0)
        assert completion.token_ids == alone.output_ids
    assert log.count(2) > 10  # the two slots' verify steps ran together, round after round
    assert set(log) <= {1, 2}


# -- cancel, timeout, drain -----------------------------------------------------------------------------------


def test_cancel_a_queued_request(gated):
    engine, gate = gated
    running, _, _ = held_after_first_token(engine, gate, "café", RequestOptions(max_tokens=100))
    queued = engine.submit("caf", RequestOptions(max_tokens=5))
    assert (engine.running, engine.waiting) == (1, 1)
    queued.cancel()
    wait_until(lambda: queued.completion is not None, 5)  # at once, although the worker is held
    completion = queued.wait()
    assert completion.finish_reason == "abort"
    assert completion.token_ids == [] and completion.rounds == 0 and completion.ttft_s is None
    assert (engine.running, engine.waiting) == (1, 0)
    running.cancel()
    gate.release()
    assert running.wait().finish_reason == "abort"


def test_cancel_a_running_request_frees_its_slot(gated):
    engine, gate = gated
    handle, deltas, first = held_after_first_token(engine, gate, "café☕", RequestOptions(max_tokens=100))
    handle.cancel()
    gate.release()
    rest = list(deltas)
    completion = handle.completion
    assert completion.finish_reason == "abort"
    # The round in flight when it was cancelled finishes; none after it.
    assert len(completion.token_ids) <= 2 and first.token_ids == completion.token_ids[:1]
    assert [t for delta in [first, *rest] for t in delta.token_ids] == completion.token_ids
    assert engine.running == 0
    after = engine.submit("café", RequestOptions(max_tokens=3)).wait()
    assert after.finish_reason == "length" and after.text == "☕"


def test_a_running_request_times_out(gated):
    engine, gate = gated
    # "!c" could start the stop string "!cx": it is held back, and released when the request times out.
    handle, deltas, first = held_after_first_token(engine, gate, "café☕",
                                                   RequestOptions(max_tokens=100, timeout=0.2, stop=("!cx",)))
    time.sleep(0.25)  # past its deadline while its round is held
    gate.release()
    rest = list(deltas)
    completion = handle.completion
    assert completion.finish_reason == "timeout"
    assert 1 <= len(completion.token_ids) <= 2  # no round starts after the deadline
    assert first.text == ""
    assert "".join(d.text for d in [first, *rest]) == completion.text == "!c"[:len(completion.token_ids)]
    assert engine.running == 0


def test_a_queued_request_times_out_without_running(gated):
    engine, gate = gated
    running, _, _ = held_after_first_token(engine, gate, "café", RequestOptions(max_tokens=100))
    queued = engine.submit("caf", RequestOptions(max_tokens=5, timeout=0.05))
    time.sleep(0.1)  # its deadline passes while it waits for the slot

    def step():  # one round of the running request at a time
        gate.hold(1)
        return queued.completion is not None

    wait_until(step)
    assert running.completion is None  # it ended between two rounds of the other, not when the slot freed up
    completion = queued.wait()
    assert completion.finish_reason == "timeout"
    assert completion.token_ids == [] and completion.rounds == 0 and completion.ttft_s is None
    running.cancel()
    gate.release()
    assert running.wait().finish_reason == "abort"


def test_drain_lets_a_running_request_finish(gated):
    engine, gate = gated
    handle, _, _ = held_after_first_token(engine, gate, "café", RequestOptions(max_tokens=20))
    drained: list[bool] = []
    thread = threading.Thread(target=lambda: drained.append(engine.drain(10.0)))
    thread.start()
    late = []  # accepted before the drain began (unlikely): they must finish too
    while True:
        try:
            late.append(engine.submit("caf", RequestOptions(max_tokens=2)))
        except EngineClosedError:
            break
        time.sleep(0.02)
    gate.release()
    thread.join(10)
    assert drained == [True]
    assert handle.completion.finish_reason == "length" and len(handle.completion.token_ids) == 20
    assert all(h.wait().finish_reason == "length" for h in late)
    with pytest.raises(EngineClosedError):
        engine.submit("caf", RequestOptions(max_tokens=2))


def test_drain_past_its_timeout_aborts_what_is_left(gated):
    engine, gate = gated
    handle, _, _ = held_after_first_token(engine, gate, "café", RequestOptions(max_tokens=100))
    drained: list[bool] = []
    thread = threading.Thread(target=lambda: drained.append(engine.drain(0.1)))
    thread.start()
    time.sleep(0.2)  # the drain's timeout passes with the request held mid-generation

    def step():  # one held step at a time: the request advances only if the drain has not cancelled it
        gate.hold(1)
        return handle.completion is not None

    wait_until(step)
    thread.join(10)
    assert drained == [False]
    assert handle.completion.finish_reason == "abort" and len(handle.completion.token_ids) < 100
    with pytest.raises(EngineClosedError):
        engine.submit("caf", RequestOptions(max_tokens=2))


# -- request validation ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt, options, param, words", [
    ([], RequestOptions(), "prompt", "empty"),
    ([1, 96], RequestOptions(), "prompt", "token id 96 is outside the vocabulary (size 96)"),
    ([-1], RequestOptions(), "prompt", "outside the vocabulary"),
    ([1] * 256, RequestOptions(), "prompt", "256 tokens"),  # the whole context: no room for one new token
    (PROMPT, RequestOptions(max_tokens=247), "max_tokens", "at most 246"),
    (PROMPT, RequestOptions(stop_token_ids=(96,)), "stop_token_ids", "outside the vocabulary"),
    (PROMPT, RequestOptions(stop=("x",)), "stop", "tokenizer"),  # conftest's targets have none
    ("some text", RequestOptions(), "prompt", "no tokenizer"),
])
def test_bad_requests_name_the_field(engine, prompt, options, param, words):
    with pytest.raises(RequestError) as error:
        engine.submit(prompt, options)
    assert error.value.param == param
    assert words in str(error.value)
    assert engine.waiting == 0  # nothing was queued


@pytest.mark.parametrize("fields, param", [
    (dict(max_tokens=0), "max_tokens"), (dict(max_tokens=True), "max_tokens"), (dict(temperature=-1), "temperature"),
    (dict(top_p=0), "top_p"), (dict(top_k=-1), "top_k"), (dict(stop=("",)), "stop"),
    (dict(speculation="fast"), "speculation"), (dict(timeout=0), "timeout"),
])
def test_bad_options_name_the_field(fields, param):
    with pytest.raises(RequestError) as error:
        RequestOptions(**fields)
    assert error.value.param == param


def test_the_longest_request_that_fits_fills_the_context(engine, pipe):
    room = 256 - len(PROMPT)  # the largest max_tokens accepted: the last token's KV row is never needed
    completion = engine.submit(PROMPT, RequestOptions(max_tokens=room, ignore_eos=True, speculation="lookup")).wait()
    assert completion.finish_reason == "length" and len(completion.token_ids) == room
    config = GenerationConfig(max_new_tokens=room, lookup=LookupConfig(), eos_token_ids=())
    assert completion.token_ids == pipe.decoder.generate(PROMPT, config).output_ids


@pytest.mark.parametrize("mode", ["draft", "hybrid"])
def test_speculation_with_the_draft_needs_a_draft(random_models, mode):
    engine = Engine.load(random_models[0], None, EngineConfig(speculation=mode)).start()  # the default falls back
    try:
        with pytest.raises(RequestError) as error:
            engine.submit(PROMPT, RequestOptions(speculation=mode))
        assert error.value.param == "speculation" and "draft model" in str(error.value)
        completion = engine.submit(PROMPT, RequestOptions(max_tokens=4)).wait()
        assert completion.speculation == "off" and completion.draft_tokens == 0
    finally:
        engine.stop()


class WithTreeBudget:
    """A target backend with an export's fixed verify-step budget."""

    def __init__(self, inner, max_tree_tokens: int):
        self.inner, self.max_tree_tokens = inner, max_tree_tokens

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_lookup_trees_must_fit_the_backends_budget(pipe):
    target = WithTreeBudget(pipe.decoder.target.fork(), max_tree_tokens=6)
    eos = pipe.target.eos_token_ids
    engine = Engine(target, None, None, eos, EngineConfig(lookup=LookupConfig(tokens=8))).start()
    fitting = Engine(target.inner.fork(), None, None, eos, EngineConfig(lookup=LookupConfig(tokens=6)))
    fitting.max_tree_tokens = 6
    try:
        with pytest.raises(RequestError) as error:
            engine.submit(PROMPT, RequestOptions(speculation="lookup"))
        assert error.value.param == "speculation" and "tree budget (6)" in str(error.value)
        plain = engine.submit(PROMPT, RequestOptions(max_tokens=4, speculation="off")).wait()  # lookup only
        assert plain.finish_reason == "length"
        fitting.start()
        assert fitting.submit(PROMPT, RequestOptions(max_tokens=4, speculation="lookup")).wait().speculation == "lookup"
    finally:
        engine.stop()
        fitting.stop()


def test_hybrid_trees_must_fit_the_backends_budget(pipe):
    target = WithTreeBudget(pipe.decoder.target.fork(), max_tree_tokens=6)
    config = EngineConfig(lookup=LookupConfig(tokens=6), hybrid=HybridConfig(tokens=8), tree=TreeConfig(tokens=6))
    engine = Engine(target, pipe.decoder.draft.fork(), None, pipe.target.eos_token_ids, config).start()
    try:
        with pytest.raises(RequestError) as error:
            engine.submit(PROMPT, RequestOptions(speculation="hybrid"))
        assert error.value.param == "speculation" and "--hybrid-tokens 8" in str(error.value)
        lookup = engine.submit(PROMPT, RequestOptions(max_tokens=4, speculation="lookup")).wait()  # 6 tokens fit
        assert lookup.finish_reason == "length"
    finally:
        engine.stop()


# -- speculation counters and shared memory -------------------------------------------------------------------


def test_counters_agree_with_the_decoders_result(bigram_engine, bigram_pipe):
    completion = bigram_engine.submit("café", RequestOptions(max_tokens=40)).wait()
    result = bigram_pipe.generate(bigram_pipe.encode("café", chat=False), GenerationConfig(max_new_tokens=40))
    assert completion.token_ids == result.output_ids
    assert completion.speculation == "draft"
    assert completion.rounds == result.rounds > 0
    assert completion.drafts == sum(1 for d in result.draft_lengths if d) == result.rounds
    assert completion.draft_tokens == sum(result.draft_lengths)
    assert completion.accepted_tokens == sum(result.accept_lengths)
    assert completion.accepted_per_position == result.depth_accepts
    assert sum(completion.accepted_per_position) == completion.accepted_tokens
    assert completion.tau == pytest.approx(result.tau)
    assert completion.tau == (completion.accepted_tokens + completion.rounds) / completion.rounds > 1
    assert completion.ttft_s is not None and 0 <= completion.queue_s <= completion.ttft_s <= completion.e2e_s


def test_slots_share_weights_not_kv_buffers(bigram_engine):
    # Each slot's backends are forks, wrapped for the step batcher (`SlotTarget.backend`).
    (first, first_draft), (second, second_draft) = ((slot.target.backend, slot.draft.backend)
                                                    for slot in bigram_engine.scheduler.slots)
    assert first is not second
    for mine, theirs in zip(first.module.parameters(), second.module.parameters(), strict=True):
        assert mine is theirs and mine.data_ptr() == theirs.data_ptr()
    for mine, theirs in zip(first_draft.head.parameters(), second_draft.head.parameters(), strict=True):
        assert mine is theirs
    assert second_draft.lm_head.weight is first.module.lm_head.weight

    def storages(backend):
        return {backend.kv.keys.untyped_storage().data_ptr(), backend.kv.values.untyped_storage().data_ptr()}

    assert not storages(first) & storages(second)
    assert not storages(first_draft) & storages(second_draft)
