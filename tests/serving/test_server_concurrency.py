"""Losslessness under load: many requests at once on 8 slots, their steps batched (`serving/batcher.py`), each
answered exactly as offline `generate` answers it alone, on the torch backend and on ONNX Runtime (slots sharing one
session); and the load test (`bench-serve --check`) against the real server.

The target is a tiny random Llama with a byte-level BPE tokenizer and a random draft: its outputs are arbitrary
token streams (EOS included), so any cross-talk between slots would show.
"""

from __future__ import annotations

import asyncio
import json
import random

import httpx
import pytest

from hass_deploy.config import GenerationConfig, LookupConfig, RuntimeConfig, SamplingConfig
from hass_deploy.generation import Pipeline
from hass_deploy.models.checkpoint import FORMAT_VERSION, DraftMetadata, init_draft, save_draft, target_identity
from hass_deploy.models.loading import load_target
from hass_deploy.runtime.decoder import SpeculativeDecoder
from hass_deploy.serving.batcher import Tick
from hass_deploy.serving.engine import Engine, EngineConfig, RequestOptions
from serving.servers import engine_loader, running_server, url
from training.chat_targets import BPE_VOCAB, bpe_tokenizer, write_target

REQUESTS = 32


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("random-bpe")
    target = write_target(root / "target", bpe_tokenizer(None), seed=3, vocab_size=BPE_VOCAB)
    model = load_target(target, tokenizer=False)
    draft = save_draft(init_draft(model, seed=1), root / "draft",
                       DraftMetadata(FORMAT_VERSION, "random-init", target_identity(model)))
    return target, draft


SPECULATION = ("draft", "off", "lookup", "hybrid")


def mixed_requests(count: int, seed: int = 0, sampled_every: int | None = None) -> list[dict]:
    """Prompts of 1-150 token ids and 1-64 new tokens, the speculation modes in turn; greedy, or every
    `sampled_every`-th one sampled with a seed of its own."""
    rng = random.Random(seed)
    requests = []
    for i in range(count):
        prompt = [rng.randrange(3, BPE_VOCAB) for _ in range(rng.choice([1, 5, 20, 60, 150]))]
        sampled = sampled_every is not None and i % sampled_every == sampled_every - 1
        requests.append({"prompt": prompt, "max_tokens": rng.choice([1, 7, 24, 64]),
                         "temperature": 0.8 if sampled else 0, "seed": i, "return_token_ids": True,
                         "speculation": SPECULATION[i % len(SPECULATION)], "stream": i % 2 == 0})
    return requests


async def send_all(base: str, bodies: list[dict]) -> list[list[int]]:
    """All requests at once; each one's generated token ids (from the stream's chunks or the whole response)."""
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=len(bodies))) as client:
        async def one(body: dict) -> list[int]:
            if not body["stream"]:
                response = await client.post(base + "/v1/completions", json=body)
                assert response.status_code == 200, response.text
                return response.json()["choices"][0]["token_ids"]
            tokens = []
            async with client.stream("POST", base + "/v1/completions", json=body) as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    if line.startswith("data: {"):
                        choices = json.loads(line[6:])["choices"]
                        tokens += choices[0]["token_ids"] if choices else []
            return tokens

        return await asyncio.gather(*(one(body) for body in bodies))


def offline(pipe: Pipeline, bodies: list[dict]) -> list[list[int]]:
    """Each request alone, as `generate` runs it: its speculation mode, its sampling and seed."""
    results = []
    for body in bodies:
        speculation = body.get("speculation", "draft")
        config = GenerationConfig(max_new_tokens=body["max_tokens"], seed=body.get("seed", 0),
                                  sampling=SamplingConfig(temperature=body["temperature"]),
                                  lookup=LookupConfig() if speculation in ("lookup", "hybrid") else None,
                                  eos_token_ids=pipe.target.eos_token_ids)
        draft = pipe.decoder.draft if speculation in ("draft", "hybrid") else None
        results.append(SpeculativeDecoder(pipe.decoder.target, draft).generate(body["prompt"], config).output_ids)
    return results


@pytest.fixture(scope="module")
def exports(models, tmp_path_factory):
    """backend -> (RuntimeConfig, artifacts or None): torch, and ONNX Runtime on the export (prefill chunks of 8)."""
    def ort():
        from ort_artifacts import exported

        from hass_deploy.models.checkpoint import load_draft

        model = load_target(models[0], tokenizer=False)
        return exported(tmp_path_factory.mktemp("ort"), "served", model, load_draft(models[1], model)[0])

    return {"torch": lambda: (RuntimeConfig(), None), "onnxruntime": lambda: (RuntimeConfig(backend="onnxruntime"),
                                                                               ort())}


