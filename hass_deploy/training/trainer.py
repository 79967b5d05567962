"""The draft-head training loop: HASS (harmonized context alignment + Top-K distillation) or the EAGLE-2
baseline, single process or data-parallel under torchrun, checkpointed every epoch and resumable.

One `step()` serves training and evaluation: it runs the aligned forward passes of a batch and returns each
step's outputs; training turns them into losses, evaluation into per-depth acceptance (algorithm.md §3.8).
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from hass_deploy.config import Phase, TrainConfig
from hass_deploy.atomic import check_output_dir
from hass_deploy.errors import HassDeployError
from hass_deploy.models.checkpoint import (FORMAT_VERSION, DraftMetadata, copy_target_layer, init_draft, load_draft,
                                          save_draft, target_identity)
from hass_deploy.models.draft import DraftHead
from hass_deploy.models.loading import TargetHead, load_target_head
from hass_deploy.progress import progress_bar
from hass_deploy.training.alignment import HarmonizedDraft
from hass_deploy.training.data import HiddenStateDataset, check_data_matches_target, frequent_tokens
from hass_deploy.training.distributed import Ranks
from hass_deploy.training.losses import feature_regression_loss, masked_sum, vocabulary_losses

STATE_FILE = "training_state.pt"
# Settings that change how a step is computed but not what it computes (memory only): a run may resume with
# another value, and checkpoints from before the setting existed resume too.
MEMORY_ONLY = ("loss_chunk",)


METRICS_FILE = "metrics.jsonl"


def _resumable(settings: dict) -> dict:
    """The training settings a resumed run must share with the checkpoint; a setting newer than the checkpoint
    counts as its default (which is what the checkpoint was trained with)."""
    defaults = json.loads(json.dumps(asdict(TrainConfig())))
    return {key: value for key, value in {**defaults, **settings}.items() if key not in MEMORY_ONLY}


@dataclass(frozen=True)
class Batch:
    """A right-padded batch in the draft's training layout (algorithm.md §3.1)."""

    features: torch.Tensor  # [B, N, H] f_0..f_{N-1}: the draft's input features
    input_ids: torch.Tensor  # [B, N] x_1..x_N: the token after each feature (0 past the end)
    targets: torch.Tensor  # [B, N, H] f_1..f_N: the features to predict (0 past the end)
    loss_mask: torch.Tensor  # [B, N] float: 1 where the predicted token is a trained (assistant) token
    valid: torch.Tensor  # [B, N] bool: real positions

    @property
    def tokens(self) -> int:
        return int(self.valid.sum())

    def to(self, device: torch.device) -> "Batch":
        return Batch(*(t.to(device, non_blocking=True) for t in (self.features, self.input_ids, self.targets,
                                                                    self.loss_mask, self.valid)))


def collate(samples: list[dict[str, torch.Tensor]], max_length: int) -> Batch:
    """Position t pairs (f_t, x_{t+1}) and predicts f_{t+1}; it is trained where x_{t+1} is an assistant token."""
    lengths = [min(len(s["input_ids"]), max_length) for s in samples]
    batch, width, hidden = len(samples), max(lengths), samples[0]["hidden"].shape[-1]
    features = torch.zeros(batch, width, hidden)
    targets = torch.zeros(batch, width, hidden)
    input_ids = torch.zeros(batch, width, dtype=torch.long)
    loss_mask = torch.zeros(batch, width)
    valid = torch.zeros(batch, width, dtype=torch.bool)
    for row, (sample, n) in enumerate(zip(samples, lengths)):
        f, x, m = sample["hidden"][:n].float(), sample["input_ids"][:n], sample["loss_mask"][:n]
        features[row, :n] = f
        targets[row, : n - 1] = f[1:]
        input_ids[row, : n - 1] = x[1:]
        loss_mask[row, : n - 1] = m[1:].float()  # the last position has no next feature
        valid[row, :n] = True
    return Batch(features, input_ids, targets, loss_mask, valid)


