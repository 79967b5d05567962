"""Reading draft-training data: the manifest that `hass-deploy data` writes beside its shards, and the trainer's
lazy reader of them.

    DataManifest.read(out) -> which target and settings made the data, and its shards
    HiddenStateDataset(out, "train" | "eval")[i] -> {"input_ids", "loss_mask", "hidden"}

The writing side (`generate_data`, `DataConfig`) is `extract.py`, which imports this module and never the other
way round; the shard files' own format is `shards.py`.
"""

from __future__ import annotations

import bisect
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from hass_deploy.cache import file_sha256
from hass_deploy.config import DTYPES
from hass_deploy.errors import HassDeployError
from hass_deploy.models.loading import target_fingerprint
from hass_deploy.training import shards as fmt
from hass_deploy.training.chat import read_records

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class ShardInfo:
    file: str
    split: str
    records: int  # dataset records assigned to it
    samples: int  # samples stored (a record may give none, or several; see chat.chain_turns)
    tokens: int
    loss_tokens: int
    bytes: int
    skipped: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class DataManifest:
    """manifest.json: which target and settings produced the shards, and the shards themselves."""

    target_fingerprint: str
    hidden_size: int
    vocab_size: int
    dtype: str
    max_length: int
    architecture: str
    target_path: str
    dataset: dict[str, Any]  # path, format, sha256
    settings: dict[str, Any]
    shards: tuple[ShardInfo, ...]
    totals: dict[str, Any]
    complete: bool
    directory: Path | None = None  # where it was read from (not stored)

    def split_shards(self, split: str) -> list[ShardInfo]:
        return [s for s in self.shards if s.split == split]

    def summary(self) -> str:
        """One line: samples and tokens per split, and what was skipped."""
        totals = self.totals
        skipped = ", ".join(f"{n} {reason}" for reason, n in totals["skipped"].items())
        return (f"{totals['records']} records read; train: {totals['train']['samples']} samples, {totals['train']['tokens']} tokens; eval: "
                f"{totals['eval']['samples']} samples, {totals['eval']['tokens']} tokens"
                + (f"; skipped: {skipped}" if skipped else ""))

    def to_json(self) -> dict[str, Any]:
        return {
            "format": fmt.FORMAT, "format_version": fmt.FORMAT_VERSION, "complete": self.complete,
            "target": {"fingerprint": self.target_fingerprint, "architecture": self.architecture,
                       "hidden_size": self.hidden_size, "vocab_size": self.vocab_size, "path": self.target_path},
            "dtype": self.dtype, "max_length": self.max_length, "dataset": self.dataset, "settings": self.settings,
            "tensors": {"input_ids": "int64 [tokens]", "loss_mask": "uint8 [tokens]",
                        "hidden": f"{self.dtype} [tokens, {self.hidden_size}]", "offsets": "int64 [samples + 1]",
                        "record_index": "int64 [samples]"},
            "shards": [asdict(s) for s in self.shards],
            "totals": self.totals,
        }

    @classmethod
    def from_json(cls, raw: Any, source: Path, directory: Path | None = None) -> "DataManifest":
        if not isinstance(raw, dict) or raw.get("format") != fmt.FORMAT:
            raise HassDeployError(f"{source}: not a hass-deploy data manifest")
        if raw.get("format_version") != fmt.FORMAT_VERSION:
            raise HassDeployError(f"{source}: data format version {raw.get('format_version')!r}, this hass-deploy "
                                  f"reads version {fmt.FORMAT_VERSION}; regenerate the data")
        try:
            target = raw["target"]
            return cls(
                target_fingerprint=str(target["fingerprint"]), hidden_size=int(target["hidden_size"]),
                vocab_size=int(target["vocab_size"]), dtype=str(raw["dtype"]), max_length=int(raw["max_length"]),
                architecture=str(target["architecture"]), target_path=str(target["path"]),
                dataset=dict(raw["dataset"]), settings=dict(raw["settings"]),
                shards=tuple(ShardInfo(**s) for s in raw["shards"]), totals=dict(raw["totals"]),
                complete=bool(raw["complete"]), directory=directory,
            )
        except (KeyError, TypeError, ValueError) as err:
            raise HassDeployError(f"{source}: malformed manifest ({type(err).__name__}: {err})") from None

    @classmethod
    def read(cls, directory: str | Path) -> "DataManifest":
        directory = Path(directory)
        path = directory / MANIFEST
        if not path.is_file():
            raise HassDeployError(f"{directory}: no {MANIFEST} (not a directory written by hass-deploy data)")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise HassDeployError(f"{path}: malformed JSON ({err})") from None
        manifest = cls.from_json(raw, path, directory)
        if manifest.dtype not in DTYPES:
            raise HassDeployError(f"{path}: unknown dtype {manifest.dtype!r}")
        return manifest


