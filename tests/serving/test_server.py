"""`hass-deploy serve` end to end: a real uvicorn server on 127.0.0.1 driven by the official openai client and
httpx, on the bigram target (its greedy text is known: "café☕!café☕!...") with a draft that predicts it exactly.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hass_deploy.generation import Pipeline
from hass_deploy.serving.engine import EngineConfig
from hass_deploy.serving.server import Server
from serving.bigram import CYCLE, write_bigram_target, write_oracle_draft
from serving.servers import engine_loader, gated_loader, running_server, url

CONTEXT = 512  # the bigram target's max_position_embeddings: each slot's KV rows


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("bigram")
    target = write_bigram_target(root / "target")
    return target, write_oracle_draft(target, root / "draft")


@pytest.fixture(scope="module")
def server(models):
    with running_server(engine_loader(*models, EngineConfig(parallel=2, max_queue=8)), "bigram") as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=url(server) + "/v1", api_key="unused", max_retries=0)


def expected_text(prompt: str, tokens: int) -> str:
    """What the bigram target writes after `prompt` (ending in a byte of CYCLE): the cycle's bytes, on."""
    cycle = CYCLE.encode()
    start = cycle.index(prompt.encode()[-1]) + 1
    return bytes(cycle[(start + i) % len(cycle)] for i in range(tokens)).decode()


def metric_samples(server) -> dict[tuple, float]:
    text = httpx.get(url(server) + "/metrics").text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "model_name"))
            samples[(sample.name, labels)] = sample.value
    return samples


