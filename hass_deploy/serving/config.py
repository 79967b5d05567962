"""The serving engine's settings: one frozen dataclass, each default and its help defined once (no torch here: the
CLI reads it for its options)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from hass_deploy.config import HybridConfig, LookupConfig, TreeConfig, at_least, option
from hass_deploy.errors import ConfigError

SPECULATION = ("draft", "lookup", "hybrid", "off")


@dataclass(frozen=True)
class EngineConfig:
    parallel: int = option(1, "Decoder slots: requests decoded concurrently, each with its own KV buffers over "
                           "shared weights.")
    # Beyond it submit() fails fast (QueueFullError).
    max_queue: int = option(64, "Requests waiting for a slot before new ones get 429.")
    # serving/batcher.py: a tick computes the waiting steps of every busy slot, oldest first, within both bounds.
    max_batch: int | None = option(None, "Most sequences one batched step computes (default: every busy slot; 1: "
                                   "one slot's step at a time, unbatched).")
    max_batch_rows: int | None = option(None, "Most rows one batched step computes (default: no bound; a step "
                                        "larger than it runs alone). Long prompts already run as chunks.")
    # draft and hybrid need a loaded draft; without one the default falls back.
    speculation: str = option("draft", "Per-request default (requests may override it): draft, lookup, hybrid "
                              "(draft + lookup in one tree) or off.")
    request_timeout: float | None = option(None, "Seconds a request may take from arrival (default: none; "
                                           "requests may set `timeout`).")
    tree: TreeConfig = field(default_factory=TreeConfig)
    lookup: LookupConfig = field(default_factory=LookupConfig)
    hybrid: HybridConfig = field(default_factory=HybridConfig)

    def __post_init__(self) -> None:
        at_least(1, parallel=self.parallel)
        at_least(0, max_queue=self.max_queue)
        at_least(1, max_batch=self.max_batch, max_batch_rows=self.max_batch_rows)
        if self.speculation not in SPECULATION:
            raise ConfigError(f"--speculation must be one of {', '.join(SPECULATION)}, got {self.speculation!r}")
        if self.request_timeout is not None and not self.request_timeout > 0:
            raise ConfigError(f"--request-timeout must be > 0 seconds, got {self.request_timeout}")


@dataclass(frozen=True)
class ServerConfig:
    """Where `hass-deploy serve` listens and how it stops."""

    host: str = option("127.0.0.1", "Address to listen on.")
    port: int = option(8000, "Port to listen on (0: any free port, printed when ready).")
    served_model_name: str | None = option(None, "The model name clients use (default: the target directory's name).")
    shutdown_timeout: float = option(30.0, "On SIGTERM: seconds for running requests to finish before they are "
                                     "cancelled.")
    metrics_prefix: str = option("hass_deploy", "Prefix of the Prometheus metric names.")

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"--port must be in 0..65535, got {self.port}")
        if not self.shutdown_timeout >= 0:
            raise ConfigError(f"--shutdown-timeout must be >= 0 seconds, got {self.shutdown_timeout}")


@dataclass(frozen=True)
class LoadTestConfig:
    """One load test."""

    url: str = option("http://127.0.0.1:8000", "The running OpenAI-compatible server (`hass-deploy serve`).")
    model: str | None = option(None, "Model name to request (default: the server's first, from GET /v1/models).")
    num_requests: int = option(32, "Requests sent in all.")
    concurrency: int = option(4, "Most requests in flight at once.")
    request_rate: float = option(math.inf, "Requests/s, Poisson arrivals (inf: all at once).")
    max_tokens: int = option(128, "max_tokens of each request.")
    temperature: float = option(0.0, "0 = greedy (what --check compares).")
    chat: bool = option(False, "/v1/chat/completions instead of /v1/completions.")
    metrics_prefix: str = option("hass_deploy", "Prefix of the server's Prometheus counters (hass_deploy, vllm, ...).")
    timeout: float = option(600.0, "Seconds per request, from sending to the end of its stream.")
    seed: int = option(0, "Seed of the Poisson arrival times.")
    max_prompts: int | None = option(None, "First N prompts of each file (default: all).")

    def __post_init__(self) -> None:
        at_least(1, num_requests=self.num_requests, concurrency=self.concurrency, max_tokens=self.max_tokens,
                 max_prompts=self.max_prompts)
        if not self.request_rate > 0:
            raise ConfigError(f"--request-rate must be > 0 (inf: all at once), got {self.request_rate}")
        if not self.temperature >= 0 or not self.timeout > 0:
            raise ConfigError("--temperature must be >= 0 and --timeout > 0")
        if not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"--url must start with http:// or https://, got {self.url!r}")
        object.__setattr__(self, "url", self.url.rstrip("/"))  # paths are appended to it
