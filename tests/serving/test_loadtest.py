"""Tests for `hass-deploy bench-serve` (hass_deploy/serving/loadtest.py): the statistics on hand-made records, the
acceptance counters on hand-written Prometheus text, and whole runs against a fake OpenAI streaming server (a
FastAPI app served by uvicorn in a thread) that streams known chunks, answers 429 to "busy" prompts and counts
speculation in a /metrics that changes with every completed request."""

import asyncio
import json
import socket
import threading
import time

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from typer.testing import CliRunner

from hass_deploy.cli import app as cli_app
from hass_deploy.errors import ConfigError
from hass_deploy.serving.loadtest import (LoadTestConfig, RequestRecord, check_lossless, peak_concurrency,
                                          run_load_test, spec_delta, summarise)

# --- statistics ------------------------------------------------------------------------------------------------


def _record(index, start, chunks, end, tokens, **kw):
    return RequestRecord(index, 0, start=start, end=end, chunk_times=chunks, output_tokens=tokens, **kw)


def test_summarise_definitions():
    records = [
        _record(0, 10.0, [0.1, 0.3, 0.4], 10.5, 5, prompt_tokens=7),  # ttft .1, tpot (.5-.1)/4, itl .2 .1
        _record(1, 10.2, [0.3], 10.5, 1, prompt_tokens=3),  # one token: no TPOT, no ITL
        _record(2, 10.6, [], 11.0, 0, error_kind="HTTP 429", error="busy"),
        _record(3, 10.7, [], 11.0, 0, error_kind="HTTP 429", error="busy again"),
        _record(4, 10.8, [], 12.0, 0, error_kind="timeout", error="slow"),
    ]
    s = summarise(records)
    assert (s["completed"], s["failed"]) == (2, 3)
    assert s["errors"] == {"HTTP 429": {"count": 2, "message": "busy"}, "timeout": {"count": 1, "message": "slow"}}
    assert s["duration_s"] == pytest.approx(2.0)
    assert (s["total_output_tokens"], s["total_input_tokens"]) == (6, 10)
    assert s["request_throughput"] == pytest.approx(1.0)
    assert s["output_throughput"] == pytest.approx(3.0) and s["total_token_throughput"] == pytest.approx(8.0)
    assert s["ttft_ms"]["n"] == 2 and s["ttft_ms"]["mean"] == pytest.approx(200.0)
    assert s["tpot_ms"]["n"] == 1 and s["tpot_ms"]["p50"] == pytest.approx(100.0)
    assert s["itl_ms"]["n"] == 2 and s["itl_ms"]["mean"] == pytest.approx(150.0)
    assert s["e2e_ms"]["p50"] == pytest.approx(400.0)  # 500 and 300 ms
    assert s["usage_speculation"] is None


def test_percentiles_and_peak_concurrency():
    records = [_record(i, 0.0, [i / 100], 1.0, 1) for i in range(1, 101)]  # ttft 10..1000 ms
    ttft = summarise(records, duration=4.0)["ttft_ms"]
    assert ttft["p50"] == pytest.approx(505.0) and ttft["p90"] == pytest.approx(901.0)
    assert ttft["p99"] == pytest.approx(990.1) and ttft["mean"] == pytest.approx(505.0)
    assert summarise(records, duration=4.0)["request_throughput"] == pytest.approx(25.0)
    spans = [(0, 2), (1, 3), (2, 4), (2.5, 3.5), (5, 6)]
    assert peak_concurrency([RequestRecord(i, 0, start=a, end=b) for i, (a, b) in enumerate(spans)]) == 3
    empty = summarise([])
    assert empty["completed"] == 0 and empty["ttft_ms"]["mean"] is None and empty["request_throughput"] is None


def test_config_refuses_bad_values():
    for bad in (dict(concurrency=0), dict(num_requests=0), dict(request_rate=0), dict(url="localhost:8000"),
                dict(max_prompts=0), dict(timeout=0)):
        with pytest.raises(ConfigError):
            LoadTestConfig(**bad)


# --- acceptance from /metrics ------------------------------------------------------------------------------------


