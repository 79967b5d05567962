"""The training loop: it learns (loss down, acceptance above a random draft's), resumes exactly, runs
data-parallel with the same result as one process, and its output is a draft that decodes losslessly."""

from __future__ import annotations

import gc
import json
import os
import socket
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

from conftest import make_decoder
from hass_deploy.config import GenerationConfig, Phase, TrainConfig, TreeConfig
from hass_deploy.errors import HassDeployError
from hass_deploy.models.checkpoint import init_draft, load_draft
from hass_deploy.models.loading import load_target, load_target_head
from hass_deploy.models.random_target import random_hf_model
from hass_deploy.training import trainer
from hass_deploy.training.data import HiddenStateDataset
from hass_deploy.training.extract import DataConfig, generate_data
from hass_deploy.training.losses import draft_log_probs

VOCAB = 64


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    """A small peaked random target and hidden states of random token sequences from it."""
    root = tmp_path_factory.mktemp("training")
    model = random_hf_model("llama", "tiny", seed=5, vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=128, tie_word_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # a target with opinions, so acceptance is learnable and measurable
    model.save_pretrained(root / "target")
    target = load_target(root / "target")
    generator = torch.Generator().manual_seed(0)
    lines = []
    for _ in range(48):  # self-distilled text: the target's own greedy continuations of random prefixes
        prefix = torch.randint(0, VOCAB, (4,), generator=generator).tolist()
        result = make_decoder(target).generate(prefix, GenerationConfig(max_new_tokens=28))
        lines.append(json.dumps({"ids": prefix + result.output_ids}))
    (root / "data.jsonl").write_text("\n".join(lines) + "\n")
    generate_data(root / "target", root / "data.jsonl", root / "data",
                  DataConfig(format="ids", dtype="fp32", eval_fraction=0.25, shard_size=8))
    return root


def fast(**overrides) -> TrainConfig:
    base = TrainConfig(phases=(Phase(epochs=3, lr=3e-3, topk_weight=1.0),), batch_size=6, precision="fp32",
                       eval_depth=3, feature_noise=0.05)
    return replace(base, **overrides)


def test_hass_training_learns_and_beats_a_random_draft(workspace, tmp_path):
    metrics = trainer.train(workspace / "target", workspace / "data", tmp_path / "draft", fast(), progress=False)
    history = [json.loads(line) for line in (tmp_path / "draft" / trainer.METRICS_FILE).read_text().splitlines()]
    assert len(history) == 3 and history[-1]["loss_0"] < history[0]["loss_0"]
    target = load_target_head(workspace / "target")
    random_metrics = trainer.evaluate(init_draft(target, seed=0), target.lm_head,
                                      HiddenStateDataset(workspace / "data", "eval"), fast())
    assert metrics["eval_expected_tau"] > random_metrics["expected_tau"] + 0.2
    assert metrics["eval_acceptance"][0] > 2 * random_metrics["acceptance"][0]


def test_trained_draft_decodes_losslessly_and_gets_accepted(workspace, tmp_path):
    trainer.train(workspace / "target", workspace / "data", tmp_path / "draft", fast(), progress=False)
    target = load_target(workspace / "target")
    head, metadata = load_draft(tmp_path / "draft", target)
    assert metadata.recipe == "hass"
    tree = TreeConfig(tokens=6, depth=3, top_k=2)
    config = GenerationConfig(max_new_tokens=30, tree=tree)
    for prompt in ([1, 2, 3], [7, 30, 12, 9]):
        plain = make_decoder(target).generate(prompt, config)
        spec = make_decoder(target, head).generate(prompt, config)
        assert spec.output_ids == plain.output_ids
        assert spec.tau > 1.0


def test_eagle2_recipe_is_one_step_without_topk(workspace, tmp_path):
    config = fast(recipe="eagle2")
    assert config.steps == 1 and config.topk_weight(config.phases[0]) == 0.0
    trainer.train(workspace / "target", workspace / "data", tmp_path / "draft", config, progress=False)
    record = json.loads((tmp_path / "draft" / trainer.METRICS_FILE).read_text().splitlines()[-1])
    assert "loss_1" not in record and "loss_0" in record


def test_bf16_autocasts_the_draft_over_fp32_master_weights(workspace, tmp_path, monkeypatch):
    forward_dtypes: set[torch.dtype] = set()
    real_init = trainer.init_draft

    def init_draft(*args, **kwargs):
        head = real_init(*args, **kwargs)
        head.fc.register_forward_hook(lambda module, inputs, output: forward_dtypes.add(output.dtype))
        return head

    monkeypatch.setattr(trainer, "init_draft", init_draft)
    trainer.train(workspace / "target", workspace / "data", tmp_path / "draft",
                  fast(precision="bf16", phases=(Phase(epochs=1, lr=3e-3, topk_weight=1.0),)), progress=False)
    assert torch.bfloat16 in forward_dtypes  # the training passes (evaluation runs in fp32)
    saved = torch.load(tmp_path / "draft" / trainer.STATE_FILE, weights_only=True)["optimizer"]["state"]
    moments = [t for state in saved.values() for name, t in state.items() if name != "step"]
    assert moments and {t.dtype for t in moments} == {torch.float32}
    head, _ = load_draft(tmp_path / "draft", load_target_head(workspace / "target"))  # in its stored dtype
    assert {p.dtype for p in head.parameters()} == {torch.float32}


def test_log_q_is_fp32_under_bf16_autocast():
    """The lm_head matmul may run in bf16; the log-softmax may not (the CPU's autocast would leave it in bf16)."""
    features, lm_head = torch.randn(2, 5, 16), torch.randn(32, 16)
    with trainer._autocast(fast(precision="bf16"), torch.device("cpu")):
        logits = features @ lm_head.T
        log_q = draft_log_probs(features, lm_head)
    assert logits.dtype == torch.bfloat16 and log_q.dtype == torch.float32
    torch.testing.assert_close(log_q, torch.log_softmax(logits.float(), dim=-1))


def test_interrupted_training_resumes_to_the_same_weights(workspace, tmp_path, monkeypatch):
    config = fast(phases=(Phase(epochs=2, lr=3e-3, topk_weight=0.0), Phase(epochs=1, lr=1e-3, topk_weight=1.0)))
    trainer.train(workspace / "target", workspace / "data", tmp_path / "whole", config, progress=False)

    real_evaluate, calls = trainer.evaluate, []

    def crash_on_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(trainer, "evaluate", crash_on_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(workspace / "target", workspace / "data", tmp_path / "resumed", config, progress=False)
    monkeypatch.setattr(trainer, "evaluate", real_evaluate)
    assert len((tmp_path / "resumed" / trainer.METRICS_FILE).read_text().splitlines()) == 1
    with pytest.raises(HassDeployError, match="not empty"):
        trainer.train(workspace / "target", workspace / "data", tmp_path / "resumed", config, progress=False)
    trainer.train(workspace / "target", workspace / "data", tmp_path / "resumed", config, resume=True, progress=False)
    target = load_target_head(workspace / "target")
    whole, _ = load_draft(tmp_path / "whole", target)
    resumed, _ = load_draft(tmp_path / "resumed", target)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(HassDeployError, match="different settings"):
        trainer.train(workspace / "target", workspace / "data", tmp_path / "resumed", fast(), resume=True,
                      progress=False)
    # A memory-only setting may differ (and checkpoints from before it existed, without it, resume too).
    trainer.train(workspace / "target", workspace / "data", tmp_path / "resumed", replace(config, loss_chunk=3),
                  resume=True, progress=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CountingDDP(DistributedDataParallel):
    """DDP that appends the bucket index of every gradient all-reduce it makes to `calls`."""

    calls: list[int] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_comm_hook(None, self._reduce)

    @staticmethod
    def _reduce(state, bucket):
        CountingDDP.calls.append(bucket.index())
        return allreduce_hook(None, bucket)


def _ddp_worker(rank: int, world: int, port: int, args: tuple, callers_group: bool) -> None:
    """One torchrun-style rank: trains, then checks the process group and writes its all-reduce count.

    With `callers_group` the group is initialised here first (as accelerate or a script would): the trainer must
    use it and leave it; otherwise the trainer initialises its own and must tear it down.
    """
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    if callers_group:
        dist.init_process_group("gloo")
    trainer.DistributedDataParallel = CountingDDP  # this process's trainer: a spawned worker imports its own
    trainer.train(*args, progress=False)
    if callers_group:
        total = torch.ones(1)
        dist.all_reduce(total)  # still usable after training
        assert total.item() == world
        # The trainer's DDP wrapper (its reducer holds the group) goes first, then both ranks tear down together:
        # otherwise a rank's exit could abort the other's gloo threads ("terminate called without an active
        # exception", about one run in four).
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
    else:
        assert not dist.is_initialized()
    out = Path(args[2])
    (out.parent / f"{out.name}.rank{rank}.json").write_text(json.dumps(CountingDDP.calls))


def _one_all_reduce_per_optimizer_step(out: Path, world: int) -> None:
    """Each bucket's gradients reduced exactly once per optimizer step, on every rank, not once per aligned pass."""
    steps = torch.load(out / trainer.STATE_FILE, weights_only=True)["state"]["global_step"]
    assert steps > 0
    for rank in range(world):
        calls = json.loads((out.parent / f"{out.name}.rank{rank}.json").read_text())
        buckets = set(calls)
        assert buckets and all(calls.count(b) == steps for b in buckets), (rank, steps, calls)


def test_two_process_ddp_matches_single_process(workspace, tmp_path):
    config = fast(phases=(Phase(epochs=2, lr=3e-3, topk_weight=1.0),), batch_size=8)
    assert config.steps == 3  # HASS: three aligned passes per batch, one all-reduce
    trainer.train(workspace / "target", workspace / "data", tmp_path / "single", config, progress=False)
    mp.spawn(_ddp_worker, args=(2, _free_port(), (workspace / "target", workspace / "data", tmp_path / "ddp", config),
                                False), nprocs=2, join=True)
    target = load_target_head(workspace / "target")
    single, _ = load_draft(tmp_path / "single", target)
    parallel, _ = load_draft(tmp_path / "ddp", target)
    for (name, a), b in zip(single.state_dict().items(), parallel.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
    _one_all_reduce_per_optimizer_step(tmp_path / "ddp", 2)


def test_a_callers_process_group_is_used_and_outlives_training(workspace, tmp_path):
    config = fast(phases=(Phase(epochs=1, lr=3e-3, topk_weight=1.0),), batch_size=8)
    mp.spawn(_ddp_worker, args=(2, _free_port(), (workspace / "target", workspace / "data", tmp_path / "ddp", config),
                                True), nprocs=2, join=True)
    _one_all_reduce_per_optimizer_step(tmp_path / "ddp", 2)


def test_data_from_another_target_is_refused(workspace, tmp_path):
    random_hf_model("llama", "tiny", seed=99, vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=128).save_pretrained(tmp_path / "other")
    with pytest.raises(HassDeployError, match="another target|different target"):
        trainer.train(tmp_path / "other", workspace / "data", tmp_path / "draft", fast(), progress=False)


def test_a_reduced_vocabulary_draft_learns_its_frequent_tokens(workspace, tmp_path):
    """--draft-vocab: the N most frequent trained tokens of the data, stored with the draft; it still learns."""
    config = fast(draft_vocab=32, topk=4)
    metrics = trainer.train(workspace / "target", workspace / "data", tmp_path / "draft", config, progress=False)
    target = load_target_head(workspace / "target")
    head, _ = load_draft(tmp_path / "draft", target)
    counts = HiddenStateDataset(workspace / "data").token_counts()
    assert head.draft_vocab == 32 and int(counts[head.vocabulary()].min()) >= int(counts.sort().values[-32])
    random_metrics = trainer.evaluate(init_draft(target, seed=0, vocabulary=head.vocabulary()), target.lm_head,
                                      HiddenStateDataset(workspace / "data", "eval"), fast())
    assert metrics["eval_expected_tau"] > random_metrics["expected_tau"] + 0.2
    with pytest.raises(HassDeployError, match="--draft-vocab 100 is more than the target's vocabulary"):
        trainer.train(workspace / "target", workspace / "data", tmp_path / "big", fast(draft_vocab=100),
                      progress=False)


def test_the_draft_layer_can_start_as_the_targets_last_layer(workspace, tmp_path):
    from hass_deploy.models.checkpoint import copy_target_layer

    target = load_target(workspace / "target")
    head = copy_target_layer(init_draft(target, seed=0), workspace / "target")
    last = target.module.layers[-1].state_dict()
    for name, value in head.layers[0].state_dict().items():
        assert torch.equal(value, last[name]), name
    assert "input_layernorm.weight" in last and "input_layernorm.weight" not in head.layers[0].state_dict()
    trainer.train(workspace / "target", workspace / "data", tmp_path / "draft",
                  fast(init_layer="last", phases=(Phase(epochs=1, lr=3e-3, topk_weight=1.0),)), progress=False)
