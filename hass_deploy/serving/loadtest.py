"""`hass-deploy bench-serve`: a load test of a running OpenAI-compatible server, like `vllm bench serve`.

`num_requests` streamed completions go to the server over HTTP, the prompts cycling through the prompt files,
with at most `concurrency` in flight; with a finite `request_rate` they arrive as a Poisson process (exponential
gaps from a seeded RNG), otherwise all at once. Times are the client's `time.perf_counter()`, from the moment a
request is sent (after it got one of the `concurrency` slots):

    * TTFT: until the first streamed chunk that carries content (text or token ids);
    * ITL: the gaps between successive chunks that carry content (a chunk may hold a speculative round's tokens);
    * TPOT: (E2E - TTFT) / (output tokens - 1), over requests with at least two output tokens;
    * E2E: until the stream's `data: [DONE]`.

Output tokens are the final usage chunk's `completion_tokens` (else the token ids streamed, else the content
chunks). Throughputs are completed requests and their tokens over the run's wall time (first send to last
answer). A failed request (non-2xx answer, transport error, timeout, broken stream) counts only as a failure, by
kind (`HTTP 429`, `timeout`, ...). Acceptance comes from the server's Prometheus counters
(`<prefix>:spec_decode_num_drafts_total`, ...) scraped before and after the run and differenced: acceptance rate =
accepted / draft tokens, mean acceptance length = 1 + accepted / drafts, position i = accepted at i / drafts.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hass_deploy.atomic import check_output_dir, write_text
from hass_deploy.bench.metrics import first_mismatch
from hass_deploy.bench.runner import load_prompt_sets
from hass_deploy.config import GenerationConfig, RuntimeConfig, choose_backend
from hass_deploy.errors import ConfigError, HassDeployError
from hass_deploy.generation import Pipeline
from hass_deploy.progress import progress_bar
from hass_deploy.serving.config import LoadTestConfig

# httpx and prometheus_client (the serve extra) are imported where used: the engine and the tests run without them.


@dataclass
class RequestRecord:
    """One request as the client saw it; times in seconds."""

    index: int
    prompt_index: int
    start: float = 0.0  # perf_counter when sent
    end: float = 0.0  # when its stream ended or it failed
    chunk_times: list[float] = field(default_factory=list)  # after `start`, of each chunk carrying content
    output_tokens: int = 0
    prompt_tokens: int = 0
    token_ids: list[int] | None = None  # the chunks' token_ids, concatenated (return_token_ids)
    prompt_token_ids: list[int] | None = None  # as the server encoded the prompt
    finish_reason: str | None = None
    speculation: dict | None = None  # the usage chunk's extension: drafts, draft_tokens, accepted_tokens, tau
    error_kind: str | None = None  # None: completed
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error_kind is None

    @property
    def e2e(self) -> float:
        return self.end - self.start

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] if self.chunk_times else None


class _StreamError(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def latency_stats(seconds: Sequence[float]) -> dict:
    """Mean and percentiles in milliseconds (None when there is nothing to measure)."""
    import numpy as np

    if not seconds:
        return {"n": 0, "mean": None, "p50": None, "p90": None, "p99": None}
    ms = np.asarray(seconds, dtype=float) * 1e3
    return {"n": len(ms), "mean": float(ms.mean()),
            **{f"p{q}": float(np.percentile(ms, q)) for q in (50, 90, 99)}}


def peak_concurrency(records: Sequence[RequestRecord]) -> int:
    """Most requests in flight at one moment (one ending as another starts is not an overlap)."""
    events = sorted([(r.start, 1) for r in records] + [(r.end, -1) for r in records])
    peak = current = 0
    for _, step in events:
        current += step
        peak = max(peak, current)
    return peak


def summarise(records: Sequence[RequestRecord], duration: float | None = None) -> dict:
    """The run's figures; `duration` defaults to first start to last end."""
    done = [r for r in records if r.ok]
    errors: dict[str, dict] = {}
    for r in records:
        if not r.ok:
            errors.setdefault(r.error_kind, {"count": 0, "message": r.error})["count"] += 1
    if duration is None:
        duration = max(r.end for r in records) - min(r.start for r in records) if records else 0.0
    output, prompt = sum(r.output_tokens for r in done), sum(r.prompt_tokens for r in done)
    per_s = (lambda x: x / duration) if duration > 0 else (lambda x: None)
    speculative = [r.speculation for r in done if r.speculation]
    return {
        "completed": len(done), "failed": len(records) - len(done), "errors": errors, "duration_s": duration,
        "total_input_tokens": prompt, "total_output_tokens": output, "request_throughput": per_s(len(done)),
        "output_throughput": per_s(output), "total_token_throughput": per_s(prompt + output),
        "ttft_ms": latency_stats([r.ttft for r in done if r.ttft is not None]),
        "tpot_ms": latency_stats([(r.e2e - r.ttft) / (r.output_tokens - 1) for r in done
                                  if r.output_tokens > 1 and r.ttft is not None]),
        "itl_ms": latency_stats([b - a for r in done for a, b in zip(r.chunk_times, r.chunk_times[1:])]),
        "e2e_ms": latency_stats([r.e2e for r in done]),
        "peak_concurrency": peak_concurrency(records),
        "usage_speculation": {k: sum(s.get(k, 0) for s in speculative) for k in ("drafts", "draft_tokens",
                                                                                  "accepted_tokens")}
        if speculative else None,
    }