def sse_events(response: httpx.Response) -> list:
    """The `data:` payloads of a server-sent event stream, [DONE] included as the string."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
        else:
            assert line == "", line
    return events


# -- the happy paths -------------------------------------------------------------------------------------------


def test_models_and_health(server, client):
    assert httpx.get(url(server) + "/health").json() == {"status": "ok"}
    models = client.models.list()
    assert [m.id for m in models.data] == ["bigram"]
    assert models.data[0].model_extra["max_model_len"] == CONTEXT


def test_completion_is_the_offline_greedy_output(server, client, models):
    # 18 tokens: two whole cycles, ending on a character boundary.
    response = client.completions.create(model="bigram", prompt="café", max_tokens=18, temperature=0,
                                         extra_body={"return_token_ids": True})
    choice = response.choices[0]
    assert choice.text == expected_text("café", 18) == "☕!café☕!café"
    assert choice.finish_reason == "length"
    assert response.usage.prompt_tokens == 5 and response.usage.completion_tokens == 18
    assert response.usage.total_tokens == 23
    pipe = Pipeline.load(models[0], models[1])
    offline = pipe.generate(pipe.encode("café", chat=False), pipe_config(18))
    assert choice.model_extra["token_ids"] == offline.output_ids
    assert response.model_extra["prompt_token_ids"] == pipe.encode("café", chat=False)
    spec = response.model_extra["speculation"]
    assert spec["mode"] == "draft" and spec["drafts"] == spec["rounds"] > 0
    assert spec["accepted_tokens"] > spec["rounds"]  # the oracle draft is accepted: more than 1 token per round
    assert spec["tau"] == pytest.approx((spec["accepted_tokens"] + spec["rounds"]) / spec["rounds"], abs=1e-3)


def pipe_config(max_tokens: int):
    from hass_deploy.config import GenerationConfig

    return GenerationConfig(max_new_tokens=max_tokens)


def test_streamed_completion_equals_the_whole_one(server, client):
    # 36 tokens: four whole cycles from "é", so the text ends on a character boundary.
    whole = client.completions.create(model="bigram", prompt="caf", max_tokens=36, temperature=0).choices[0].text
    with httpx.stream("POST", url(server) + "/v1/completions", json={
            "model": "bigram", "prompt": "caf", "max_tokens": 36, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "return_token_ids": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    usage_chunk, finish_chunk, deltas = events[-2], events[-3], events[:-3]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 36
    assert finish_chunk["choices"][0]["finish_reason"] == "length"
    assert all(event["usage"] is None for event in deltas)
    texts = [event["choices"][0]["text"] for event in deltas]
    assert "".join(texts) + finish_chunk["choices"][0]["text"] == whole
    assert not any("\ufffd" in text for text in texts)  # a split character is never sent half
    assert sum(len(event["choices"][0]["token_ids"]) for event in deltas) == 36
    assert len(deltas) < 36  # speculation delivers several tokens per round


def test_openai_client_streams(client):
    stream = client.completions.create(model="bigram", prompt="café", max_tokens=9, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream) == expected_text("café", 9)


def test_chat_applies_the_template(server, client, models):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say café"}]
    whole = client.chat.completions.create(model="bigram", messages=messages, max_tokens=12, temperature=0)
    pipe = Pipeline.load(models[0])
    templated = pipe.target.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    templated = templated["input_ids"] if hasattr(templated, "keys") else templated
    assert whole.usage.prompt_tokens == len(templated)
    assert whole.choices[0].message.role == "assistant"
    assert whole.object == "chat.completion"
    stream = client.chat.completions.create(model="bigram", messages=messages, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].choices == []
    newer = client.chat.completions.create(model="bigram", messages=messages, max_completion_tokens=7, temperature=0)
    assert newer.usage.completion_tokens == 7 and newer.choices[0].finish_reason == "length"


# -- stop strings ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt, stop, text, tokens", [
    ("café", "fé", "☕!ca", 9),  # spans three tokens ("f", and é's two bytes)
    ("caf", "☕", "é", 5),  # a stop string of one 3-byte character, split over three tokens
    ("café", ["!c", "☕!"], "", 4),  # the one that starts first wins
    ("café", "zzz", "☕!café☕!café", 18),  # never seen: the whole text, finish_reason length
])
@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings(server, prompt, stop, text, tokens, stream):
    body = {"model": "bigram", "prompt": prompt, "max_tokens": 18, "temperature": 0, "stop": stop, "stream": stream,
            "stream_options": {"include_usage": True} if stream else None}
    if stream:
        with httpx.stream("POST", url(server) + "/v1/completions", json=body) as response:
            events = sse_events(response)
        texts = [e["choices"][0]["text"] for e in events[:-2]]
        got, finish, usage = "".join(texts), events[-3]["choices"][0]["finish_reason"], events[-2]["usage"]
        assert not any(s in t for t in texts for s in ([stop] if isinstance(stop, str) else stop))
    else:
        response = httpx.post(url(server) + "/v1/completions", json=body).json()
        got, finish, usage = response["choices"][0]["text"], response["choices"][0]["finish_reason"], response["usage"]
    assert got == text
    assert finish == ("length" if tokens == 18 else "stop")
    assert usage["completion_tokens"] == tokens  # up to the token that completed the stop string


def test_stop_token_ids_end_with_the_token(server, models):
    bang = Pipeline.load(models[0]).target.tokenizer("!")["input_ids"][0]
    response = httpx.post(url(server) + "/v1/completions", json={
        "prompt": "café", "max_tokens": 30, "temperature": 0, "stop_token_ids": [bang]}).json()
    assert response["choices"][0]["text"] == "☕!" and response["choices"][0]["finish_reason"] == "stop"


# -- per-request speculation and metrics -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["draft", "lookup", "hybrid", "off"])
def test_speculation_per_request_keeps_the_text(server, mode):
    response = httpx.post(url(server) + "/v1/completions", json={
        "prompt": "café☕!café", "max_tokens": 27, "temperature": 0, "speculation": mode}).json()
    assert response["choices"][0]["text"] == expected_text("café☕!café", 27)
    spec = response["speculation"]
    assert spec["mode"] == mode
    assert (spec["draft_tokens"] == 0) == (mode == "off")


def test_metrics_move_by_one_request(server, client):
    before = metric_samples(server)
    response = client.completions.create(model="bigram", prompt="café", max_tokens=24, temperature=0)
    after = metric_samples(server)
    spec = response.model_extra["speculation"]

    def moved(name, **labels):
        key = (f"hass_deploy:{name}", tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert moved("prompt_tokens_total") == 5
    assert moved("generation_tokens_total") == 24
    assert moved("spec_decode_num_drafts_total") == spec["drafts"]
    assert moved("spec_decode_num_draft_tokens_total") == spec["draft_tokens"]
    assert moved("spec_decode_num_accepted_tokens_total") == spec["accepted_tokens"]
    for position, count in enumerate(spec["accepted_per_position"]):
        assert moved("spec_decode_num_accepted_tokens_per_pos_total", position=str(position)) == count
    assert moved("request_success_total", finished_reason="length") == 1
    assert moved("time_to_first_token_seconds_count") == 1
    assert moved("e2e_request_latency_seconds_count") == 1
    assert moved("request_queue_time_seconds_count") == 1
    assert moved("inter_token_latency_seconds_count") == spec["rounds"]
    assert after[("hass_deploy:num_requests_running", ())] == 0


# -- bad requests ---------------------------------------------------------------------------------------------

TOO_LONG = "café☕!" * 60  # 540 bytes: more than the 512-row context
BAD_REQUESTS = [
    # (route, body, status, param, words in the message)
    ("completions", "{not json", 400, None, "JSON"),
    ("completions", {"max_tokens": 5}, 400, "prompt", "prompt"),
    ("completions", {"prompt": "café", "mystery": 1}, 400, "mystery", "unknown field"),
    ("completions", {"prompt": "café", "max_tokens": 0}, 400, "max_tokens", "max_tokens"),
    ("completions", {"prompt": "café", "temperature": -1}, 400, "temperature", "temperature"),
    ("completions", {"prompt": "café", "top_p": 0}, 400, "top_p", "top_p"),
    ("completions", {"prompt": "café", "n": 2}, 400, "n", "n > 1"),
    ("completions", {"prompt": "café", "logprobs": 3}, 400, "logprobs", "logprobs is not supported"),
    ("completions", {"prompt": "café", "presence_penalty": 0.5}, 400, "presence_penalty", "not supported"),
    ("completions", {"prompt": "café", "stop": ""}, 400, "stop", "empty"),
    ("completions", {"prompt": "café", "stream_options": {"include_usage": True}}, 400, "stream_options", "stream"),
    ("completions", {"prompt": TOO_LONG}, 400, "prompt", "540 tokens"),
    ("completions", {"prompt": "café", "max_tokens": 600}, 400, "max_tokens", "at most 507"),
    ("completions", {"prompt": [5, 9999]}, 400, "prompt", "9999 is outside the vocabulary"),
    ("completions", {"prompt": ["a", "b"]}, 400, "prompt", "batched prompts"),
    ("completions", {"prompt": "café", "stop_token_ids": [-1]}, 400, "stop_token_ids", "outside the vocabulary"),
    ("completions", {"prompt": "café", "speculation": "fast"}, 400, "speculation", "speculation"),
    ("completions", {"prompt": "café", "model": "gpt-4"}, 404, "model", "`gpt-4` does not exist"),
    ("chat/completions", {"messages": []}, 400, "messages", "messages"),
    ("chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role", "role"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, 400,
     "tools", "tools is not supported"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                          "max_completion_tokens": 4}, 400, "max_completion_tokens", "not both"),
]


@pytest.mark.parametrize("route, body, status, param, words", BAD_REQUESTS,
                         ids=[f"{i}-{row[3]}" for i, row in enumerate(BAD_REQUESTS)])
def test_bad_requests_get_a_clear_error_and_the_server_goes_on(server, route, body, status, param, words):
    content = body if isinstance(body, str) else json.dumps(body)
    response = httpx.post(f"{url(server)}/v1/{route}", content=content, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert words in error["message"], error["message"]
    assert httpx.post(url(server) + "/v1/completions", json={"prompt": "café", "max_tokens": 3, "temperature": 0}
                      ).json()["choices"][0]["text"] == "☕"


# -- load: queue bound, disconnects, loading -------------------------------------------------------------------


@pytest.fixture
def one_slot(models):
    """One slot, no queue, and a target that runs only the steps the test allows."""
    gated, load = gated_loader(models[0], EngineConfig(parallel=1, max_queue=0, speculation="off"))
    with running_server(load, "bigram") as server:
        yield server, gated
        gated.release()


def _open_stream(client: httpx.Client, server, gated):
    """Start a streamed request and hold it after its first token: it runs, its slot is busy."""
    gated.hold(1)  # the prefill
    request = client.build_request("POST", url(server) + "/v1/completions", json={
        "prompt": "café", "max_tokens": 100, "temperature": 0, "stream": True, "return_token_ids": True})
    response = client.send(request, stream=True)
    lines = response.iter_lines()
    while not next(lines).startswith("data: "):  # with token ids, every round sends a chunk, even without text
        pass
    return response, lines


def test_a_full_queue_answers_429_with_retry_after(one_slot):
    server, gated = one_slot
    with httpx.Client() as client:
        _, lines = _open_stream(client, server, gated)
        refused = httpx.post(url(server) + "/v1/completions", json={"prompt": "café", "max_tokens": 2})
        gated.release()
        rest = "".join(lines)
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "queue_full"
    assert "[DONE]" in rest  # the running request was not disturbed


def test_a_dropped_client_frees_its_slot(one_slot):
    server, gated = one_slot
    before = metric_samples(server)
    with httpx.Client() as client:
        _open_stream(client, server, gated)[0].close()  # the client goes away mid-stream
    deadline = time.perf_counter() + 10
    while (metric_samples(server).get(("hass_deploy:request_success_total", (("finished_reason", "abort"),)), 0)
           == before.get(("hass_deploy:request_success_total", (("finished_reason", "abort"),)), 0)):
        assert time.perf_counter() < deadline, "the dropped request was not cancelled"
        gated.hold(1)  # let the held round run: the engine cancels between rounds
        time.sleep(0.01)
    gated.release()
    response = httpx.post(url(server) + "/v1/completions", json={"prompt": "café", "max_tokens": 3, "temperature": 0})
    assert response.status_code == 200 and response.json()["choices"][0]["text"] == "☕"
    after = metric_samples(server)
    generated = after[("hass_deploy:generation_tokens_total", ())] - before.get(("hass_deploy:generation_tokens_total",
                                                                                 ()), 0)
    assert generated < 100  # the dropped request stopped early (and its slot served the next one)


def test_health_is_503_while_loading(models):
    gate = threading.Event()
    load = engine_loader(*models)
    server = Server(lambda metrics: (gate.wait(30), load(metrics))[1], "bigram", "127.0.0.1", 0, 5.0)
    thread = threading.Thread(target=server.serve_until_stopped, daemon=True)
    thread.start()
    try:
        while server.port is None:
            time.sleep(0.01)
        health = httpx.get(url(server) + "/health")
        assert health.status_code == 503 and health.json() == {"status": "loading"}
        busy = httpx.post(url(server) + "/v1/completions", json={"prompt": "café"})
        assert busy.status_code == 503 and busy.json()["error"]["code"] == "loading"
        gate.set()
        while server.state.engine is None:
            time.sleep(0.01)
        assert httpx.get(url(server) + "/health").status_code == 200
    finally:
        gate.set()
        server.should_exit = True
        thread.join(30)


# -- shutdown ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shutdown_timeout, finish_reason", [(30.0, "length"), (0.2, "abort")])
def test_sigterm_drains_running_requests_then_stops(models, shutdown_timeout, finish_reason):
    """The signal handler's path, in process: new requests get 503; the running one finishes within the shutdown
    timeout or is cancelled at its end; then the server stops."""
    gated, load = gated_loader(models[0], EngineConfig(parallel=1, max_queue=4, speculation="off"))
    with running_server(load, "bigram", shutdown_timeout) as server, httpx.Client() as client:
        _, lines = _open_stream(client, server, gated)
        server.handle_exit(signal.SIGTERM, None)
        assert httpx.get(url(server) + "/health").json() == {"status": "draining"}
        refused = httpx.post(url(server) + "/v1/completions", json={"prompt": "café", "max_tokens": 2})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
        time.sleep(2 * shutdown_timeout if shutdown_timeout < 1 else 0)  # past a short timeout: cancelled
        gated.release()
        events = [line for line in lines if line]
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2][len("data: "):])["choices"][0]["finish_reason"] == finish_reason
        server.thread.join(30)
        assert not server.thread.is_alive()


def test_the_serve_command_exits_0_on_sigterm(models, tmp_path):
    """The real process: it prints its address when ready, serves, and a SIGTERM ends it with status 0."""
    command = [sys.executable, "-m", "hass_deploy.cli", "serve", "--target", str(models[0]), "--draft",
               str(models[1]), "--port", "0", "--served-model-name", "bigram", "--parallel", "2"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while "serving bigram on" not in line:
            line = process.stderr.readline()
            assert line or process.poll() is None, "the server exited before it was ready"
        address = line.split(" on ")[1].split()[0]
        response = httpx.post(address + "/v1/completions", json={"prompt": "café", "max_tokens": 9,
                                                                   "temperature": 0})
        assert response.json()["choices"][0]["text"] == "☕!café"
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        process.kill()
        process.wait()


@pytest.mark.parametrize("args, words", [
    (["--target", "missing-dir"], "no such model directory"),
    (["--parallel", "0"], "--parallel must be >= 1"),
    (["--speculation", "fast"], "--speculation must be one of"),
    (["--port", "70000"], "--port must be in"),
    (["--max-queue", "-1"], "--max-queue must be >= 0"),
    (["--shutdown-timeout", "-1"], "--shutdown-timeout must be >= 0"),
])
def test_the_serve_command_refuses_bad_options_in_one_line(models, args, words):
    from typer.testing import CliRunner

    from hass_deploy.cli import app

    result = CliRunner().invoke(app, ["serve", "--target", str(models[0]), *args])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], lines