def step(model: torch.nn.Module, batch: Batch, steps: int, noise: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Run `steps` aligned forward passes in one call; return each step's predicted features [B, N, H].

    One forward for every step (and, in training, one backward over all their losses), so each feature set's
    fc and K/V projections are computed once (`alignment.py`) and a DDP model all-reduces once per batch.
    """
    first = batch.features if noise is None else batch.features + noise
    return model(first, batch.input_ids, steps)


@dataclass
class TrainState:
    phase: int = 0
    epoch: int = 0  # epochs finished within the phase
    global_step: int = 0


def _autocast(config: TrainConfig, device: torch.device):
    """bf16 autocast over the draft's forward passes and losses (`--precision bf16`, on the GPU and the CPU).

    The weights, their gradients and the optimizer state stay fp32 (master weights: the head is made fp32 before
    training and autocast only casts each op's inputs); log q is made fp32 explicitly (`losses.draft_log_probs`).
    """
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16")


def _noise(batch: Batch, indices: list[int], config: TrainConfig, epoch_seed: int) -> torch.Tensor:
    """Uniform feature noise, training only (algorithm.md §3.6, without the reference's length dependence).

    Seeded per (epoch, sample), so a sample gets the same noise whichever rank or batch it lands in: data-parallel
    and resumed runs then reproduce single-process, uninterrupted ones.
    """
    noise = torch.zeros_like(batch.features)
    for row, index in enumerate(indices):
        generator = torch.Generator().manual_seed(epoch_seed * 1_000_003 + index)
        noise[row] = (torch.rand(noise.shape[1:], generator=generator) - 0.5) * (2 * config.feature_noise)
    return noise * batch.valid[..., None]


def _schedule(optimizer, total_steps: int, config: TrainConfig):
    warmup = max(1, int(total_steps * config.warmup_fraction))

    def factor(i: int) -> float:
        return (i + 1) / warmup if i < warmup else max(0.0, (total_steps - i) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _batches(count: int, config: TrainConfig, epoch_seed: int, world: int) -> list[list[int]]:
    """A deterministic order per epoch: global batches of `batch_size` samples; each rank takes every world-th."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(epoch_seed)).tolist()
    batches = [order[i : i + config.batch_size] for i in range(0, count, config.batch_size)]
    return [b for b in batches if len(b) >= world]  # a rank must never get an empty share


def train_losses(model, lm_head: torch.Tensor, batch: Batch, config: TrainConfig, phase: Phase,
                 noise: torch.Tensor | None, denominator: float, world: int, device: torch.device,
                 vocabulary: torch.Tensor | None = None) -> dict[str, float]:
    """Forward and backward of one batch; returns the logged per-step losses (normalised by the global count).

    Every step's graph is kept until one backward over the step-weighted sum of their losses: the gradient of the
    sum is the reference's sum of per-step backwards, while each feature set's projections stay one graph node
    that all later steps read. The price is S steps' activations at once; none of them is vocabulary-sized.
    """
    step_weights = [config.step_weight(s) for s in range(config.steps)]
    topk_weight = config.topk_weight(phase)
    with _autocast(config, device):
        outputs = step(model, batch, config.steps, noise)
        regression = torch.stack([masked_sum(feature_regression_loss(out, batch.targets), batch.loss_mask)
                                  for out in outputs])  # [S]
        vocabulary = vocabulary_losses(outputs, batch.targets, lm_head, batch.loss_mask,
                                       [w * config.ce_weight for w in step_weights],
                                       [w * topk_weight for w in step_weights], config.topk, config.loss_chunk,
                                       vocabulary)
    total = config.feature_weight * (regression * regression.new_tensor(step_weights)).sum() + vocabulary.weighted
    # DDP averages gradients over ranks; scaling by world / global count makes that the global mean.
    (total * world / denominator).backward()
    losses = (config.feature_weight * regression.detach().double() + config.ce_weight * vocabulary.cross_entropy
              + topk_weight * vocabulary.topk) / denominator  # [S], each step unweighted
    logged: dict[str, float] = {}
    for s in range(config.steps):
        logged[f"loss_{s}"] = float(losses[s])
        logged[f"top1_{s}"] = float(vocabulary.top1[s]) / denominator
    return logged


def _greedy_tokens(features: torch.Tensor, lm_head: torch.Tensor, chunk: int) -> torch.Tensor:
    """argmax of lm_head(features), `chunk` positions at a time: [B, N, H] -> [B, N], never a [B, N, V]."""
    rows = features.flatten(0, 1)
    return torch.cat([(part @ lm_head.T).argmax(-1) for part in rows.split(chunk)]).view(features.shape[:-1])


@torch.no_grad()
def evaluate(head: DraftHead, lm_head: torch.Tensor, dataset: HiddenStateDataset, config: TrainConfig) -> dict:
    """Per-depth acceptance of the draft rolled out on its own features over the held-out split.

    From every anchor position a inside the trained region the draft predicts depth i from its own i earlier
    predictions (the aligned pass i); depth i is correct if it equals the target's greedy token there. Reports
    cumulative acceptance P(depths 0..i all correct), the conditional per-depth rates, and the expected
    tokens per round of a chain draft, 1 + sum_i P(0..i correct).
    """
    model = HarmonizedDraft(head).eval()
    scorer = head.scoring_weight(lm_head)  # [V or N, H]
    depth = config.eval_depth
    accepted = torch.zeros(depth, device=lm_head.device)
    anchors = 0
    for start in range(0, len(dataset), config.batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + config.batch_size, len(dataset)))],
                        config.max_length).to(lm_head.device)
        outputs = step(model, batch, depth)
        target_tokens = _greedy_tokens(batch.features, lm_head, config.loss_chunk)  # [B, N] y_t, the target's
        seq = batch.valid.shape[1]
        chain = batch.loss_mask[:, : seq].bool()  # anchor a needs the first predicted token to be trained
        for i, out in enumerate(outputs):
            predicted = head.target_ids(_greedy_tokens(out, scorer, config.loss_chunk))  # [B, N] token after t + 1
            # Depth i from anchor a uses out_i[a + i] and the target's y[a + i + 1].
            correct = torch.zeros_like(chain)
            if seq - 1 - i > 0:
                hit = predicted[:, i : seq - 1] == target_tokens[:, i + 1 :]
                in_range = batch.valid[:, i + 1 :]
                correct[:, : seq - 1 - i] = hit & in_range
            chain = chain & correct
            accepted[i] += chain.sum()
        anchors += int(batch.loss_mask.bool().sum())
    cumulative = (accepted.cpu() / max(anchors, 1)).tolist()
    conditional = [cumulative[0]] + [c / p if p else 0.0 for p, c in zip(cumulative, cumulative[1:])]
    return {"acceptance": cumulative, "depth_acceptance": conditional, "expected_tau": 1 + sum(cumulative),
            "anchors": anchors}


