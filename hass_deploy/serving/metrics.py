"""Prometheus metrics of a serving engine, in the schema vLLM and llama.cpp share (serving-notes.md §3).

Speculative decoding (counters): drafts (rounds that verified at least one draft token), draft tokens verified,
draft tokens accepted, and accepted tokens per position (tree depth), so that

    acceptance rate        = rate(num_accepted_tokens) / rate(num_draft_tokens)
    mean acceptance length = 1 + rate(num_accepted_tokens) / rate(num_drafts)     (the paper's tau)
    per-position rate      = num_accepted_tokens_per_pos{position=i} / num_drafts

Latency histograms (time to first token, inter-token latency per round, time per output token, end to end,
queue time), running/waiting gauges, prompt and generation token counters, and finished requests by reason.
Each engine has its own registry (no process-global state), served by `GET /metrics`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Buckets in seconds: per-round gaps on a CPU are milliseconds; whole requests are seconds to minutes.
_FAST = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_SLOW = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


class EngineMetrics:
    def __init__(self, model_name: str, prefix: str = "hass_deploy"):
        self.registry = CollectorRegistry()
        labels = {"model_name": model_name}
        self._labels = labels

        def counter(name, doc, extra=()):
            return Counter(f"{prefix}:{name}", doc, [*labels, *extra], registry=self.registry)

        def histogram(name, doc, buckets):
            return Histogram(f"{prefix}:{name}", doc, [*labels], buckets=buckets, registry=self.registry)

        def gauge(name, doc):
            return Gauge(f"{prefix}:{name}", doc, [*labels], registry=self.registry)

        self.drafts = counter("spec_decode_num_drafts", "Rounds that verified at least one draft token.")
        self.draft_tokens = counter("spec_decode_num_draft_tokens", "Draft tokens verified.")
        self.accepted_tokens = counter("spec_decode_num_accepted_tokens", "Draft tokens accepted.")
        self.accepted_per_pos = counter("spec_decode_num_accepted_tokens_per_pos",
                                        "Draft tokens accepted at each position (tree depth, from 0).", ("position",))
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens processed.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self.finished = counter("request_success", "Finished requests by finish reason.", ("finished_reason",))
        self.ttft = histogram("time_to_first_token_seconds", "Arrival to first token, queue and prefill included.",
                              _SLOW)
        self.itl = histogram("inter_token_latency_seconds", "Gap between a request's rounds (each gives 1+ tokens).",
                             _FAST)
        self.tpot = histogram("time_per_output_token_seconds", "(e2e - ttft) / (tokens - 1), per request.", _FAST)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to last token.", _SLOW)
        self.queue_time = histogram("request_queue_time_seconds", "Arrival to admission into a slot.", _SLOW)
        self.batch_sequences = histogram("batch_sequences", "Sequences per batched target step (a tick).", _SIZES)
        self.batch_rows = histogram("batch_rows", "Rows per batched target step: tree nodes, plain rows, prefill "
                                    "pieces.", _ROWS)
        self.draft_batch_rows = histogram("draft_batch_rows", "Rows per batched draft step.", _ROWS)
        self.running = gauge("num_requests_running", "Requests in a decoder slot.")
        self.waiting = gauge("num_requests_waiting", "Requests in the queue.")

    def round(self, drafted: int, accepted: int, tokens: int, gap_s: float | None) -> None:
        """One speculative round of one request: `drafted` draft tokens verified, `accepted` of them kept,
        `tokens` delivered (accepted + bonus, fewer when a stop cut the round)."""
        labels = self._labels
        if drafted:
            self.drafts.labels(**labels).inc()
            self.draft_tokens.labels(**labels).inc(drafted)
            self.accepted_tokens.labels(**labels).inc(accepted)
            for position in range(accepted):
                self.accepted_per_pos.labels(**labels, position=str(position)).inc()
        self.generation_tokens.labels(**labels).inc(tokens)
        if gap_s is not None:
            self.itl.labels(**labels).observe(gap_s)

    def tick(self, tick) -> None:
        """One tick of the step batcher (`batcher.Tick`): what its target and draft steps computed."""
        labels = self._labels
        if tick.model == "target":
            self.batch_sequences.labels(**labels).observe(tick.sequences)
            self.batch_rows.labels(**labels).observe(tick.rows)
        else:
            self.draft_batch_rows.labels(**labels).observe(tick.rows)

    def admitted(self, prompt_tokens: int, queue_s: float) -> None:
        self.prompt_tokens.labels(**self._labels).inc(prompt_tokens)
        self.queue_time.labels(**self._labels).observe(queue_s)

    def first_token(self, ttft_s: float) -> None:
        self.ttft.labels(**self._labels).observe(ttft_s)

    def finish(self, reason: str, e2e_s: float, tokens: int, ttft_s: float | None) -> None:
        labels = self._labels
        self.finished.labels(**labels, finished_reason=reason).inc()
        self.e2e.labels(**labels).observe(e2e_s)
        if ttft_s is not None and tokens > 1:
            self.tpot.labels(**labels).observe((e2e_s - ttft_s) / (tokens - 1))

    def load(self, running: int, waiting: int) -> None:
        self.running.labels(**self._labels).set(running)
        self.waiting.labels(**self._labels).set(waiting)

    def render(self) -> bytes:
        return generate_latest(self.registry)
