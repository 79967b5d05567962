"""What a HASS training step costs next to an EAGLE-2 one, on the same random batches (issue 13, item 2).

    python benchmarks/train_step_cost.py [--batch 8] [--seq 512] [--hidden 384] [--vocab 4096] [--repeats 5]

Builds a random draft of the demo target's shape (H 384, 6 heads, 2 KV heads, intermediate 1024, V 4096) and a
random lm_head, then times one full training step (`trainer.train_losses`, forward and backward of every aligned
pass, plus the optimizer step) for each recipe. The recipes alternate on the same batch, repeat after repeat, so a
slower or busier stretch of the machine hits both alike; the first round is a warm-up and is not counted. Prints
the median seconds per step (wall and CPU time), tokens/s and the HASS/EAGLE-2 ratio, which is the ratio of their
epoch costs (an epoch is the same batches for both).

To time another version of the code, put it first on the path, e.g. the last commit's:

    mkdir -p /tmp/head && git archive HEAD hass_deploy | tar -x -C /tmp/head
    PYTHONPATH=/tmp/head python benchmarks/train_step_cost.py
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import hass_deploy
from hass_deploy.config import TrainConfig
from hass_deploy.models.draft import DraftHead
from hass_deploy.models.target import ModelConfig
from hass_deploy.training.alignment import HarmonizedDraft
from hass_deploy.training.trainer import Batch, train_losses


def random_batch(batch: int, seq: int, hidden: int, vocab: int, generator: torch.Generator) -> Batch:
    """Unit-scale features (post-norm hidden states are), right padding of up to a quarter of each row."""
    features = torch.randn(batch, seq + 1, hidden, generator=generator)
    lengths = seq - torch.randint(0, seq // 4, (batch,), generator=generator)
    valid = torch.arange(seq)[None] < lengths[:, None]  # [B, N]
    loss_mask = valid.float()
    loss_mask[:, -1] = 0.0
    return Batch(features[:, :-1] * valid[..., None], torch.randint(0, vocab, (batch, seq), generator=generator),
                 features[:, 1:] * valid[..., None], loss_mask, valid)


def macs_per_position(config: ModelConfig, seq: int, steps: int) -> float:
    """Multiply-accumulates of one trained position in a step of `steps` aligned passes, with these losses.

    The floor any implementation of the same losses and gradients meets. Shared by all passes: the target's
    distribution (one V x H projection, no gradient). Per pass: the layer (fc over [embedding, feature], q/k/v/o,
    the MLP, causal attention over on average N/2 keys) forward, and backward at twice that (inputs and weights);
    the draft's V x H projection forward, and backward to its input only (the lm_head is the target's, frozen).
    """
    h, d = config.hidden_size, config.head_dim
    layer = (2 * h * h + h * d * (config.num_heads + 2 * config.num_kv_heads) + config.num_heads * d * h
             + 3 * h * config.intermediate_size + config.num_heads * d * seq)
    vocabulary = config.vocab_size * h
    return vocabulary + steps * (3 * layer + 2 * vocabulary)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--precision", default=TrainConfig.precision, choices=("bf16", "fp32"))
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 makes CPU time robust to a "
                        "busy machine")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    heads = max(1, args.hidden // 64)
    config = ModelConfig("LlamaForCausalLM", args.vocab, args.hidden, 8 * args.hidden // 3, 1, heads,
                         max(1, heads // 3), args.hidden // heads, 1e-6, 4096)
    head = DraftHead(config).train()
    lm_head = torch.randn(args.vocab, args.hidden) * args.hidden ** -0.5
    model = HarmonizedDraft(head)
    trainable = [p for p in head.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    recipes = {"hass": TrainConfig(recipe="hass", precision=args.precision),
               "eagle2": TrainConfig(recipe="eagle2", precision=args.precision)}
    generator = torch.Generator().manual_seed(0)
    batches = [random_batch(args.batch, args.seq, args.hidden, args.vocab, generator) for _ in range(args.repeats + 1)]
    # Wall time is what an epoch costs; CPU time (all of this process's threads) barely moves when other processes
    # share the cores, as long as no thread spins waiting for a descheduled one (--threads 1).
    times: dict[tuple[str, str], list[float]] = {(name, clock): [] for name in recipes for clock in ("wall", "cpu")}
    for round_, batch in enumerate(batches):
        for name, train_config in recipes.items():
            # Each timed step follows an untimed one of the same recipe, as in training: the allocator then holds
            # what this recipe's step needs (after the other recipe's step it may hold more, or less).
            for timed in (False, True):
                wall, cpu = time.perf_counter(), time.process_time()
                train_losses(model, lm_head, batch, train_config, train_config.phases[0], None,
                             float(batch.loss_mask.sum()), 1, torch.device("cpu"))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if timed and round_:  # round 0 warms up kernels
                    times[name, "wall"].append(time.perf_counter() - wall)
                    times[name, "cpu"].append(time.process_time() - cpu)
    tokens = args.batch * args.seq
    print(f"code: {Path(hass_deploy.__file__).parent}")
    print(f"B={args.batch} N={args.seq} H={args.hidden} V={args.vocab} precision={args.precision} "
          f"threads={torch.get_num_threads()} repeats={args.repeats} (medians, recipes interleaved)")
    for clock in ("wall", "cpu"):
        for name, train_config in recipes.items():
            series = times[name, clock]
            median = statistics.median(series)
            print(f"  {clock:4s} {name:7s} steps={train_config.steps}  {median:7.3f} s/step  "
                  f"{tokens / median:8.0f} tokens/s  (min {min(series):.3f}, max {max(series):.3f})")
        ratios = [h / e for h, e in zip(times["hass", clock], times["eagle2", clock])]
        median_ratio = statistics.median(times["hass", clock]) / statistics.median(times["eagle2", clock])
        print(f"  {clock:4s} HASS/EAGLE-2 epoch cost: {median_ratio:.2f} "
              f"(per round: {', '.join(f'{r:.2f}' for r in ratios)})")
    floor = macs_per_position(config, args.seq, recipes["hass"].steps) / macs_per_position(config, args.seq, 1)
    print(f"  work ratio of the same losses (multiply-accumulates per position, the floor): {floor:.2f}")


if __name__ == "__main__":
    main()
