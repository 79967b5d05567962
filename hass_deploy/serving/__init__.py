"""Serving: the engine (decoder slots over shared weights) and the OpenAI-compatible HTTP server.

`Engine` and its types need no extra; the HTTP server (`serving.server`) and its metrics need the `serve` extra
(FastAPI, uvicorn, prometheus-client), imported only there.
"""

import importlib

from hass_deploy.serving.config import EngineConfig

_ENGINE = ("Completion", "Delta", "Engine", "EngineClosedError", "Handle", "QueueFullError", "RequestError",
           "RequestOptions")
__all__ = ["EngineConfig", *_ENGINE]


def __getattr__(name: str):
    # The engine imports torch: loaded on first use, so that the CLI can read EngineConfig's defaults cheaply.
    if name in _ENGINE:
        return getattr(importlib.import_module("hass_deploy.serving.engine"), name)
    raise AttributeError(f"module 'hass_deploy.serving' has no attribute {name!r}")
