"""Serving: the engine (decoder slots over shared weights) and the OpenAI-compatible HTTP server."""