def _metrics(prefix, drafts, draft_tokens, accepted, per_pos, created=True):
    lines = []
    for name, value in (("drafts", drafts), ("draft_tokens", draft_tokens), ("accepted_tokens", accepted)):
        metric = f"{prefix}:spec_decode_num_{name}"
        lines += [f"# HELP {metric} x", f"# TYPE {metric} counter"]
        # two label sets (summed), and the `_created` sample a prometheus_client counter also exposes
        lines += [f'{metric}_total{{model_name="m",engine="0"}} {value - 1}',
                  f'{metric}_total{{model_name="m",engine="1"}} 1.0']
        lines += [f'{metric}_created{{model_name="m",engine="0"}} 1.7e9'] if created else []
    metric = f"{prefix}:spec_decode_num_accepted_tokens_per_pos"
    lines += [f"# TYPE {metric} counter"]
    lines += [f'{metric}_total{{model_name="m",position="{i}"}} {v}' for i, v in enumerate(per_pos)]
    lines += [f'{prefix}:other_total{{model_name="m"}} 99', 'vllm_like:spec_decode_num_drafts_total 1000']
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("prefix", ["hass_deploy", "vllm"])
def test_spec_delta(prefix):
    before = _metrics(prefix, 10, 30, 12, [8, 4, 0])
    after = _metrics(prefix, 30, 90, 42, [26, 14, 2], created=False)
    d = spec_delta(before, after, prefix)
    assert d["available"] and (d["drafts"], d["draft_tokens"], d["accepted_tokens"]) == (20, 60, 30)
    assert d["acceptance_rate"] == pytest.approx(0.5) and d["mean_acceptance_length"] == pytest.approx(2.5)
    assert d["per_position"] == pytest.approx([0.9, 0.5, 0.1])
    assert spec_delta(before, after, "llamacpp") == {"available": False}  # another server's prefix
    assert spec_delta(None, after, prefix) == {"available": False}  # the first scrape failed
    zero = spec_delta(after, after, prefix)
    assert zero["drafts"] == 0 and zero["acceptance_rate"] is None and zero["per_position"] == []


# --- a fake OpenAI streaming server ------------------------------------------------------------------------------

CHUNKS = [("Hel", [5, 6]), ("lo", [7]), ("", []), ("!", [8])]  # an empty chunk carries no content
SPECULATION = {"drafts": 2, "draft_tokens": 6, "accepted_tokens": 3, "tau": 2.5}


