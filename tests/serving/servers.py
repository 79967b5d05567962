"""Real servers for the tests: uvicorn on 127.0.0.1, an ephemeral port, in a background thread."""

from __future__ import annotations

import contextlib
import threading

from hass_deploy.serving.engine import Engine
from hass_deploy.serving.server import Server


@contextlib.contextmanager
def running_server(load, name: str = "test-model", shutdown_timeout: float = 5.0):
    """Yields the Server once its engine is loaded (`server.port`, `server.state.engine`, `server.thread`); stops
    it after."""
    ready = threading.Event()
    server = Server(load, name, "127.0.0.1", 0, shutdown_timeout, on_ready=lambda port: ready.set())
    server.thread = thread = threading.Thread(target=server.serve_until_stopped, daemon=True)
    thread.start()
    assert ready.wait(120), f"the server did not start: {server.state.load_error}"
    try:
        yield server
    finally:
        server.should_exit = True
        thread.join(30)


def url(server: Server) -> str:
    return f"http://127.0.0.1:{server.port}"


def engine_loader(target, draft=None, config=None, **kwargs):
    from hass_deploy.serving.engine import EngineConfig

    return lambda metrics: Engine.load(target, draft, config or EngineConfig(), metrics=metrics, **kwargs)


class GatedTarget:
    """A target backend that runs only as many steps as the test allows, so a request can be held mid-generation
    (running, its slot busy) for as long as a test needs, whatever the machine's speed."""

    def __init__(self, inner):
        self.inner = inner
        self._allowed: int | None = None  # None: no limit
        self._changed = threading.Condition()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def hold(self, steps: int) -> None:
        """Allow `steps` more steps, then block."""
        with self._changed:
            self._allowed = steps
            self._changed.notify_all()

    def release(self) -> None:
        with self._changed:
            self._allowed = None
            self._changed.notify_all()

    def step(self, *args, **kwargs):
        with self._changed:
            assert self._changed.wait_for(lambda: self._allowed is None or self._allowed > 0, 60), "held too long"
            if self._allowed is not None:
                self._allowed -= 1
        return self.inner.step(*args, **kwargs)


def gated_loader(target, config):
    """A loader whose one slot's target is a GatedTarget (returned beside it)."""
    from hass_deploy.generation import Pipeline

    pipe = Pipeline.load(target)
    gated = GatedTarget(pipe.decoder.target)
    return gated, lambda metrics: Engine(gated, None, pipe.target.tokenizer, pipe.target.eos_token_ids, config,
                                         metrics)
