"""Serving: the engine (decoder slots over shared weights) and the OpenAI-compatible HTTP server.

`Engine` and its types need no extra; the HTTP server (`serving.server`) and its metrics need the `serve` extra
(FastAPI, uvicorn, prometheus-client), imported only there.
"""

from hass_deploy.serving.engine import (Completion, Delta, Engine, EngineClosedError, EngineConfig, Handle,
                                        QueueFullError, RequestError, RequestOptions)

__all__ = ["Completion", "Delta", "Engine", "EngineClosedError", "EngineConfig", "Handle", "QueueFullError",
           "RequestError", "RequestOptions"]
