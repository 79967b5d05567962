"""The on-disk shard format of hidden-state training data, in one place: packing, atomic writing, validation.

A shard is one safetensors file holding several samples as flat concatenated tensors:

    input_ids     int64  [tokens]          token ids of every sample, back to back
    loss_mask     uint8  [tokens]          1 = trained (an assistant token), 0 = context
    hidden        dtype  [tokens, H]       the target's post-final-norm hidden states (the lm_head input)
    offsets       int64  [samples + 1]     sample i is rows offsets[i] .. offsets[i + 1]
    record_index  int64  [samples]         the 0-based position in the dataset file each sample came from

and string metadata: format, format_version, split, number, records, samples, tokens, loss_tokens, skipped (a JSON
object of reason -> count), settings (a hash of the settings that produced it) and content_sha256 (of the tensors'
bytes, for `HiddenStateDataset.verify`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from hass_deploy.errors import HassDeployError
from hass_deploy.models.loading import parse_dtype

FORMAT = "hass-deploy/hidden-states"
FORMAT_VERSION = 1
TENSORS = ("input_ids", "loss_mask", "hidden", "offsets", "record_index")
SPLITS = ("train", "eval")


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:05d}.safetensors"


def pack(input_ids: list[list[int]], loss_masks: list[list[bool]], records: list[int],
         hidden: list[torch.Tensor], hidden_size: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Concatenate per-sample lists/tensors ([N_i], [N_i], -, [N_i, H]) into a shard's flat tensors."""
    lengths = torch.tensor([len(ids) for ids in input_ids], dtype=torch.int64)
    offsets = torch.zeros(len(input_ids) + 1, dtype=torch.int64)
    offsets[1:] = lengths.cumsum(0)
    flat_ids = [t for ids in input_ids for t in ids]
    flat_mask = [bool(m) for mask in loss_masks for m in mask]
    return {
        "input_ids": torch.tensor(flat_ids, dtype=torch.int64),
        "loss_mask": torch.tensor(flat_mask, dtype=torch.uint8),
        "hidden": torch.cat(hidden).to(dtype) if hidden else torch.zeros(0, hidden_size, dtype=dtype),
        "offsets": offsets,
        "record_index": torch.tensor(records, dtype=torch.int64),
    }


def _raw(tensor: torch.Tensor):
    """A tensor's bytes as a zero-copy uint8 numpy view (shards can be large: no extra copies)."""
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy()


def content_hash(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in TENSORS:
        digest.update(_raw(tensors[name]))
    return digest.hexdigest()


_SAFETENSORS_NAMES = {torch.int64: "I64", torch.uint8: "U8", torch.bfloat16: "BF16", torch.float16: "F16",
                      torch.float32: "F32"}


def write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file atomically: a temporary file in the same directory, fsync, then a rename over the
    final name, so a shard file that exists is always complete (a rerun trusts it and skips its work).

    The header is written here rather than by the `safetensors` writer, which orders metadata by a Rust hash map:
    the same shard would differ byte-wise between processes. Tensors go widest dtype first, so each starts aligned
    to its element size.
    """
    names = sorted(tensors, key=lambda name: (-tensors[name].element_size(), TENSORS.index(name)))
    header: dict = {"__metadata__": dict(sorted({**metadata, "content_sha256": content_hash(tensors)}.items()))}
    start = 0
    for name in names:
        size = tensors[name].numel() * tensors[name].element_size()
        header[name] = {"dtype": _SAFETENSORS_NAMES[tensors[name].dtype], "shape": list(tensors[name].shape),
                        "data_offsets": [start, start + size]}
        start += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temporary, "wb") as handle:
        handle.write(len(text).to_bytes(8, "little") + text)
        for name in names:
            handle.write(_raw(tensors[name]))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def read_metadata(path: Path) -> dict[str, str]:
    """A shard's metadata from its header (the tensors are not read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as err:  # safetensors raises its own error type for truncated or foreign files
        raise HassDeployError(f"{path}: corrupted shard ({' '.join(str(err).split())})") from None
    if metadata.get("format") != FORMAT:
        raise HassDeployError(f"{path}: not a hass-deploy hidden-state shard")
    return metadata


def check_tensors(path: Path, handle, samples: int, tokens: int, hidden_size: int, dtype: str) -> torch.Tensor:
    """Check a shard's tensor names, dtypes and shapes against what the manifest says; returns its offsets."""
    expected = {
        "input_ids": ("I64", [tokens]),
        "loss_mask": ("U8", [tokens]),
        "hidden": (_SAFETENSORS_NAMES[parse_dtype(dtype)], [tokens, hidden_size]),
        "offsets": ("I64", [samples + 1]),
        "record_index": ("I64", [samples]),
    }
    names = set(handle.keys())
    if names != set(TENSORS):
        raise HassDeployError(f"{path}: corrupted shard (tensors {sorted(names)}, expected {list(TENSORS)})")
    for name, (want_dtype, want_shape) in expected.items():
        view = handle.get_slice(name)
        if view.get_dtype() != want_dtype or list(view.get_shape()) != want_shape:
            raise HassDeployError(f"{path}: corrupted shard ({name} is {view.get_dtype()} {view.get_shape()}, "
                                  f"the manifest implies {want_dtype} {want_shape})")
    offsets = handle.get_tensor("offsets")
    lengths = offsets[1:] - offsets[:-1]
    if int(offsets[0]) != 0 or int(offsets[-1]) != tokens or bool((lengths < 1).any()):
        raise HassDeployError(f"{path}: corrupted shard (its offsets do not partition {tokens} tokens)")
    return offsets


def skipped_counts(metadata: dict[str, str]) -> dict[str, int]:
    return json.loads(metadata.get("skipped", "{}"))