def batched_sequences(metrics: str) -> tuple[float, float]:
    """(batched target steps, the sequences they computed) from the engine's /metrics."""
    values = dict(line.rsplit(" ", 1) for line in metrics.splitlines() if line.startswith("hass_deploy:batch_sequences_"))
    count = next(float(v) for k, v in values.items() if k.startswith("hass_deploy:batch_sequences_count"))
    total = next(float(v) for k, v in values.items() if k.startswith("hass_deploy:batch_sequences_sum"))
    return count, total


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_32_mixed_requests_on_8_slots_are_each_the_offline_output(models, exports, backend):
    """32 requests at once on 8 slots, their steps batched: greedy and seeded sampled requests, every speculation
    mode, prompts from 1 to 150 tokens (chunked prefills); each response is what `generate` gives it alone."""
    if backend == "onnxruntime":
        pytest.importorskip("onnxruntime")
    runtime, artifacts = exports[backend]()
    bodies = mixed_requests(REQUESTS, seed=4, sampled_every=5)  # a greedy and a sampled one end at EOS
    expected = offline(Pipeline.load(*models, runtime, artifacts=artifacts), bodies)
    load = engine_loader(*models, EngineConfig(parallel=8, max_queue=REQUESTS), runtime=runtime, artifacts=artifacts)
    with running_server(load) as server:
        slots = server.state.engine.scheduler.slots
        if backend == "onnxruntime":  # the slots' forks share one session, each with KV buffers of its own
            assert len({id(slot.target.backend.stepper.session) for slot in slots}) == 1
            assert len({slot.target.backend.stepper.kv.storage.data_ptr() for slot in slots}) == 8
        got = asyncio.run(send_all(url(server), bodies))
        metrics = httpx.get(url(server) + "/metrics").text
    assert got == expected
    assert any(len(tokens) < body["max_tokens"] for tokens, body in zip(got, bodies))  # some stopped at EOS
    assert 'finished_reason="length"' in metrics and 'finished_reason="stop"' in metrics
    steps, sequences = batched_sequences(metrics)
    assert sequences > 2 * steps  # target steps computed more than two sequences each, on average


def test_bench_serve_check_passes_against_the_server(models, tmp_path):
    from typer.testing import CliRunner

    from hass_deploy.cli import app

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": text}) + "\n" for text in
                               ["Hello there", "The quick brown fox", "Numbers 1, 2 and 3", "Tell me a story"]))
    with running_server(engine_loader(*models, EngineConfig(parallel=2, max_queue=8))) as server:
        result = CliRunner().invoke(app, [
            "bench-serve", "--url", url(server), "--prompts", str(prompts), "--num-requests", "8",
            "--concurrency", "4", "--max-tokens", "16", "--check", "--target", str(models[0]), "--draft",
            str(models[1]), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output + result.stderr
    report = json.loads((tmp_path / "out" / "serve_bench.json").read_text())
    assert report["completed"] == 8 and report["failed"] == 0
    assert report["check"]["identical"] and report["check"]["checked"] == 8
    assert report["speculation"]["draft_tokens"] > 0


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_a_long_prompt_prefills_in_pieces_beside_running_requests(models, exports, backend):
    """A 200-token prompt arrives while three requests decode: its prefill runs as the backend's chunks, each in a
    tick shared with the others' steps (none stalls for the whole prompt), and nobody's tokens change."""
    if backend == "onnxruntime":
        pytest.importorskip("onnxruntime")
    runtime, artifacts = exports[backend]()
    rng = random.Random(9)
    running = [{"prompt": [rng.randrange(3, BPE_VOCAB) for _ in range(n)], "max_tokens": 64, "temperature": 0,
                "speculation": mode} for n, mode in ((5, "draft"), (30, "off"), (12, "draft"))]
    long = {"prompt": [rng.randrange(3, BPE_VOCAB) for _ in range(200)], "max_tokens": 16, "temperature": 0}
    expected = offline(Pipeline.load(*models, runtime, artifacts=artifacts), [*running, long])
    engine = Engine.load(*models, EngineConfig(parallel=4), runtime, artifacts)
    ticks: list[Tick] = []
    engine.batcher.on_tick = ticks.append
    engine.start()
    try:
        handles = [engine.submit(body["prompt"], RequestOptions(max_tokens=64, speculation=body["speculation"]))
                   for body in running]
        streams = [iter(handle) for handle in handles]
        for stream in streams:
            next(stream)  # each has its first token: all three are decoding
        during = len(ticks)
        late = engine.submit(long["prompt"], RequestOptions(max_tokens=16))
        got = [handle.wait().token_ids for handle in [*handles, late]]
    finally:
        engine.stop()
    assert got == expected
    chunk = engine.scheduler.slots[0].target.prefill_chunk
    verify = [tick for tick in ticks[during:] if tick.model == "target"]
    assert all(tick.rows < len(long["prompt"]) for tick in verify)  # never the whole prompt in one step
    shared = [tick for tick in verify if tick.rows > chunk and tick.sequences > 1]  # a piece beside others' rows
    assert len(shared) >= len(long["prompt"]) // chunk - 1
