"""Training data for draft heads, written: the target's hidden states over a dataset, as sharded safetensors plus
a manifest (`hass-deploy data`). Reading them back is `data.py`; the shard format is `shards.py`.

    generate_data(target_dir, dataset, out, DataConfig(...)) -> DataManifest

What the reference does (algorithm.md §2): one torch.save file per conversation, fp16 features, loss masks from
hard-coded tokenizer offsets, four processes over contiguous slices. Here: masks from the chat template
(`chat.py`), shards of several samples (`shards.py`), right-padded batched target passes under a token budget,
resumable (a shard is written atomically and a rerun skips it), and sharded over torchrun ranks (rank r makes the
shards k with k % world == r on the GPU of its local rank; rank 0 writes manifest.json after a barrier;
`distributed.py`).

The assignment of records to shards depends only on the dataset and the settings: the usable records' conversations
are shuffled with the seed, the records truncated to --max-samples, the first `eval` of them (whole conversations)
form the held-out split, and each split is cut into shards of --shard-size records. A shard's bytes depend only on its records, so an interrupted run plus a
rerun, or a run over several ranks, writes the same files as one uninterrupted process.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from hass_deploy.atomic import check_output_dir
from hass_deploy.config import GenerationConfig, SamplingConfig
from hass_deploy.errors import HassDeployError
from hass_deploy.cache import file_sha256, json_key
from hass_deploy.models.gguf import resolve_target
from hass_deploy.models.loading import TargetModel, load_target, load_target_head, parse_dtype, target_fingerprint
from hass_deploy.models.target import causal_tree_mask
from hass_deploy.packages import DATASETS, named
from hass_deploy.progress import progress_bar
from hass_deploy.runtime.backends.torch import TorchTarget
from hass_deploy.runtime.decoder import SpeculativeDecoder
from hass_deploy.training import shards as fmt
from hass_deploy.training.chat import (Record, Sample, SkipRecord, conversation_samples, has_chat_template,
                                       ids_samples, read_records, regenerated_samples, text_samples)
from hass_deploy.training.decontaminate import Blocklist
from hass_deploy.training.data import MANIFEST, DataManifest, ShardInfo
from hass_deploy.training.config import DataConfig
from hass_deploy.training.distributed import Ranks

PROBE_RECORDS = 16  # records tokenized before any target pass, so template problems fail in seconds
TRUNCATED = "no trained token within --max-length"





@dataclass(frozen=True)
class ShardPlan:
    index: int  # k: rank k % world makes it
    split: str
    number: int  # within its split
    records: tuple[int, ...]  # indices into the usable records

    @property
    def file(self) -> str:
        return fmt.shard_name(self.split, self.number)


def plan_shards(conversations: Sequence[Hashable | None], config: DataConfig) -> list[ShardPlan]:
    """Seeded shuffle of the conversations -> --max-samples records -> the first `eval` records held out, whole
    conversations only -> shards of --shard-size records.

    `conversations[i]` names usable record i's conversation (None: a conversation of its own). ShareGPT cuts long
    conversations into records `ID_0`, `ID_1`, ...: they move together, so no held-out record continues a trained
    one. Without such names the shuffle is one of records, as it always was.
    """
    members: dict[Hashable, list[int]] = {}
    for i, name in enumerate(conversations):
        members.setdefault(("record", i) if name is None else ("conversation", name), []).append(i)
    units = list(members.values())
    unit_of = {i: u for u, unit in enumerate(units) for i in unit}
    shuffled = torch.randperm(len(units), generator=torch.Generator().manual_seed(config.seed)).tolist()
    order = [i for u in shuffled for i in units[u]]
    order = order[: config.max_samples] if config.max_samples else order
    n = len(order)
    held_out = 0 if config.eval_fraction == 0 or n < 2 else min(n - 1, max(1, round(n * config.eval_fraction)))
    if 0 < held_out < n and unit_of[order[held_out]] == unit_of[order[held_out - 1]]:
        # The cut falls inside a conversation: hold all of it out, or none of it if that leaves nothing to train on.
        cut = unit_of[order[held_out]]
        end = start = held_out
        while end < n and unit_of[order[end]] == cut:
            end += 1
        while start > 0 and unit_of[order[start - 1]] == cut:
            start -= 1
        held_out = end if end < n else start
    plans: list[ShardPlan] = []
    for split, chosen in (("train", order[held_out:]), ("eval", order[:held_out])):
        for number, begin in enumerate(range(0, len(chosen), config.shard_size)):
            plans.append(ShardPlan(len(plans), split, number, tuple(chosen[begin : begin + config.shard_size])))
    return plans


def generate_data(target_dir: str | Path, dataset: str | Path, out: str | Path, config: DataConfig = DataConfig(),
                  force: bool = False, progress: bool = False) -> DataManifest | None:
    """Tokenize `dataset`, run the target over it and write its hidden states to `out` (see the module doc).

    Args:
        force: replace data in `out` made from another target or with other settings (otherwise refused).
        progress: show a progress bar (rank 0) with tokens/s and ETA on stderr.
    Returns:
        The manifest of the finished directory; None on the other ranks of a torchrun job (rank 0 reports for all).
    """
    with Ranks.from_environment(config.device) as ranks:
        manifest = _generate(resolve_target(target_dir), named(dataset, DATASETS), Path(out), config.resolved(), force,
                             progress, ranks)
        return manifest if ranks.rank == 0 else None


def _generate(target_dir: Path, dataset: Path, out: Path, config: DataConfig, force: bool, progress: bool,
              ranks: Ranks) -> DataManifest:
    # Every rank does the same checks on the same inputs, so they all fail alike and none waits at a barrier.
    excluded = config.exclude_files()
    records, skipped = read_records(dataset, config.format, config.regenerate,
                                    Blocklist.of_files(excluded) if excluded else None)
    if not records:
        raise _nothing_usable(dataset, skipped)
    target = load_target(target_dir, config.compute_dtype, str(ranks.device))
    # Positions past the target's trained range would give features it never produces at inference.
    config = replace(config, max_length=min(config.max_length, target.config.max_position_embeddings))
    _check_tokenizer(target, config)
    plans = plan_shards([r.conversation for r in records], config)
    samples_of = Sampler(target, config)
    if not config.regenerate:
        _probe(records, plans, samples_of, config, dataset, skipped)
    settings = {**config.output_settings(), "dataset_sha256": file_sha256(dataset),
                "tokenizer_sha256": None if config.format == "ids" else _tokenizer_hash(target.tokenizer)}
    settings_hash = json_key(settings)
    cfg = target.config
    manifest = DataManifest(
        target_fingerprint=_fingerprint(target, target_dir, config), hidden_size=cfg.hidden_size,
        vocab_size=cfg.vocab_size, dtype=config.dtype, max_length=config.max_length, architecture=cfg.architecture,
        target_path=str(target_dir.resolve()),
        dataset={"path": str(dataset.resolve()), "format": config.format, "sha256": settings["dataset_sha256"]},
        settings=settings, shards=(), totals={}, complete=False)
    replace_old = _check_output(out, manifest, force)
    ranks.barrier()  # every rank has read the old manifest before rank 0 replaces it
    if ranks.rank == 0:
        _prepare_output(out, replace_old)
        _write_manifest(out, manifest)
    ranks.barrier()

    mine = [p for p in plans if p.index % ranks.world == ranks.rank]
    pending = [p for p in mine if not _finished(out / p.file, p, settings_hash)]
    failure: BaseException | None = None
    try:
        with _Progress(progress and ranks.rank == 0, sum(len(p.records) for p in pending), len(pending)) as bar:
            for plan in pending:
                _make_shard(out, plan, records, samples_of, target, config, settings_hash, bar)
    except Exception as err:  # reported on every rank below instead of leaving the others at a barrier
        failure = err
    if not ranks.all_ok(failure is None):
        raise failure if failure is not None else HassDeployError("another data rank failed (see its output)")

    infos = tuple(_shard_info(out, p) for p in plans)
    train, held_out = [s for s in infos if s.split == "train"], [s for s in infos if s.split == "eval"]
    skipped_all = merge_skipped(dict(skipped), *(s.skipped for s in infos))
    if not any(s.samples for s in infos):
        raise _nothing_usable(dataset, skipped_all)
    totals = {"records": len(records) + sum(skipped.values()), "train": count_split(train),
              "eval": count_split(held_out), "skipped": skipped_all}
    if ranks.rank == 0:
        _write_manifest(out, replace(manifest, shards=infos, totals=totals, complete=True))
    ranks.barrier()
    return DataManifest.read(out)


# ---------------------------------------------------------------------------------------------------------------
# Checks


def _check_tokenizer(target: TargetModel, config: DataConfig) -> None:
    if config.format == "ids":
        return
    if target.tokenizer is None:
        raise HassDeployError(f"{target.path}: no tokenizer (tokenizer.json or tokenizer_config.json); hass-deploy "
                              "data needs one to tokenize the dataset")
    if config.format == "sharegpt" and not has_chat_template(target.tokenizer):
        raise HassDeployError(f"{target.path}: the tokenizer has no chat template, so conversations cannot be "
                              "rendered the way the target sees them; add a chat_template to tokenizer_config.json, "
                              "or convert the data to --format text")


def _probe(records: list[Record], plans: list[ShardPlan], samples_of: Sampler, config: DataConfig, dataset: Path,
           skipped: Counter) -> None:
    """Tokenize the first records: a bad template fails now, and a small dataset with nothing usable is refused."""
    chosen = [r for p in plans for r in p.records]
    reasons: Counter = Counter()
    for r in chosen[:PROBE_RECORDS]:
        try:
            if any(any(s.loss_mask[: config.max_length]) for s in samples_of(records[r])):
                return
            reasons[TRUNCATED] += 1
        except SkipRecord as skip:
            reasons[skip.reason] += 1
    if len(chosen) <= PROBE_RECORDS:
        raise _nothing_usable(dataset, merge_skipped(dict(skipped), dict(reasons)))


def _nothing_usable(dataset: Path, skipped: dict[str, int]) -> HassDeployError:
    reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items(), key=lambda kv: -kv[1]))
    return HassDeployError(f"{dataset}: no usable samples ({sum(skipped.values())} records skipped: {reasons})")


def _check_output(out: Path, manifest: DataManifest, force: bool) -> bool:
    """Whether `out` holds something to replace (only with --force); False for a fresh or resumable directory."""
    check_output_dir(out)
    path = out / MANIFEST
    if path.is_file():
        try:
            raw = json.loads(path.read_text())
            old_target, old_settings, version = raw["target"], raw["settings"], raw["format_version"]
        except (ValueError, KeyError, TypeError):
            problem = f"an unreadable {MANIFEST}"
        else:
            new_settings = json.loads(json.dumps(manifest.settings))
            if old_target.get("fingerprint") != manifest.target_fingerprint:
                problem = (f"data generated from another target ({old_target.get('path')}, fingerprint "
                           f"{old_target.get('fingerprint')}; this one has {manifest.target_fingerprint})")
            elif version != fmt.FORMAT_VERSION:
                problem = f"data in format version {version}"
            elif old_settings != new_settings:
                changed = [k for k in sorted(set(old_settings) | set(new_settings))
                           if old_settings.get(k) != new_settings.get(k)]
                problem = "data generated with different settings (" + ", ".join(
                    f"{k}: {old_settings.get(k)!r} then, {new_settings.get(k)!r} now" for k in changed) + ")"
            else:
                return False
        if not force:
            raise HassDeployError(f"{out} holds {problem}; rerun with the same options to resume, use --force to "
                                  "replace it, or choose another --out")
        return True
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise HassDeployError(f"{out} is not empty and holds no {MANIFEST}; use --force to write into it anyway, "
                                  "or choose another --out")
        return True
    return False


def _prepare_output(out: Path, replace_old: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    leftovers = list(out.glob(".*.tmp-*"))  # temporaries of an interrupted run
    if replace_old:
        leftovers += [out / MANIFEST, *out.glob("train-*.safetensors"), *out.glob("eval-*.safetensors")]
    for path in leftovers:
        path.unlink(missing_ok=True)


def _write_manifest(out: Path, manifest: DataManifest) -> None:
    temporary = out / f".{MANIFEST}.tmp-{os.getpid()}"
    temporary.write_text(json.dumps(manifest.to_json(), indent=1) + "\n")
    os.replace(temporary, out / MANIFEST)


def _finished(path: Path, plan: ShardPlan, settings_hash: str) -> bool:
    """A shard file exists only complete (atomic rename); it counts if it was made for this plan and settings."""
    if not path.is_file():
        return False
    try:
        metadata = fmt.read_metadata(path)
    except HassDeployError:
        return False  # foreign or damaged: made again
    return (metadata.get("settings"), metadata.get("split"), metadata.get("records")) == (
        settings_hash, plan.split, str(len(plan.records)))


def _shard_info(out: Path, plan: ShardPlan) -> ShardInfo:
    path = out / plan.file
    if not path.is_file():
        raise HassDeployError(f"{path}: shard missing after generation")
    metadata = fmt.read_metadata(path)
    return ShardInfo(file=plan.file, split=plan.split, records=int(metadata["records"]),
                     samples=int(metadata["samples"]), tokens=int(metadata["tokens"]),
                     loss_tokens=int(metadata["loss_tokens"]), bytes=path.stat().st_size,
                     skipped=fmt.skipped_counts(metadata))


def _fingerprint(target: TargetModel, target_dir: Path, config: DataConfig) -> str:
    """The target's identity as drafts and trainers compute it: from the fp32 embedding table. A target loaded in
    half precision would hash differently when its checkpoint is fp32, so the table is then read on its own."""
    if config.compute_dtype == "fp32":
        return target_fingerprint(target.module)
    return target_fingerprint(load_target_head(target_dir).embedding)


def _tokenizer_hash(tokenizer) -> str:
    return json_key([getattr(tokenizer, "chat_template", None), sorted(tokenizer.get_vocab().items()),
                     sorted(map(str, tokenizer.all_special_tokens))])


# ---------------------------------------------------------------------------------------------------------------
# Samples and hidden states


class Regenerator:
    """Plain decoding by the target through our own decoder (no draft): the responses of --regenerate."""

    def __init__(self, target: TargetModel, config: DataConfig):
        self.decoder = SpeculativeDecoder(TorchTarget(target.module, config.max_length), None)
        self.config = config
        self.eos = target.eos_token_ids
        self.tokens = 0  # generated so far, for the progress rate

    def __call__(self, prompt: list[int], record: int, turn: int) -> list[int]:
        budget = self.config.max_length - len(prompt)
        if self.config.max_new_tokens is not None:
            budget = min(budget, self.config.max_new_tokens)
        # A per-(record, turn) seed: sampled responses do not depend on which rank or shard order made them.
        seed = (self.config.seed * 1_000_003 + record * 1_009 + turn) % (2**63)
        sampling = SamplingConfig(temperature=self.config.temperature)
        generation = GenerationConfig(max_new_tokens=budget, sampling=sampling, seed=seed, eos_token_ids=self.eos)
        output = self.decoder.generate(prompt, generation).output_ids
        self.tokens += len(output)
        return output


class Sampler:
    """Record -> samples for the configured format; owns the regenerator when the target writes the responses."""

    def __init__(self, target: TargetModel, config: DataConfig):
        self.tokenizer, self.config, self.eos = target.tokenizer, config, target.eos_token_ids
        self.regenerator = Regenerator(target, config) if config.regenerate else None

    def __call__(self, record: Record) -> list[Sample]:
        if self.config.format == "ids":
            return ids_samples(record)
        if self.config.format == "text":
            return text_samples(self.tokenizer, record)
        if self.regenerator is not None:
            return regenerated_samples(self.tokenizer, record, self.regenerator, self.eos, self.config.max_length)
        return conversation_samples(self.tokenizer, record, self.config.max_length)


def _make_shard(out: Path, plan: ShardPlan, records: list[Record], samples_of: Sampler, target: TargetModel,
                config: DataConfig, settings_hash: str, bar: "_Progress") -> None:
    ids, masks, origins = [], [], []
    skipped: Counter = Counter()
    regenerator = samples_of.regenerator
    vocab = target.config.vocab_size
    for r in plan.records:
        record = records[r]
        before = regenerator.tokens if regenerator else 0
        try:
            produced = samples_of(record)
        except SkipRecord as skip:
            skipped[skip.reason] += 1
            produced = []
        for sample in produced:
            sample_ids, mask = sample.input_ids[: config.max_length], sample.loss_mask[: config.max_length]
            if not any(mask):
                skipped[TRUNCATED] += 1
                continue
            if max(sample_ids) >= vocab:
                raise HassDeployError(f"{record.where}: token id {max(sample_ids)} from the tokenizer is outside the "
                                      f"target's vocabulary ({vocab})")
            ids.append(sample_ids)
            masks.append(mask)
            origins.append(record.index)
        if regenerator:
            bar.advance(1, regenerator.tokens - before)
    per_sample = 0.0 if regenerator else len(plan.records) / max(len(ids), 1)
    hidden = hidden_states(target.module, ids, config.batch_tokens, parse_dtype(config.dtype),
                           lambda samples, tokens: bar.advance(samples * per_sample, tokens))
    if not ids and not regenerator:
        bar.advance(len(plan.records), 0)
    tensors = fmt.pack(ids, masks, origins, hidden, target.config.hidden_size, parse_dtype(config.dtype))
    metadata = {
        "format": fmt.FORMAT, "format_version": str(fmt.FORMAT_VERSION), "split": plan.split,
        "number": str(plan.number), "records": str(len(plan.records)), "samples": str(len(ids)),
        "tokens": str(int(tensors["input_ids"].numel())), "loss_tokens": str(int(tensors["loss_mask"].sum())),
        "skipped": json.dumps(dict(sorted(skipped.items()))), "settings": settings_hash,
    }
    fmt.write_shard(out / plan.file, tensors, metadata)
    bar.shard_done(plan.file, len(ids), int(tensors["input_ids"].numel()))


@torch.inference_mode()
def hidden_states(module: torch.nn.Module, sequences: list[list[int]], batch_tokens: int, dtype: torch.dtype,
                  on_batch: Callable[[int, int], None] | None = None) -> list[torch.Tensor]:
    """The target's post-final-norm hidden states [N_i, H] of each sequence, in `dtype`, on the CPU.

    Sequences are sorted longest first and grouped into right-padded batches of at most `batch_tokens` padded
    tokens (one sequence alone if it is longer). The mask is causal and key-valid, so padding changes nothing
    that a real position sees; RoPE positions are 0..N-1 per row.
    """
    device = module.embed_tokens.weight.device
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < max(1, batch_tokens // len(sequences[batches[-1][0]])):
            batches[-1].append(i)
        else:
            batches.append([i])
    results: list[torch.Tensor | None] = [None] * len(sequences)
    for batch in batches:
        lengths = torch.tensor([len(sequences[i]) for i in batch])
        width = int(lengths[0])
        ids = torch.zeros(len(batch), width, dtype=torch.long)  # [B, T], right-padded with token 0
        for row, i in enumerate(batch):
            ids[row, : len(sequences[i])] = torch.tensor(sequences[i])
        valid = torch.arange(width)[None] < lengths[:, None]  # [B, T]
        mask = causal_tree_mask(width, "cpu", len(batch)) & valid[:, None, :]  # [B, T, T] causal and key-valid
        positions = torch.arange(width).expand(len(batch), width)  # [B, T]
        hidden = module(ids.to(device), positions.to(device), mask.to(device))  # [B, T, H]
        for row, i in enumerate(batch):
            # host sync: shards are written from the CPU
            results[i] = hidden[row, : len(sequences[i])].to(dtype).cpu()
        if on_batch is not None:
            on_batch(len(batch), int(lengths.sum()))
    return results  # type: ignore[return-value]


class _Progress:
    """A rich bar (records, tokens/s, ETA) on a terminal; one line per finished shard otherwise (logs, torchrun)."""

    def __init__(self, enabled: bool, records: int, shards: int):
        self.enabled, self.records, self.shards = enabled, records, shards
        self.tokens, self.done, self.start = 0, 0, time.perf_counter()

    def __enter__(self) -> "_Progress":
        self.bar = progress_bar("hidden states", "{task.fields[rate]:,.0f} tok/s",
                                enabled=self.enabled and self.records > 0)
        self.bar.start()
        self.task = self.bar.add_task("data", total=self.records, rate=0.0)
        return self

    def rate(self) -> float:
        return self.tokens / max(time.perf_counter() - self.start, 1e-9)

    def advance(self, records: float, tokens: int) -> None:
        self.tokens += tokens
        self.bar.update(self.task, advance=records, rate=self.rate())

    def shard_done(self, name: str, samples: int, tokens: int) -> None:
        self.done += 1
        if self.enabled and self.bar.disable:
            print(f"{name}: {samples} samples, {tokens} tokens ({self.done}/{self.shards} shards, "
                  f"{self.rate():,.0f} tok/s)", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        self.bar.stop()


def count_split(shards: list[ShardInfo]) -> dict[str, int]:
    return {"shards": len(shards), "records": sum(s.records for s in shards), "samples": sum(s.samples for s in shards),
            "tokens": sum(s.tokens for s in shards), "loss_tokens": sum(s.loss_tokens for s in shards)}


def merge_skipped(*counts: dict[str, int]) -> dict[str, int]:
    total: Counter = Counter()
    for c in counts:
        total.update(c)
    return dict(sorted(total.items()))
