"""One target export shared by several drafts' exports (`hass-deploy export --target-from DIR`).

The target's graphs depend only on the target and a few export settings, and they are most of an export's time
(about 90 s of SmolLM2-135M's): exporting two drafts for one target need not export the target twice. An export
given `target_from` takes the target graphs of that earlier export instead, as hard links (a copy across file
systems), once its manifest says they were made from the same target with the same settings. Each directory
stays a whole export of its own: its manifest lists every graph, `validate` checks them all, and deleting or
replacing one directory leaves the other intact (a hard link keeps its file).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from hass_deploy.artifacts import IDENTITY_KEYS
from hass_deploy.errors import ConfigError
from hass_deploy.export.config import ExportConfig
from hass_deploy.manifest import GraphSpec, read_manifest

TARGET_GRAPHS = ("target", "target_ort", "target_ort_batch")  # standard, fused ONNX Runtime, its batched variant


def target_settings(config: ExportConfig, max_seq_len: int, fused: bool) -> dict:
    """What the target graphs are made from besides the target: two exports of one target that agree on these
    have the same target graphs (recorded in the manifest, compared by `shared_target_graphs`)."""
    return {"dtype": config.dtype, "opset": config.opset, "max_seq_len": max_seq_len,
            "max_tree_tokens": config.max_tree_tokens,  # the fused graph's RoPE table covers S_max + the tree budget
            "attention": config.attention, "target_quantization": config.target_quantization, "fused": fused,
            "external_data": config.external_data, "ort_batch": config.ort_batch}


def shared_target_graphs(source: Path, identity: dict, settings: dict) -> dict[str, GraphSpec]:
    """The target graphs of the export in `source`, refused (one line) unless they were made from the target of
    `identity` with `settings`."""
    manifest = read_manifest(source)  # one line for a missing directory, manifest or graph file
    recorded = manifest.target_settings or {}
    differ = [key for key in IDENTITY_KEYS if manifest.target.get(key) != identity.get(key)]
    differ += [key for key in settings if recorded.get(key, object()) != settings[key]]
    if differ:
        raise ConfigError(f"--target-from {source}: its target graphs were exported from another target or with "
                          f"other settings ({', '.join(differ)} differ); export without --target-from")
    return {name: spec for name, spec in manifest.graphs.items() if name in TARGET_GRAPHS}


def link_graphs(source: Path, graphs: dict[str, GraphSpec], into: Path) -> None:
    """Hard-link each graph file of `graphs` and its weights file, when it has one, from `source` into `into`."""
    for spec in graphs.values():
        for name in (spec.file, spec.file + ".data") if spec.external_data else (spec.file,):
            try:
                os.link(source / name, into / name)
            except OSError:  # another file system, or one without hard links
                shutil.copy2(source / name, into / name)