def _save(head: DraftHead, out: Path, target: TargetHead, config: TrainConfig, state: TrainState,
          optimizer, scheduler, metrics: list[dict]) -> None:
    """Draft files + optimizer/scheduler state + metrics, replacing `out` atomically."""
    buffer = io.BytesIO()
    torch.save({"state": asdict(state), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "config": json.dumps(asdict(config))}, buffer)
    metadata = DraftMetadata(FORMAT_VERSION, config.recipe, target_identity(target))
    save_draft(head, out, metadata, extra_files={
        STATE_FILE: buffer.getvalue(),
        METRICS_FILE: "".join(json.dumps(m) + "\n" for m in metrics).encode(),
    })


def train(target_dir: str | Path, data_dir: str | Path, out: str | Path, config: TrainConfig = TrainConfig(),
          resume: bool = False, force: bool = False, progress: bool = True, device: str = "cpu") -> dict:
    """Train a draft head for `target_dir` on hidden states in `data_dir`; `out` becomes a loadable draft.

    Under torchrun the process group is set up here (gloo, or NCCL for "cuda", which means cuda:LOCAL_RANK) and
    torn down after; one that the caller initialised is used and left as it is (`distributed.py`).

    Returns the last epoch's evaluation metrics.
    """
    with Ranks.from_environment(device) as env:
        return _train(Path(target_dir), Path(data_dir), Path(out), config, resume, force, progress, env)


def _vocabulary(data: HiddenStateDataset, target: TargetHead, config: TrainConfig) -> torch.Tensor | None:
    """--draft-vocab's N target ids: the most frequent trained tokens of the training split (None: all)."""
    if config.draft_vocab is None:
        return None
    if config.draft_vocab > target.config.vocab_size:
        raise HassDeployError(f"--draft-vocab {config.draft_vocab} is more than the target's vocabulary "
                              f"({target.config.vocab_size})")
    return frequent_tokens(data.token_counts(), config.draft_vocab)


