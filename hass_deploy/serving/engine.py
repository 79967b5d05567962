"""The embeddable serving engine: N decoder slots over shared weights, a bounded queue, streamed results.

    engine = Engine.load("target", "draft", EngineConfig(parallel=4), artifacts="onnx/hass")
    engine.start()
    handle = engine.submit("def fib(n):", RequestOptions(max_tokens=64, stop=("\\n\\n",)))
    async for delta in handle:            # Delta(token_ids, text) per round
        print(delta.text, end="")
    completion = handle.completion        # tokens, finish reason, tau, draft/accepted counts, timings

A slot is a (target, draft) pair of step backends with KV buffers of its own, forked from the first one: the
weights and ONNX Runtime sessions exist once, a slot costs its KV buffers. Each slot has a thread that takes the
oldest queued request (`scheduler.py`) and runs its decode loop; the slots' model steps meet in the step batcher
(`batcher.py`), which computes every busy slot's waiting step in one batched step per model: continuous batching,
new requests joining between ticks, long prompts in chunks. Callers (the HTTP server's event loop, or plain threads)
only submit, iterate and cancel. Each sequence's step computes what it computes alone, so a request's tokens are
offline `generate`'s whatever runs beside it (greedy: the same tokens; sampled: the same draws for a seed).

Per request the decoder is built over the slot's backends: without the draft when speculation is off for that
request, with prompt lookup when asked. Stop strings and incremental text are `text.py`'s; a request that stops
on one, is cancelled or times out is closed between rounds and frees its slot for the next queued request.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from hass_deploy.config import GenerationConfig, RuntimeConfig, SamplingConfig, choose_backend
from hass_deploy.errors import ConfigError, HassDeployError
from hass_deploy.generation import Pipeline
from hass_deploy.runtime.backends.base import DraftBackend, TargetBackend
from hass_deploy.runtime.decoder import GenerationResult, SpeculativeDecoder, check_token_ids
from hass_deploy.runtime.lookup import NgramCache, check_tree_budget
from hass_deploy.serving.batcher import SlotDraft, SlotTarget, StepBatcher
from hass_deploy.serving.config import SPECULATION, EngineConfig
from hass_deploy.serving.scheduler import QueueFullError, Scheduler
from hass_deploy.serving.text import TextStream

if TYPE_CHECKING:  # prometheus-client is the `serve` extra's: the engine runs without it
    from hass_deploy.serving.metrics import EngineMetrics

__all__ = ["Completion", "Delta", "Engine", "EngineConfig", "EngineClosedError", "Handle", "QueueFullError",
           "RequestError", "RequestOptions"]

log = logging.getLogger(__name__)

NEEDS_DRAFT = ("draft", "hybrid")  # speculation modes that run the draft head


class RequestError(HassDeployError):
    """A request the engine cannot run as given (HTTP 400); `param` names the field at fault."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class EngineClosedError(HassDeployError):
    """The engine is draining or stopped and takes no new requests (HTTP 503)."""


@dataclass(frozen=True)
class RequestOptions:
    """Per-request options (the OpenAI fields and the common extensions, serving-notes.md §1)."""

    max_tokens: int | None = None  # None: up to the end of the context
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None  # None: a fresh random seed (sampling only)
    stop: tuple[str, ...] = ()  # stop strings: not returned, generation ends at the first
    stop_token_ids: tuple[int, ...] = ()  # extra stop tokens (returned, like EOS)
    ignore_eos: bool = False
    speculation: str | None = None  # draft, lookup, hybrid or off; None = the engine's default
    timeout: float | None = None  # seconds from arrival; None = the engine's default

    def __post_init__(self) -> None:
        if self.max_tokens is not None and (isinstance(self.max_tokens, bool) or self.max_tokens < 1):
            raise RequestError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}", "max_tokens")
        try:
            SamplingConfig(self.temperature, self.top_p, self.top_k)
        except ConfigError as err:
            raise RequestError(str(err), next(f for f in ("temperature", "top_p", "top_k") if f in str(err))) from None
        if any(not s for s in self.stop):
            raise RequestError("stop strings must not be empty", "stop")
        if self.speculation is not None and self.speculation not in SPECULATION:
            raise RequestError(f"speculation must be one of {', '.join(SPECULATION)}, got {self.speculation!r}",
                               "speculation")
        if self.timeout is not None and not self.timeout > 0:
            raise RequestError(f"timeout must be > 0 seconds, got {self.timeout}", "timeout")

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.temperature, self.top_p, self.top_k)


