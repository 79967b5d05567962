"""Caches: where they live (`home`) and how an entry is keyed, as a hash of what it depends on, so that a changed
input is a new key.

Every cache in the package (the demo targets, converted GGUF targets, the quickstart's stages, extracted data,
ORT's optimised graphs, TensorRT plans) keys itself through `json_key`; files are identified by `file_sha256`.
No torch here.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

def home() -> Path:
    """The cache root: $HASS_DEPLOY_HOME, else ~/.cache/hass-deploy (the demo targets, converted GGUF targets)."""
    return Path(os.environ.get("HASS_DEPLOY_HOME", Path.home() / ".cache" / "hass-deploy"))


KEY_LENGTH = 16  # hex digits: 64 bits, far from collisions among one user's caches


def json_key(value: object, length: int = KEY_LENGTH) -> str:
    """The sha256 of `value` as canonical JSON (keys sorted; values JSON cannot hold, such as paths, as their
    str), cut to `length` hex digits."""
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def file_sha256(path: str | Path) -> str:
    """The full sha256 of a file's bytes, read in 1 MiB blocks (datasets and weights can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