def _train(target_dir: Path, data_dir: Path, out: Path, config: TrainConfig, resume: bool, force: bool, progress: bool,
           env: Ranks) -> dict:
    device = env.device
    target = load_target_head(target_dir)
    train_set, eval_set = HiddenStateDataset(data_dir, "train"), HiddenStateDataset(data_dir, "eval")
    check_data_matches_target(train_set.manifest, target)
    if len(train_set) < env.world:
        raise HassDeployError(f"{data_dir}: {len(train_set)} training samples cannot feed {env.world} ranks")
    lm_head = target.lm_head.to(device)

    state, metrics = TrainState(), []
    saved_state = None
    if resume and (out / STATE_FILE).exists():
        head, _ = load_draft(out, target, dtype=torch.float32)
        saved_state = torch.load(out / STATE_FILE, weights_only=True)
        if _resumable(json.loads(saved_state["config"])) != _resumable(json.loads(json.dumps(asdict(config)))):
            raise HassDeployError(f"{out} was trained with different settings; resume with the same options")
        state = TrainState(**saved_state["state"])
        metrics = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines() if line.strip()]
    else:
        check_output_dir(out, force or resume, "use --resume to continue or --force to overwrite")
        head = init_draft(target, seed=config.seed, vocabulary=_vocabulary(train_set, target, config))
        if config.init_layer == "last":
            copy_target_layer(head, target_dir)
    head = head.float().to(device).train()
    vocabulary = head.vocabulary()  # [N] on the device, or None
    head.embed_tokens.weight.requires_grad_(False)
    model = HarmonizedDraft(head)
    if env.world > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    for phase_index in range(state.phase, len(config.phases)):
        phase = config.phases[phase_index]
        trainable = [p for p in head.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=phase.lr, betas=config.betas, weight_decay=config.weight_decay)
        steps_per_epoch = len(_batches(len(train_set), config, 0, env.world))
        scheduler = _schedule(optimizer, steps_per_epoch * phase.epochs, config)
        if saved_state is not None and phase_index == state.phase:
            optimizer.load_state_dict(saved_state["optimizer"])
            scheduler.load_state_dict(saved_state["scheduler"])
        first_epoch = state.epoch if phase_index == state.phase else 0
        for epoch in range(first_epoch, phase.epochs):
            epoch_seed = config.seed * 1_000_003 + phase_index * 10_007 + epoch
            logged: list[dict] = []
            batches = _batches(len(train_set), config, epoch_seed, env.world)
            with _progress(progress and env.rank == 0, f"phase {phase_index + 1} epoch {epoch + 1}/{phase.epochs}",
                           len(batches)) as advance:
                for indices in batches:
                    local = indices[env.rank :: env.world]
                    batch = collate([train_set[i] for i in local], config.max_length)
                    noise = _noise(batch, local, config, epoch_seed).to(device) if config.feature_noise else None
                    batch = batch.to(device)
                    count = env.all_sum(batch.loss_mask.sum().double())
                    if float(count) == 0:
                        continue
                    logged.append(train_losses(model, lm_head, batch, config, phase, noise, float(count), env.world,
                                               device, vocabulary))
                    for p in trainable:
                        if p.grad is not None:
                            p.grad.clamp_(-config.grad_clip, config.grad_clip)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    state.global_step += 1
                    advance(batch.tokens * env.world, logged[-1].get("loss_0", 0.0))
            record = {"phase": phase_index, "epoch": epoch + 1, "step": state.global_step,
                      "lr": scheduler.get_last_lr()[0],
                      **{k: sum(d[k] for d in logged) / len(logged) for k in (logged[0] if logged else {})}}
            if env.rank == 0:
                record.update({f"eval_{k}": v for k, v in evaluate(head, lm_head, eval_set, config).items()})
                metrics.append(record)
            state = TrainState(phase_index, epoch + 1, state.global_step)
            if env.rank == 0:
                _save(head, out, target, config, state, optimizer, scheduler, metrics)
                if progress:
                    _report(record)
            env.barrier()
        state = TrainState(phase_index + 1, 0, state.global_step)
        saved_state = None
    return metrics[-1] if metrics else {}


def _report(record: dict) -> None:
    from rich.console import Console

    depths = " ".join(f"{a:.2f}" for a in record.get("eval_depth_acceptance", []))
    Console(stderr=True).print(
        f"epoch {record['epoch']}: loss {record.get('loss_0', float('nan')):.4f}  top1 {record.get('top1_0', 0):.3f}  "
        f"eval tau {record.get('eval_expected_tau', float('nan')):.3f}  per-depth acceptance [{depths}]")


class _progress:
    """A rich progress bar with tokens/s and ETA (silent when disabled, e.g. on non-zero ranks)."""

    def __init__(self, enabled: bool, title: str, total: int):
        self.enabled, self.title, self.total = enabled, title, total

    def __enter__(self):
        self.bar = progress_bar(self.title, "{task.fields[rate]:.0f} tok/s  loss {task.fields[loss]:.4f}",
                                enabled=self.enabled)
        self.bar.__enter__()
        task = self.bar.add_task(self.title, total=self.total, rate=0.0, loss=math.nan)
        seen = {"tokens": 0}

        def advance(tokens: int, loss: float) -> None:
            seen["tokens"] += tokens
            elapsed = self.bar.tasks[0].elapsed or 1e-9
            self.bar.update(task, advance=1, rate=seen["tokens"] / elapsed, loss=loss)

        return advance

    def __exit__(self, *exc):
        self.bar.__exit__(*exc)
        return False