def _fake_app(state):
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

    @app.get("/metrics")
    async def metrics():
        n = state["completed"]
        return PlainTextResponse(_metrics("hass_deploy", 5 + 2 * n, 5 + 6 * n, 5 + 3 * n, [5 + 2 * n, 1 + n]))

    async def stream(body, chat):
        state["in_flight"] += 1
        state["peak"] = max(state["peak"], state["in_flight"])
        try:
            for i, (text, ids) in enumerate(CHUNKS):
                await asyncio.sleep(0.5 if "slow" in str(body) else 0.01)
                choice = {"index": 0, "finish_reason": "length" if i == len(CHUNKS) - 1 else None, "token_ids": ids}
                choice.update({"delta": {"content": text}} if chat else {"text": text})
                chunk = {"id": "x", "object": "chat.completion.chunk" if chat else "text_completion", "created": 0,
                         "model": "fake-model", "choices": [choice], "usage": None}
                if i == 0:
                    chunk["prompt_token_ids"] = [1, 2, 3]
                yield f"data: {json.dumps(chunk)}\n\n"
            usage = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
            yield f"data: {json.dumps({'id': 'x', 'choices': [], 'usage': usage, 'speculation': SPECULATION})}\n\n"
            state["completed"] += 1  # before [DONE]: the client's last scrape must see it
            yield "data: [DONE]\n\n"
        finally:
            state["in_flight"] -= 1

    async def answer(request: Request, chat: bool):
        body = await request.json()
        state["bodies"].append(body)
        if "busy" in json.dumps(body):
            error = {"message": "server busy", "type": "rate_limit_exceeded", "param": None, "code": 429}
            return JSONResponse({"error": error}, status_code=429, headers={"Retry-After": "1"})
        return StreamingResponse(stream(body, chat), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answer(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await answer(request, chat=True)

    return app


@pytest.fixture(scope="module")
def server():
    state = {"completed": 0, "in_flight": 0, "peak": 0, "bodies": []}
    uv = uvicorn.Server(uvicorn.Config(_fake_app(state), host="127.0.0.1", port=0, log_level="warning",
                                       lifespan="off"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not uv.started and time.monotonic() < deadline:
        time.sleep(0.01)
    port = uv.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", state
    uv.should_exit = True
    thread.join(5)


@pytest.fixture()
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("alpha", "beta", "busy gamma", "delta")))
    return path


def test_run_against_fake_server(server, prompts, tmp_path):
    url, state = server
    state["peak"] = 0
    config = LoadTestConfig(url=url, num_requests=10, concurrency=3, max_tokens=4)
    report = run_load_test(config, [prompts], tmp_path / "out", progress=False)
    # prompts cycle: requests 2 and 6 are "busy gamma"
    assert (report["completed"], report["failed"]) == (8, 2)
    assert report["errors"] == {"HTTP 429": {"count": 2, "message": "server busy"}}
    assert [r["index"] for r in report["requests"] if r["error"]] == [2, 6]
    assert report["model"] == "fake-model"
    assert (report["total_output_tokens"], report["total_input_tokens"]) == (32, 24)
    assert report["ttft_ms"]["n"] == 8 and report["ttft_ms"]["mean"] > 5
    assert report["itl_ms"]["n"] == 16 and report["tpot_ms"]["n"] == 8  # 3 content chunks per response
    assert 1 <= report["peak_concurrency"] <= 3 and state["peak"] <= 3
    assert report["usage_speculation"] == {"drafts": 16, "draft_tokens": 48, "accepted_tokens": 24}
    s = report["speculation"]
    assert (s["drafts"], s["draft_tokens"], s["accepted_tokens"]) == (16, 48, 24)
    assert s["mean_acceptance_length"] == pytest.approx(2.5) and s["per_position"] == pytest.approx([1.0, 0.5])
    body = state["bodies"][-1]
    assert body["stream"] and body["return_token_ids"] and body["stream_options"] == {"include_usage": True}
    assert body["model"] == "fake-model" and body["max_tokens"] == 4 and body["temperature"] == 0
    written = json.loads((tmp_path / "out" / "serve_bench.json").read_text())
    assert written["completed"] == 8 and written["config"]["request_rate"] is None
    markdown = (tmp_path / "out" / "serve_bench.md").read_text()
    assert "| TTFT |" in markdown and "HTTP 429: 2" in markdown and "mean acceptance length 2.50" in markdown


def test_chat_poisson_and_timeout(server, prompts, tmp_path):
    url, state = server
    slow = tmp_path / "slow.jsonl"
    slow.write_text(json.dumps({"prompt": "slow"}) + "\n")
    config = LoadTestConfig(url=url, num_requests=3, concurrency=2, request_rate=50.0, chat=True, model="m",
                            max_prompts=2)
    report = run_load_test(config, [prompts], progress=False)
    assert report["completed"] == 3 and report["total_output_tokens"] == 12 and report["itl_ms"]["n"] == 6
    bodies = state["bodies"][-3:]
    assert sorted(b["messages"][0]["content"] for b in bodies) == ["alpha", "alpha", "beta"]
    assert {b["model"] for b in bodies} == {"m"} and report["config"]["request_rate"] == 50.0
    timed = run_load_test(LoadTestConfig(url=url, num_requests=1, timeout=0.2), [slow], progress=False)
    assert timed["failed"] == 1 and list(timed["errors"]) == ["timeout"]


def test_check_lossless_with_a_tiny_target(tmp_path):
    from hass_deploy.config import GenerationConfig
    from hass_deploy.generation import Pipeline
    from hass_deploy.models.random_target import random_hf_model

    target = tmp_path / "target"
    random_hf_model("llama", "tiny", seed=0, vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=0,
                    eos_token_id=95).save_pretrained(target)
    prompt = [1, 2, 3, 4]
    reference = Pipeline.load(target).generate(prompt, GenerationConfig(max_new_tokens=6)).output_ids
    assert len(reference) == 6
    wrong = reference[:2] + [(reference[2] + 1) % 95] + reference[3:]
    records = [RequestRecord(0, 0, token_ids=list(reference), prompt_token_ids=prompt),
               RequestRecord(1, 0, token_ids=wrong, prompt_token_ids=prompt),
               RequestRecord(2, 0, token_ids=None, prompt_token_ids=prompt),  # no token ids: not checkable
               RequestRecord(3, 0, error_kind="HTTP 429", error="busy")]  # failed: not counted
    check = check_lossless(records, [None], target, None, None, 6, chat=False)
    assert check == {"checked": 2, "unchecked": 1, "mismatches": [{"request": 1, "position": 2}], "identical": False}


# --- the CLI -----------------------------------------------------------------------------------------------------

runner = CliRunner()


def _stderr(result) -> str:
    try:
        return result.stderr
    except ValueError:  # older click mixes stderr into output
        return result.output


def _one_error_line(result, fragment):
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (result.output, result.exception)
    lines = [line for line in _stderr(result).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines


def test_cli_bench_serve(server, prompts, tmp_path):
    url, _ = server
    result = runner.invoke(cli_app, ["bench-serve", "--url", url, "--prompts", str(prompts), "--num-requests", "4",
                                     "--concurrency", "2", "--max-prompts", "2", "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, (result.output, result.exception)
    assert "# hass-deploy bench-serve" in result.stdout and "completed 4, failed 0" in result.stdout
    assert json.loads((tmp_path / "o" / "serve_bench.json").read_text())["completed"] == 4


def test_cli_bench_serve_errors(prompts):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    base = ["bench-serve", "--prompts", str(prompts)]
    _one_error_line(runner.invoke(cli_app, [*base, "--url", url]), f"cannot reach the server at {url}")
    _one_error_line(runner.invoke(cli_app, [*base, "--concurrency", "0"]), "--concurrency must be >= 1")
    _one_error_line(runner.invoke(cli_app, [*base, "--check"]), "--check needs --target")
    _one_error_line(runner.invoke(cli_app, [*base, "--target", "t"]), "are for --check")