@dataclass(frozen=True)
class Delta:
    """What one round gave a request: its new tokens and the text they release (held back: partial UTF-8
    characters and anything that could still become a stop string)."""

    token_ids: list[int]
    text: str | None  # None when the model has no tokenizer


@dataclass(frozen=True)
class Completion:
    """The final record of a request."""

    request_id: str
    prompt_ids: list[int]
    token_ids: list[int]  # generated tokens (a stop string's tokens cut at the one that completed it)
    text: str | None
    finish_reason: str  # stop, length, abort (cancelled), timeout or error
    stop: str | int | None  # the stop string or stop token that ended it
    error: str | None
    speculation: str  # what drafted its trees: draft, lookup or off
    rounds: int
    drafts: int  # rounds that verified draft tokens
    draft_tokens: int
    accepted_tokens: int
    accepted_per_position: list[int]
    queue_s: float
    ttft_s: float | None  # arrival to first token
    e2e_s: float

    @property
    def tau(self) -> float:
        """Tokens per round (accepted + 1), the paper's acceptance length."""
        return (self.accepted_tokens + self.rounds) / self.rounds if self.rounds else 0.0


_END = object()


class Handle:
    """A submitted request: iterate it (async or not) for Deltas; `completion` is set when it ends.

    The worker thread pushes items; an asyncio consumer is woken through its loop, a thread by a condition.
    """

    def __init__(self, request_id: str, prompt_ids: list[int], engine: "Engine"):
        self.request_id, self.prompt_ids = request_id, prompt_ids
        self.completion: Completion | None = None
        self._request: _Request | None = None  # the engine's state for it, set when it is queued
        self._engine = engine
        self._items: deque = deque()
        self._ready = threading.Condition()
        try:
            self._loop = asyncio.get_running_loop()
            self._wakeup: asyncio.Event | None = asyncio.Event()
        except RuntimeError:  # submitted from a plain thread
            self._loop, self._wakeup = None, None

    def cancel(self) -> None:
        """Stop the request at the next round boundary (or take it out of the queue); its slot is freed."""
        self._engine._cancel(self)

    def _push(self, item) -> None:  # worker thread
        with self._ready:
            self._items.append(item)
            self._ready.notify_all()
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._wakeup.set)
            except RuntimeError:  # the consumer's loop has closed: nobody is listening any more
                pass

    def _pop(self):
        """The next item, or None when there is none yet; the end marker stays, so iterating again (or
        `wait()` after a loop) ends at once."""
        with self._ready:
            if not self._items:
                return None
            return self._items[0] if self._items[0] is _END else self._items.popleft()

    def __iter__(self) -> Iterator[Delta]:
        while True:
            with self._ready:
                self._ready.wait_for(lambda: self._items)
            item = self._pop()
            if item is _END:
                return
            yield item

    async def __aiter__(self):
        if self._wakeup is None:
            raise RuntimeError("this request was submitted outside an event loop: iterate it with a for loop")
        while True:
            self._wakeup.clear()
            item = self._pop()
            if item is None:
                await self._wakeup.wait()
                continue
            if item is _END:
                return
            yield item

    async def result(self) -> Completion:
        """Wait for the end (discarding the deltas) and return the completion."""
        async for _ in self:
            pass
        return self.completion

    def wait(self) -> Completion:
        for _ in self:
            pass
        return self.completion


@dataclass(eq=False)
class _Request:
    """The engine's own state for one request."""

    handle: Handle
    options: RequestOptions
    config: GenerationConfig
    speculation: str
    arrival: float
    deadline: float | None
    text: TextStream | None
    result: GenerationResult
    stream: Iterator[list[int]] | None = None
    admitted: float | None = None
    first_token: float | None = None
    last_round: float | None = None
    cancelled: bool = False
    stop: str | int | None = None


@dataclass
class _Slot:
    target: TargetBackend
    draft: DraftBackend | None


