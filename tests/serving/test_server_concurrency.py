"""Losslessness under concurrency: many requests at once on a few slots, each answered exactly as offline
`generate` answers it alone, on the torch backend and on ONNX Runtime (slots sharing one session); and the load
test (`bench-serve --check`) against the real server.

The target is a tiny random Llama with a byte-level BPE tokenizer and a random draft: its outputs are arbitrary
token streams (EOS included), so any cross-talk between slots would show.
"""

from __future__ import annotations

import asyncio
import json
import random

import httpx
import pytest

from hass_deploy.config import GenerationConfig, RuntimeConfig, SamplingConfig
from hass_deploy.generation import Pipeline
from hass_deploy.models.checkpoint import FORMAT_VERSION, DraftMetadata, init_draft, save_draft, target_identity
from hass_deploy.models.loading import load_target
from hass_deploy.serving.engine import EngineConfig
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


def mixed_requests(count: int, seed: int = 0) -> list[dict]:
    """Prompts of 1-150 token ids and 1-64 new tokens, greedy; every fourth one without speculation."""
    rng = random.Random(seed)
    requests = []
    for i in range(count):
        prompt = [rng.randrange(3, BPE_VOCAB) for _ in range(rng.choice([1, 5, 20, 60, 150]))]
        requests.append({"prompt": prompt, "max_tokens": rng.choice([1, 7, 24, 64]), "temperature": 0,
                         "return_token_ids": True, "speculation": "off" if i % 4 == 3 else "draft",
                         "stream": i % 2 == 0})
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
    return [pipe.generate(body["prompt"], GenerationConfig(max_new_tokens=body["max_tokens"])).output_ids
            for body in bodies]


def test_32_requests_on_4_slots_are_each_the_offline_output(models):
    bodies = mixed_requests(REQUESTS)
    expected = offline(Pipeline.load(*models), bodies)
    with running_server(engine_loader(*models, EngineConfig(parallel=4, max_queue=REQUESTS))) as server:
        got = asyncio.run(send_all(url(server), bodies))
        metrics = httpx.get(url(server) + "/metrics").text
    assert got == expected
    assert any(len(tokens) < body["max_tokens"] for tokens, body in zip(got, bodies))  # some stopped at EOS
    assert 'finished_reason="length"' in metrics and 'finished_reason="stop"' in metrics


def test_seeded_sampling_is_reproducible_under_load(models):
    body = {"prompt": [5, 6, 7, 8], "max_tokens": 40, "temperature": 0.9, "seed": 11, "return_token_ids": True,
            "stream": False}
    others = mixed_requests(6, seed=1)
    pipe = Pipeline.load(*models)
    config = GenerationConfig(max_new_tokens=40, sampling=SamplingConfig(temperature=0.9), seed=11)
    expected = pipe.generate(body["prompt"], config).output_ids
    with running_server(engine_loader(*models, EngineConfig(parallel=3, max_queue=16))) as server:
        got = asyncio.run(send_all(url(server), [body, *others, body]))
    assert got[0] == got[-1] == expected


def test_onnxruntime_slots_share_one_session(models, tmp_path_factory):
    """The ORT backend's forks run on the same InferenceSession with KV buffers of their own."""
    from ort_artifacts import exported

    target, draft = models
    model = load_target(target, tokenizer=False)
    from hass_deploy.models.checkpoint import load_draft

    artifacts = exported(tmp_path_factory.mktemp("ort"), "served", model, load_draft(draft, model)[0])
    runtime = RuntimeConfig(backend="onnxruntime")
    bodies = mixed_requests(12, seed=2)
    expected = offline(Pipeline.load(target, draft, runtime, artifacts=artifacts), bodies)
    load = engine_loader(target, draft, EngineConfig(parallel=3, max_queue=12), runtime=runtime, artifacts=artifacts)
    with running_server(load) as server:
        slots = server.state.engine.scheduler.slots
        assert len({id(slot.target.stepper.session) for slot in slots}) == 1
        assert len({slot.target.stepper.kv.storage.data_ptr() for slot in slots}) == 3
        got = asyncio.run(send_all(url(server), bodies))
    assert got == expected


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