_COUNTERS = {"drafts": "spec_decode_num_drafts", "draft_tokens": "spec_decode_num_draft_tokens",
             "accepted_tokens": "spec_decode_num_accepted_tokens"}
_PER_POSITION = "spec_decode_num_accepted_tokens_per_pos"


def read_counters(text: str, prefix: str) -> tuple[dict[str, float], dict[int, float]]:
    """The speculation counters in Prometheus text, summed over labels other than `position`."""
    from prometheus_client.parser import text_string_to_metric_families

    names = {f"{prefix}:{base}_total": key for key, base in (*_COUNTERS.items(), ("per_position", _PER_POSITION))}
    totals: dict[str, float] = {}
    positions: dict[int, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:  # the family drops a counter's `_total`; its samples keep it
            key = names.get(sample.name)
            if key == "per_position" and "position" in sample.labels:
                position = int(sample.labels["position"])
                positions[position] = positions.get(position, 0.0) + sample.value
            elif key is not None and key != "per_position":
                totals[key] = totals.get(key, 0.0) + sample.value
    return totals, positions


def spec_delta(before: str | None, after: str | None, prefix: str = LoadTestConfig.metrics_prefix) -> dict:
    """Acceptance over the run: the counters after minus before (`available: False` without both scrapes or
    without the counters)."""
    if before is None or after is None:  # a scrape failed
        return {"available": False}
    try:
        (b_totals, b_positions), (a_totals, a_positions) = read_counters(before, prefix), read_counters(after, prefix)
    except ValueError:  # not Prometheus text
        return {"available": False}
    if not all(key in a_totals for key in _COUNTERS):
        return {"available": False}
    delta = {key: round(a_totals[key] - b_totals.get(key, 0.0)) for key in _COUNTERS}
    drafts, accepted = delta["drafts"], delta["accepted_tokens"]
    return {
        "available": True, **delta,
        "acceptance_rate": accepted / delta["draft_tokens"] if delta["draft_tokens"] else None,
        "mean_acceptance_length": 1 + accepted / drafts if drafts else None,
        "per_position": [(a_positions[i] - b_positions.get(i, 0.0)) / drafts for i in sorted(a_positions)]
        if drafts else [],
    }


def _take_chunk(record: RequestRecord, chunk: dict, at: float) -> None:
    if not isinstance(chunk, dict):
        raise _StreamError("bad stream", f"a chunk is not a JSON object: {str(chunk)[:100]}")
    if "error" in chunk:
        raise _StreamError("stream error", str((chunk["error"] or {}).get("message", chunk["error"])))
    if chunk.get("prompt_token_ids") and record.prompt_token_ids is None:
        record.prompt_token_ids = list(chunk["prompt_token_ids"])
    content = False
    for choice in chunk.get("choices") or []:
        text = choice["text"] if "text" in choice else (choice.get("delta") or {}).get("content")
        ids = choice.get("token_ids")
        if ids:
            record.token_ids = (record.token_ids or []) + list(ids)
        content = content or bool(text) or bool(ids)
        record.finish_reason = choice.get("finish_reason") or record.finish_reason
    if content:
        record.chunk_times.append(at)
    usage = chunk.get("usage")
    if usage:
        record.output_tokens, record.prompt_tokens = usage.get("completion_tokens", 0), usage.get("prompt_tokens", 0)
        record.speculation = chunk.get("speculation") or usage.get("speculation") or record.speculation


def _error_message(response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200] or response.reason_phrase


async def _send(client, config: LoadTestConfig, model: str, prompt, record: RequestRecord) -> None:
    import httpx

    body = {"model": model, "max_tokens": config.max_tokens, "temperature": config.temperature, "stream": True,
            "stream_options": {"include_usage": True}, "return_token_ids": True, "ignore_eos": False}
    if config.chat:
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": prompt}]
    else:
        path, body["prompt"] = "/v1/completions", prompt
    record.start = time.perf_counter()
    try:
        async with asyncio.timeout(config.timeout), client.stream("POST", path, json=body) as response:
            if not response.is_success:
                await response.aread()
                raise _StreamError(f"HTTP {response.status_code}", _error_message(response))
            finished = False
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    finished = True
                    break
                _take_chunk(record, json.loads(data), time.perf_counter() - record.start)
            if not finished:
                raise _StreamError("incomplete stream", "the stream ended without data: [DONE]")
        if not record.output_tokens:  # no usage chunk
            record.output_tokens = len(record.token_ids) if record.token_ids else len(record.chunk_times)
    except _StreamError as err:
        record.error_kind, record.error = err.kind, str(err)
    except TimeoutError:
        record.error_kind, record.error = "timeout", f"no complete answer within {config.timeout:g} s"
    except json.JSONDecodeError as err:
        record.error_kind, record.error = "bad stream", f"a chunk is not JSON: {err}"
    except httpx.HTTPError as err:
        record.error_kind, record.error = type(err).__name__, str(err) or type(err).__name__
    finally:
        record.end = time.perf_counter()


async def _get(client, path: str):
    import httpx

    try:
        return await client.get(path)
    except httpx.HTTPError as err:
        raise HassDeployError(f"cannot reach the server at {client.base_url}: {type(err).__name__} {err}") from None


async def _scrape(client) -> str | None:
    """The /metrics text, or None (no such endpoint, or the server went away)."""
    import httpx

    try:
        response = await client.get("/metrics")
    except httpx.HTTPError:
        return None
    return response.text if response.is_success else None


def _progress_bar(total: int, enabled: bool):
    """A rich bar on stderr (requests done / total, rate, failures) and the callback that advances it."""
    bar = progress_bar("requests", "{task.fields[rate]}", enabled=enabled)
    task = bar.add_task("requests", total=total, rate="")
    done, failed, started = [0], [0], time.perf_counter()

    def advance(record: RequestRecord) -> None:
        done[0], failed[0] = done[0] + 1, failed[0] + (not record.ok)
        bar.update(task, advance=1, rate=f"{done[0] / (time.perf_counter() - started):.2f} req/s"
                   + (f", {failed[0]} failed" if failed[0] else ""))

    return bar, advance


async def _run(config: LoadTestConfig, prompts: Sequence, progress: bool) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=config.concurrency + 1, max_keepalive_connections=config.concurrency + 1)
    async with httpx.AsyncClient(base_url=config.url, timeout=config.timeout, limits=limits, trust_env=False) as client:
        models = await _get(client, "/v1/models")  # also the check that the server is up
        model = config.model
        if model is None:
            try:
                model = models.raise_for_status().json()["data"][0]["id"]
            except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
                raise HassDeployError(f"GET {config.url}/v1/models gave no model id (HTTP {models.status_code}): "
                                      "pass --model") from None
        before = await _scrape(client)
        rng = random.Random(config.seed)
        records = [RequestRecord(i, i % len(prompts)) for i in range(config.num_requests)]
        slots = asyncio.Semaphore(config.concurrency)

        bar, advance = _progress_bar(config.num_requests, progress)

        async def one(record: RequestRecord) -> None:
            async with slots:
                await _send(client, config, model, prompts[record.prompt_index], record)
            advance(record)

        with bar:
            tasks, start, arrival = [], time.perf_counter(), 0.0
            for record in records:
                await asyncio.sleep(max(0.0, start + arrival - time.perf_counter()))
                tasks.append(asyncio.create_task(one(record)))
                arrival += rng.expovariate(config.request_rate) if math.isfinite(config.request_rate) else 0.0
            await asyncio.gather(*tasks)
            duration = time.perf_counter() - start
        after = await _scrape(client)
    return {"model": model, "records": records, "duration": duration, "metrics": (before, after)}