class Engine:
    """N decoder slots, a queue, one worker thread. Build with `Engine.load` or from backends you opened."""

    def __init__(self, target, draft, tokenizer, eos_token_ids: Sequence[int], config: EngineConfig = EngineConfig(),
                 metrics: EngineMetrics | None = None, corpus: NgramCache | None = None):
        """`target`/`draft`: step backends (the first slot); the other slots are their forks. `corpus`: prompt
        lookup's static n-gram statistics, read by every request (never written)."""
        if config.speculation in NEEDS_DRAFT and draft is None:  # the default falls back; a request asking fails
            config = replace(config, speculation="off")
        self.config, self.tokenizer, self.metrics, self.corpus = config, tokenizer, metrics, corpus
        self.max_tree_tokens = getattr(target, "max_tree_tokens", None)  # exports fix the verify-step budget
        self.eos_token_ids = tuple(eos_token_ids)
        self.max_len, self.vocab_size = target.max_len, target.vocab_size
        self.has_draft = draft is not None
        self.batcher = StepBatcher(config.max_batch, config.max_batch_rows,
                                   None if metrics is None else metrics.tick)
        backends = [(target, draft)] + [(target.fork(), None if draft is None else draft.fork())
                                        for _ in range(config.parallel - 1)]
        slots = [_Slot(SlotTarget(t, self.batcher), None if d is None else SlotDraft(d, self.batcher))
                 for t, d in backends]
        self.scheduler: Scheduler[_Slot, _Request] = Scheduler(slots, config.max_queue)
        self._lock = threading.Condition()
        self._ids = itertools.count()
        self._closed = False  # no new requests (draining or stopped)
        self._stopping = False  # the worker exits when idle
        self._workers: list[threading.Thread] = []

    @classmethod
    def load(cls, target_dir: str | Path, draft_dir: str | Path | None = None, config: EngineConfig = EngineConfig(),
             runtime: RuntimeConfig | None = None, artifacts: str | Path | None = None,
             metrics: EngineMetrics | None = None, lookup_corpus: str | Path | None = None) -> "Engine":
        """Load the models once (through `Pipeline.load`: the same checks as `generate`) and fork the slots.
        `runtime` None: ONNX Runtime when `artifacts` is given, else torch on the CPU in fp32. `lookup_corpus`:
        token ids of prompt lookup's static corpus (`NgramCache.from_file`), counted with `config.lookup`."""
        runtime = runtime or RuntimeConfig(backend=choose_backend("auto", artifacts))

        corpus = None if lookup_corpus is None else NgramCache.from_file(lookup_corpus, config.lookup)
        # Lookup's budget is checked per request (`_generation`): the server may run fine without it.
        pipe = Pipeline.load(target_dir, draft_dir, runtime, GenerationConfig(tree=config.tree), artifacts, corpus)
        return cls(pipe.decoder.target, pipe.decoder.draft, pipe.target.tokenizer, pipe.target.eos_token_ids, config,
                   metrics, corpus)

    # -- the caller's side ------------------------------------------------------------------------------------

    def start(self) -> "Engine":
        if not self._workers:
            self._workers = [threading.Thread(target=self._serve, args=(index,), name=f"hass-deploy-slot-{index}",
                                              daemon=True) for index in range(len(self.scheduler.slots))]
            for worker in self._workers:
                worker.start()
        return self

    def encode(self, prompt: str | Sequence[int], chat: bool = False) -> list[int]:
        """Token ids of a prompt: ids as given, text through the tokenizer, or a list of chat messages through
        its chat template (`chat=True`)."""
        if isinstance(prompt, str) or chat:
            if self.tokenizer is None:
                raise RequestError("this model has no tokenizer: send the prompt as token ids", "prompt")
            if chat:
                if not getattr(self.tokenizer, "chat_template", None):
                    raise RequestError("this model's tokenizer has no chat template: use /v1/completions",
                                       "messages")
                ids = self.tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True)
                return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
            return list(self.tokenizer(prompt)["input_ids"])
        return [int(t) for t in prompt]

    def submit(self, prompt: str | Sequence[int], options: RequestOptions = RequestOptions()) -> Handle:
        """Queue a request and return its handle. Raises RequestError (bad request), QueueFullError (busy) or
        EngineClosedError (draining)."""
        ids = self.encode(prompt)
        config, speculation = self._generation(ids, options)
        text = None
        if self.tokenizer is not None:
            text = TextStream(self.tokenizer, ids, options.stop)
        elif options.stop:
            raise RequestError("stop strings need a tokenizer; this model has none (use stop_token_ids)", "stop")
        now = time.perf_counter()
        timeout = options.timeout or self.config.request_timeout
        handle = Handle(f"req-{next(self._ids)}", ids, self)
        request = _Request(handle, options, config, speculation, now, None if timeout is None else now + timeout,
                           text, GenerationResult(prompt_ids=ids))
        handle._request = request
        with self._lock:
            if self._closed:
                raise EngineClosedError("the server is shutting down and takes no new requests")
            self.scheduler.enqueue(request)
            self._report_load()
            self._lock.notify_all()
        return handle

    def _generation(self, ids: list[int], options: RequestOptions) -> tuple[GenerationConfig, str]:
        if not ids:
            raise RequestError("the prompt is empty: give at least one token", "prompt")
        for values, what, param in ((ids, "token id", "prompt"), (options.stop_token_ids, "stop token id",
                                                                  "stop_token_ids")):
            try:
                check_token_ids(values, self.vocab_size, what)
            except HassDeployError as err:
                raise RequestError(str(err), param) from None
        room = self.max_len - len(ids)
        if room < 1:
            raise RequestError(f"the prompt has {len(ids)} tokens and this server's context is {self.max_len} "
                               "tokens: shorten the prompt (or restart the server with a larger --max-seq-len)",
                               "prompt")
        max_tokens = options.max_tokens or room
        if max_tokens > room:
            raise RequestError(f"this server's context is {self.max_len} tokens: the prompt has {len(ids)}, so "
                               f"max_tokens can be at most {room}, got {max_tokens}", "max_tokens")
        speculation = options.speculation or self.config.speculation
        if speculation in NEEDS_DRAFT and not self.has_draft:
            raise RequestError(f"speculation {speculation!r} needs a draft model; this server has none (use lookup "
                               "or off)", "speculation")
        eos = () if options.ignore_eos else self.eos_token_ids
        seed = options.seed if options.seed is not None else secrets.randbits(63)
        config = GenerationConfig(max_new_tokens=max_tokens, sampling=options.sampling, tree=self.config.tree,
                                  lookup=self.config.lookup if speculation in ("lookup", "hybrid") else None,
                                  hybrid=self.config.hybrid, seed=seed,
                                  eos_token_ids=tuple(dict.fromkeys((*eos, *options.stop_token_ids))))
        try:
            check_tree_budget(config, speculation == "hybrid", self.max_tree_tokens)
        except ConfigError as err:
            raise RequestError(str(err), "speculation") from None
        return config, speculation

    def _cancel(self, handle: Handle) -> None:
        with self._lock:
            request = handle._request
            request.cancelled = True
            if self.scheduler.remove(request):  # still queued: ends now
                self._finish(request, "abort")
                self._report_load()
            self._lock.notify_all()

    @property
    def running(self) -> int:
        return len(self.scheduler.running)

    @property
    def waiting(self) -> int:
        return len(self.scheduler.queue)

    def drain(self, timeout: float) -> bool:
        """Take no new requests, let queued and running ones finish for up to `timeout` seconds, then cancel
        what is left. True when everything finished in time."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self._closed = True
            finished = self._lock.wait_for(lambda: self.scheduler.idle, max(0.0, deadline - time.monotonic()))
            if not finished:
                for request in [*self.scheduler.queue, *self.scheduler.running.values()]:
                    request.cancelled = True
                self._lock.notify_all()
                self._lock.wait_for(lambda: self.scheduler.idle, 30.0)  # at most one round per slot
        return finished

    def stop(self) -> None:
        """Cancel everything and stop the worker."""
        with self._lock:
            self._closed = self._stopping = True
            for request in [*self.scheduler.queue, *self.scheduler.running.values()]:
                request.cancelled = True
            self._lock.notify_all()
        for worker in self._workers:
            worker.join()
        self._workers = []

    # -- the worker's side ------------------------------------------------------------------------------------

    def _serve(self, index: int) -> None:
        """Slot `index`'s thread: take the oldest queued request, run its rounds, repeat until the engine stops."""
        while True:
            with self._lock:
                self._expire_queued()
                request = self.scheduler.admit(index)
                if request is None:
                    if self._stopping:
                        return
                    self._lock.wait(timeout=self._next_deadline())
                    continue
                self._admit(index, request)
            with self.batcher.member():
                while not self._round(index, request):
                    pass

    def _admit(self, index: int, request: _Request) -> None:
        slot = self.scheduler.slots[index]
        request.admitted = time.perf_counter()
        draft = slot.draft if request.speculation in NEEDS_DRAFT else None
        decoder = SpeculativeDecoder(slot.target, draft, self.corpus)
        request.stream = decoder.stream(request.handle.prompt_ids, request.config, request.result)
        if self.metrics is not None:
            self.metrics.admitted(len(request.handle.prompt_ids), request.admitted - request.arrival)
        self._report_load()

    def _round(self, index: int, request: _Request) -> bool:
        """One round of one request (the first one includes the prefill), outside the lock; True when the request
        has ended."""
        now = time.perf_counter()
        if request.cancelled or (request.deadline is not None and now >= request.deadline):
            return self._end(index, request, "abort" if request.cancelled else "timeout")
        result = request.result
        rounds = result.rounds
        try:
            tokens = next(request.stream)
        except StopIteration:  # not reached: the decoder flags its last tokens (stop_reason) as it yields them
            return self._end(index, request, "stop")
        except Exception as err:  # a bug or a backend failure: this request ends, the engine keeps serving
            log.exception("request %s failed", request.handle.request_id)
            return self._end(index, request, "error", f"{type(err).__name__}: {err}")
        now = time.perf_counter()
        reason = _FINISH.get(result.stop_reason)
        if reason == "stop" and tokens and tokens[-1] in request.options.stop_token_ids:
            request.stop = tokens[-1]
        text = None
        if request.text is not None:
            update = request.text.push(tokens)
            if update.stop_at is not None:  # a stop string: the tokens after the one that completed it are dropped
                del result.output_ids[len(result.output_ids) - len(tokens) + update.stop_at:]
                tokens, reason, request.stop = tokens[:update.stop_at], "stop", update.stop
            text = update.text + (request.text.flush() if reason is not None and update.stop_at is None else "")
        if self.metrics is not None:
            if request.first_token is None:
                self.metrics.first_token(now - request.arrival)
            # The first call gives the prefill's token (no round); each later call is one round.
            drafted, accepted = (result.draft_lengths[-1], result.accept_lengths[-1]) if result.rounds > rounds else (0, 0)
            self.metrics.round(drafted, accepted, len(tokens),
                               None if request.last_round is None else now - request.last_round)
        request.first_token = request.first_token or now
        request.last_round = now
        request.handle._push(Delta(tokens, text))
        if reason is not None:
            return self._end(index, request, reason)
        with self._lock:  # between rounds: queued requests past their deadline end now, not when a slot frees
            self._expire_queued()
        return False

    def _end(self, index: int, request: _Request, reason: str, error: str | None = None) -> bool:
        if request.stream is not None:
            request.stream.close()
        if reason == "timeout" and request.text is not None:  # what it did generate is the client's
            held = request.text.flush()
            if held:
                request.handle._push(Delta([], held))
        with self._lock:
            self.scheduler.release(index)
            self._finish(request, reason, error)
            self._report_load()
            self._lock.notify_all()
        return True

    def _finish(self, request: _Request, reason: str, error: str | None = None) -> None:
        """Build the completion and close the handle (under the lock)."""
        now = time.perf_counter()
        result, handle = request.result, request.handle
        tokens = list(result.output_ids)
        drafted = [a for d, a in zip(result.draft_lengths, result.accept_lengths) if d]
        completion = Completion(
            request_id=handle.request_id, prompt_ids=handle.prompt_ids, token_ids=tokens,
            text=None if request.text is None else request.text.text, finish_reason=reason, stop=request.stop,
            error=error, speculation=request.speculation, rounds=result.rounds, drafts=len(drafted),
            draft_tokens=sum(result.draft_lengths), accepted_tokens=sum(drafted),
            accepted_per_position=list(result.depth_accepts),
            queue_s=(request.admitted or now) - request.arrival,
            ttft_s=None if request.first_token is None else request.first_token - request.arrival,
            e2e_s=now - request.arrival)
        handle.completion = completion
        if self.metrics is not None:
            self.metrics.finish(reason, completion.e2e_s, len(tokens), completion.ttft_s)
        handle._push(_END)

    def _expire_queued(self) -> None:
        now = time.perf_counter()
        for request in [r for r in self.scheduler.queue if r.deadline is not None and now >= r.deadline]:
            self.scheduler.remove(request)
            self._finish(request, "timeout")
            self._report_load()

    def _next_deadline(self) -> float | None:
        deadlines = [r.deadline for r in self.scheduler.queue if r.deadline is not None]
        return None if not deadlines else max(0.0, min(deadlines) - time.perf_counter())

    def _report_load(self) -> None:
        if self.metrics is not None:
            self.metrics.load(self.running, self.waiting)


# The decoder's stop reasons, as OpenAI finish reasons.
_FINISH = {"eos": "stop", "max_new_tokens": "length", "cache_full": "length", "": None}
