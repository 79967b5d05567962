"""`hass-deploy serve`: the engine behind an OpenAI-compatible HTTP API (FastAPI on uvicorn).

Routes: POST /v1/completions, POST /v1/chat/completions (streamed as server-sent events when asked), GET
/v1/models, GET /health (503 while loading and while draining), GET /metrics (Prometheus). Errors are OpenAI's
shape, {"error": {"message", "type", "param", "code"}}: 400 invalid request (the field named), 404 unknown model,
429 queue full (with Retry-After), 503 loading or draining.

The HTTP layer only translates: bodies to RequestOptions, Deltas to chunks. A client that goes away cancels its
request (the engine frees the slot at the next round boundary). SIGTERM/SIGINT drain: no new requests (503), the
running and queued ones finish within --shutdown-timeout (then are cancelled), and the process exits 0.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from hass_deploy.errors import HassDeployError
from hass_deploy.serving.engine import Completion, Engine, EngineClosedError, Handle, QueueFullError, RequestError
from hass_deploy.serving.metrics import EngineMetrics
from hass_deploy.serving.protocol import ChatRequest, CompletionRequest

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1  # what a 429 tells the client to wait: about one request's worth of rounds on a CPU


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        headers = {"Retry-After": str(RETRY_AFTER_S)} if self.status == 429 else None
        return JSONResponse(body, status_code=self.status, headers=headers)


@dataclass
class ServerState:
    """What the routes share: the engine once loaded, and the server's phase."""

    model_name: str
    metrics: EngineMetrics
    engine: Engine | None = None
    draining: bool = False
    load_error: str | None = None

    def ready_engine(self) -> Engine:
        if self.draining:
            raise ApiError(503, "the server is shutting down", "unavailable_error", code="draining")
        if self.engine is None:
            raise ApiError(503, "the model is loading", "unavailable_error", code="loading")
        return self.engine


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="hass-deploy", docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(_, err: ApiError):
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, err: RequestValidationError):
        first = err.errors()[0]
        location = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = ".".join(location) or None
        if first.get("type") == "extra_forbidden":
            message = f"unknown field {param!r}: not supported by this server"
        elif first.get("type") == "json_invalid":
            message, param = "the request body is not valid JSON", None
        else:
            message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        return ApiError(400, message, "invalid_request_error", param).response()

    @app.get("/health")
    async def health():
        if state.draining or state.engine is None:
            phase = "draining" if state.draining else "loading"
            return JSONResponse({"status": phase}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        engine = state.ready_engine()
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "hass-deploy", "max_model_len": engine.max_len}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        engine = _check_model(state, body.model)
        prompt = _guard(lambda: engine.encode(body.prompt_input()))
        return await _respond(state, engine, body, prompt, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        engine = _check_model(state, body.model)
        messages = [m.as_template_message() for m in body.messages]
        prompt = _guard(lambda: engine.encode(messages, chat=True))
        return await _respond(state, engine, body, prompt, request, chat=True)

    return app


def _check_model(state: ServerState, model: str | None) -> Engine:
    engine = state.ready_engine()
    if model is not None and model != state.model_name:
        raise ApiError(404, f"The model `{model}` does not exist (this server serves `{state.model_name}`).",
                       "not_found_error", "model", "model_not_found")
    return engine


def _guard(call: Callable):
    """Engine errors as HTTP errors."""
    try:
        return call()
    except RequestError as err:
        raise ApiError(400, str(err), "invalid_request_error", err.param) from None
    except QueueFullError as err:
        raise ApiError(429, str(err), "rate_limit_error", code="queue_full") from None
    except EngineClosedError as err:
        raise ApiError(503, str(err), "unavailable_error", code="draining") from None
    except HassDeployError as err:
        raise ApiError(400, str(err), "invalid_request_error") from None


async def _respond(state: ServerState, engine: Engine, body, prompt: list[int], request: Request, chat: bool):
    options = _guard(body.options)
    handle = _guard(lambda: engine.submit(prompt, options))
    watcher = asyncio.create_task(_cancel_on_disconnect(request, handle))
    chunks = _Chunks(state.model_name, chat, body.return_token_ids)
    if body.stream:
        return StreamingResponse(_stream(handle, chunks, body.include_usage, watcher), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        deltas = [delta async for delta in handle]
    finally:
        watcher.cancel()
        if handle.completion is None:
            handle.cancel()
    completion = handle.completion
    if completion.finish_reason == "error":
        raise ApiError(500, f"generation failed: {completion.error}", "server_error")
    text = "".join(d.text or "" for d in deltas)
    return chunks.final(completion, text)


async def _cancel_on_disconnect(request: Request, handle: Handle) -> None:
    """Wait for the client to go away, then cancel its request (vLLM's listen_for_disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            handle.cancel()
            return


async def _stream(handle: Handle, chunks: "_Chunks", include_usage: bool, watcher: asyncio.Task):
    try:
        if chunks.chat:
            yield _event(chunks.chunk({"role": "assistant", "content": ""}, None, None))
        async for delta in handle:
            if delta.text or chunks.token_ids:
                yield _event(chunks.delta(delta, handle))
        completion = handle.completion
        if completion.finish_reason == "error":
            error = {"message": f"generation failed: {completion.error}", "type": "server_error", "param": None,
                     "code": None}
            yield _event({"error": error})
        else:
            yield _event(chunks.finish(completion))
            if include_usage:
                yield _event(chunks.usage(completion))
        yield "data: [DONE]\n\n"
    finally:  # the client went away (the generator is closed or cancelled) or the stream ended
        watcher.cancel()
        if handle.completion is None:
            handle.cancel()


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


class _Chunks:
    """Builds the OpenAI response objects of one request (completion or chat; whole or streamed)."""

    def __init__(self, model: str, chat: bool, token_ids: bool):
        self.model, self.chat, self.token_ids = model, chat, token_ids
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.sent_prompt_ids = False

    def _envelope(self, kind: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices,
                **extra}

    def chunk(self, content: dict | str, finish_reason: str | None, token_ids: list[int] | None, **extra) -> dict:
        choice: dict = {"index": 0}
        if self.chat:
            choice["delta"] = content if isinstance(content, dict) else {"content": content}
            choice["logprobs"] = None
        else:
            choice["text"], choice["logprobs"] = content, None
        choice["finish_reason"] = finish_reason
        if token_ids is not None:
            choice["token_ids"] = token_ids
        return self._envelope("chat.completion.chunk" if self.chat else "text_completion", [choice], usage=None,
                              **extra)

    def delta(self, delta, handle: Handle) -> dict:
        extra = {}
        if self.token_ids and not self.sent_prompt_ids:
            extra["prompt_token_ids"], self.sent_prompt_ids = handle.prompt_ids, True
        return self.chunk(delta.text or "", None, delta.token_ids if self.token_ids else None, **extra)

    def finish(self, completion: Completion) -> dict:
        return self.chunk({} if self.chat else "", completion.finish_reason, [] if self.token_ids else None,
                          speculation=speculation(completion))

    def usage(self, completion: Completion) -> dict:
        return self._envelope("chat.completion.chunk" if self.chat else "text_completion", [],
                              usage=usage(completion), speculation=speculation(completion))

    def final(self, completion: Completion, text: str) -> dict:
        choice: dict = {"index": 0, "finish_reason": completion.finish_reason, "logprobs": None}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        if self.token_ids:
            choice["token_ids"] = completion.token_ids
        extra = {"prompt_token_ids": completion.prompt_ids} if self.token_ids else {}
        return self._envelope("chat.completion" if self.chat else "text_completion", [choice],
                              usage=usage(completion), speculation=speculation(completion), **extra)


def usage(completion: Completion) -> dict:
    prompt, generated = len(completion.prompt_ids), len(completion.token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


def speculation(completion: Completion) -> dict:
    """Our extension: how speculation went for this request (llama.cpp's draft_n / draft_n_accepted, and tau)."""
    return {"mode": completion.speculation, "rounds": completion.rounds, "drafts": completion.drafts,
            "draft_tokens": completion.draft_tokens, "accepted_tokens": completion.accepted_tokens,
            "accepted_per_position": completion.accepted_per_position, "tau": round(completion.tau, 4)}


# -- running it ---------------------------------------------------------------------------------------------------


class Server(uvicorn.Server):
    """uvicorn's server, which opens the port at once and builds the engine in a background thread (/health is
    503 meanwhile), and on SIGTERM/SIGINT drains instead of stopping at once. uvicorn re-raises the signal it
    caught when it returns, which would make the exit status 143; a drained shutdown is a normal exit (0)."""

    def __init__(self, load: Callable[[EngineMetrics], Engine], model_name: str, host: str, port: int,
                 shutdown_timeout: float, metrics_prefix: str = "hass_deploy",
                 on_ready: Callable[[int], None] | None = None):
        self.state = ServerState(model_name=model_name, metrics=EngineMetrics(model_name, metrics_prefix))
        super().__init__(uvicorn.Config(create_app(self.state), host=host, port=port, log_level="warning",
                                        access_log=False, timeout_graceful_shutdown=5, lifespan="off"))
        self._load, self._on_ready, self.shutdown_timeout = load, on_ready, shutdown_timeout
        self.port: int | None = None

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.servers and self.servers[0].sockets:
            self.port = self.servers[0].sockets[0].getsockname()[1]
            threading.Thread(target=self._load_engine, name="hass-deploy-load", daemon=True).start()

    def _load_engine(self) -> None:
        state = self.state
        try:
            state.engine = self._load(state.metrics).start()
        except Exception as err:  # reported by `serve` once uvicorn has stopped
            state.load_error = str(err) if isinstance(err, HassDeployError) else f"{type(err).__name__}: {err}"
            if not isinstance(err, HassDeployError):
                log.exception("loading failed")
            self.should_exit = True
            return
        if self._on_ready is not None:
            self._on_ready(self.port)

    def handle_exit(self, sig, frame) -> None:
        state = self.state
        if state.draining or state.engine is None:  # a second signal, or nothing to drain: stop now
            self.force_exit = self.should_exit and sig == signal.SIGINT
            self.should_exit = True
            return
        state.draining = True
        threading.Thread(target=self.drain, name="hass-deploy-drain", daemon=True).start()

    def drain(self) -> None:
        """No new requests; running and queued ones get `shutdown_timeout` seconds; then the server stops."""
        self.state.draining = True
        if not self.state.engine.drain(self.shutdown_timeout):
            log.warning("shutdown timeout (%.0f s): cancelled the requests still running", self.shutdown_timeout)
        self.should_exit = True

    def serve_until_stopped(self) -> None:
        """Run in this thread until stopped; raise HassDeployError if the port or the model could not be had."""
        try:
            self.run()
        except SystemExit:  # uvicorn's answer to a port it cannot bind (it has logged why)
            self.port = None
        if self.state.engine is not None:
            self.state.engine.stop()
        if self.state.load_error is not None:
            raise HassDeployError(self.state.load_error)
        if self.port is None:
            raise HassDeployError(f"could not listen on {self.config.host}:{self.config.port} (in use?)")