def check_lossless(records: Sequence[RequestRecord], prompts: Sequence, target: Path, draft: Path | None,
                   artifacts: Path | None, max_tokens: int, chat: bool) -> dict:
    """Compare each completed response's token ids with offline greedy generation of the same prompt ids."""
    generation = GenerationConfig(max_new_tokens=max_tokens)
    pipe = Pipeline.load(target, draft, RuntimeConfig(backend=choose_backend("auto", artifacts)), generation, artifacts)
    references: dict[tuple[int, ...], list[int]] = {}
    mismatches, checked, unchecked = [], 0, 0
    for r in records:
        if not r.ok or r.token_ids is None:
            unchecked += r.ok
            continue
        ids = tuple(r.prompt_token_ids or pipe.encode(prompts[r.prompt_index], chat))
        if ids not in references:
            references[ids] = pipe.generate(list(ids), generation).output_ids
        checked += 1
        position = first_mismatch(r.token_ids, references[ids])
        if position is not None:
            mismatches.append({"request": r.index, "position": position})
    return {"checked": checked, "unchecked": unchecked, "mismatches": mismatches,
            "identical": None if not checked else not mismatches}


def check_line(check: dict) -> str:
    if check["identical"] is None:
        return f"lossless check: nothing to check ({check['unchecked']} completed responses carried no token_ids)"
    if check["identical"]:
        return f"lossless check: all {check['checked']} greedy responses identical to offline generation"
    return f"lossless check FAILED: {len(check['mismatches'])} of {check['checked']} responses differ from offline " \
           "generation"