def check_data_matches_target(manifest: DataManifest, target) -> None:
    """Refuse data made from another target. `target` is a TargetModel or anything with `config`, `path` and an
    `embedding` table (the trainer's TargetHead)."""
    embedding = target.embedding if hasattr(target, "embedding") else target.module.embed_tokens.weight
    fingerprint = target_fingerprint(embedding)
    config = target.config
    if (fingerprint, config.hidden_size, config.vocab_size) != (
            manifest.target_fingerprint, manifest.hidden_size, manifest.vocab_size):
        raise HassDeployError(
            f"data in {manifest.directory} was generated from another target ({manifest.target_path}, fingerprint "
            f"{manifest.target_fingerprint}, hidden size {manifest.hidden_size}, vocab {manifest.vocab_size}; "
            f"{target.path} has {fingerprint}, {config.hidden_size}, {config.vocab_size}); regenerate it with "
            f"hass-deploy data --target {target.path}")


class HiddenStateDataset(torch.utils.data.Dataset):
    """One split of a data directory, read lazily: shard headers are checked up front, tensors are memory-mapped
    slices read per sample, so datasets larger than RAM work. Safe to use with DataLoader workers (handles are
    reopened in each process)."""

    def __init__(self, directory: str | Path, split: str = "train"):
        if split not in fmt.SPLITS:
            raise HassDeployError(f"unknown split {split!r}; choose one of {', '.join(fmt.SPLITS)}")
        self.directory = Path(directory)
        self.split = split
        self.manifest = DataManifest.read(self.directory)
        if not self.manifest.complete:
            raise HassDeployError(f"{self.directory}: the data is incomplete (an interrupted run?); rerun "
                                  "hass-deploy data with the same options to finish it")
        self.shards = self.manifest.split_shards(split)
        self._offsets: list[torch.Tensor] = []
        self._starts: list[int] = []  # global index of each shard's first sample
        total = 0
        for shard in self.shards:
            self._offsets.append(self._inspect(shard))
            self._starts.append(total)
            total += shard.samples
        self._length = total
        self._handles: dict[int, Any] = {}
        self._pid = os.getpid()

    def _inspect(self, shard: ShardInfo) -> torch.Tensor:
        from safetensors import safe_open

        path = self.directory / shard.file
        if not path.is_file():
            raise HassDeployError(f"{path}: shard missing (listed in {MANIFEST})")
        size = path.stat().st_size
        if size != shard.bytes:
            raise HassDeployError(f"{path}: truncated or corrupted shard ({size} bytes, {MANIFEST} says {shard.bytes})")
        try:
            with safe_open(str(path), framework="pt") as handle:
                return fmt.check_tensors(path, handle, shard.samples, shard.tokens, self.manifest.hidden_size,
                                         self.manifest.dtype)
        except HassDeployError:
            raise
        except Exception as err:
            raise HassDeployError(f"{path}: corrupted shard ({' '.join(str(err).split())})") from None

    def __len__(self) -> int:
        return self._length

    def lengths(self) -> list[int]:
        """Tokens per sample, in index order (for length-bucketed batching)."""
        return [n for offsets in self._offsets for n in (offsets[1:] - offsets[:-1]).tolist()]

    def record_indices(self) -> list[int]:
        """The dataset-file record (0-based) each sample came from, in index order."""
        return [r for shard in range(len(self.shards)) for r in self._handle(shard).get_tensor("record_index").tolist()]

    def _locate(self, index: int) -> tuple[int, int]:
        if index < 0:
            index += self._length
        if not 0 <= index < self._length:
            raise IndexError(f"sample {index} out of range for {self._length} samples")
        shard = bisect.bisect_right(self._starts, index) - 1
        return shard, index - self._starts[shard]

    def _handle(self, shard: int):
        from safetensors import safe_open

        if self._pid != os.getpid():  # a forked DataLoader worker must not share its parent's handles
            self._handles, self._pid = {}, os.getpid()
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.directory / self.shards[shard].file), framework="pt")
        return self._handles[shard]

    def token_counts(self) -> torch.Tensor:
        """[V] int64: how often each token is a trained (loss-masked) token of this split; reads the ids and masks
        only, never the hidden states."""
        counts = torch.zeros(self.manifest.vocab_size, dtype=torch.int64)
        for shard in range(len(self.shards)):
            handle = self._handle(shard)
            ids = handle.get_tensor("input_ids")[handle.get_tensor("loss_mask").bool()]
            counts += torch.bincount(ids, minlength=self.manifest.vocab_size)[: self.manifest.vocab_size]
        return counts

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        shard, local = self._locate(index)
        start, end = self._offsets[shard][local : local + 2].tolist()
        path = self.directory / self.shards[shard].file
        try:
            handle = self._handle(shard)
            sample = {
                "input_ids": handle.get_slice("input_ids")[start:end],  # [N] int64
                "loss_mask": handle.get_slice("loss_mask")[start:end].bool(),  # [N] bool
                "hidden": handle.get_slice("hidden")[start:end],  # [N, H] stored dtype
            }
        except Exception as err:
            raise HassDeployError(f"{path}: corrupted shard ({' '.join(str(err).split())})") from None
        ids = sample["input_ids"]
        if int(ids.min()) < 0 or int(ids.max()) >= self.manifest.vocab_size:
            raise HassDeployError(f"{path}: corrupted shard (token ids outside the vocabulary in sample {local})")
        return sample

    def verify(self) -> None:
        """Re-hash every shard's tensors against the hash stored at writing time (reads all the data)."""
        from safetensors.torch import load_file

        for shard in self.shards:
            path = self.directory / shard.file
            if fmt.content_hash(load_file(str(path))) != fmt.read_metadata(path).get("content_sha256"):
                raise HassDeployError(f"{path}: corrupted shard (its contents do not match their stored hash)")

    def __getstate__(self):
        return {**self.__dict__, "_handles": {}}


def frequent_tokens(counts: torch.Tensor, n: int) -> torch.Tensor:
    """[n] the ids of the n largest counts, ascending; ties (unseen tokens among them) go to the lower id, so the
    choice is a function of the counts alone."""
    order = torch.sort(-counts, stable=True).indices  # [V], most frequent first, ties by ascending id
    return order[:n].sort().values



def trained_conversations(directory: str | Path) -> list[str]:
    """The dataset conversations (ShareGPT ids without the `_N` part; a record's index where it has none) that the
    data in `directory` drew a record from, either split: what a prompt held out from its drafts must avoid."""
    manifest = DataManifest.read(directory)
    path = Path(manifest.dataset["path"])
    if not path.is_file() or file_sha256(path) != manifest.dataset["sha256"]:
        raise HassDeployError(f"{directory}: its dataset {path} is gone or changed since; cannot tell which "
                              "conversations it trained on")
    records, _ = read_records(path, manifest.dataset["format"], False)
    conversation = {r.index: r.conversation or str(r.index) for r in records}
    return sorted({conversation[i] for split in ("train", "eval")
                   for i in HiddenStateDataset(directory, split).record_indices()})