def _number(value, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def render_markdown(report: dict) -> str:
    c, s = report["config"], report["speculation"]
    errors = ", ".join(f"{kind}: {e['count']} ({e['message']})" for kind, e in report["errors"].items())
    lines = [
        "# hass-deploy bench-serve", "",
        f"- server: `{c['url']}`, model `{report['model']}`, {'chat' if c['chat'] else 'text'} completions",
        f"- {c['num_requests']} requests, concurrency {c['concurrency']}, "
        + ("all sent at once" if c["request_rate"] is None else f"Poisson arrivals at {c['request_rate']:g}/s")
        + f" (peak in flight {report['peak_concurrency']}); max tokens {c['max_tokens']}, temperature "
        f"{c['temperature']:g}",
        f"- completed {report['completed']}, failed {report['failed']} in {report['duration_s']:.2f} s"
        + (f"; {errors}" if errors else ""),
        "", "| throughput | |", "|---|---:|",
        f"| requests/s | {_number(report['request_throughput'])} |",
        f"| output tokens/s | {_number(report['output_throughput'], 1)} |",
        f"| total tokens/s | {_number(report['total_token_throughput'], 1)} |",
        "", "| ms | mean | p50 | p90 | p99 |", "|---|---:|---:|---:|---:|",
        *[f"| {name} | " + " | ".join(_number(report[key][q]) for q in ("mean", "p50", "p90", "p99")) + " |"
          for name, key in (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("ITL", "itl_ms"), ("E2E", "e2e_ms"))],
        "",
    ]
    if s["available"]:
        lines += [f"Speculation (`{c['metrics_prefix']}:` counters, after − before): {s['drafts']} drafts, "
                  f"{s['draft_tokens']} draft tokens, {s['accepted_tokens']} accepted; acceptance rate "
                  f"{_number(s['acceptance_rate'])}, mean acceptance length {_number(s['mean_acceptance_length'])}; "
                  "per position: " + (", ".join(f"{a:.2f}" for a in s["per_position"]) or "–"), ""]
    else:
        lines += [f"Speculation: no `{c['metrics_prefix']}:spec_decode_*` counters at /metrics.", ""]
    if report.get("check") is not None:
        lines += [check_line(report["check"])]
    return "\n".join(lines).rstrip() + "\n"


def write_report(report: dict, out: str | Path) -> dict[str, Path]:
    """Write serve_bench.json and serve_bench.md into `out`, each in one rename."""
    out = check_output_dir(out)
    paths = {"json": out / "serve_bench.json", "markdown": out / "serve_bench.md"}
    write_text(paths["json"], json.dumps(report, indent=2, default=str) + "\n")
    write_text(paths["markdown"], render_markdown(report))
    return paths


def run_load_test(config: LoadTestConfig, prompt_files: Sequence[str | Path], out: str | Path | None = None, *,
                  check: bool = False, target: Path | None = None, draft: Path | None = None,
                  artifacts: Path | None = None, progress: bool = True) -> dict:
    """Run the load test (and with `check`, the lossless check against `target`); write `out` if given."""
    if not check and any(v is not None for v in (target, draft, artifacts)):
        raise ConfigError("--target, --draft and --artifacts are for --check")
    if check and target is None:
        raise ConfigError("--check needs --target (the model the server serves)")
    if check and config.temperature != 0:
        raise ConfigError("--check compares greedy responses: use --temperature 0")
    if out is not None:
        check_output_dir(out)  # before the run, not after it
    prompts = [p for s in load_prompt_sets(prompt_files, config.max_prompts) for p in s.prompts]
    run = asyncio.run(_run(config, [p.text if p.text is not None else p.ids for p in prompts], progress))
    records = run["records"]
    settings = {**asdict(config), "request_rate": config.request_rate if math.isfinite(config.request_rate) else None}
    report = {"config": settings, "model": run["model"], **summarise(records, run["duration"]),
              "speculation": spec_delta(*run["metrics"], config.metrics_prefix), "check": None}
    if check:
        report["check"] = check_lossless(records, prompts, target, draft, artifacts, config.max_tokens, config.chat)
    report["requests"] = [{"index": r.index, "prompt": r.prompt_index, "error": r.error_kind and f"{r.error_kind}: "
                           f"{r.error}", "ttft_ms": None if r.ttft is None else r.ttft * 1e3, "e2e_ms": r.e2e * 1e3,
                           "output_tokens": r.output_tokens, "finish_reason": r.finish_reason} for r in records]
    if out is not None:
        write_report(report, out)
    return report
