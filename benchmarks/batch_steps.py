"""What a batched target step costs against the same sequences' steps one at a time (`TargetBackend.step_batch`):
B sequences, each with a committed context of C rows and T new rows, median ms over repeats.

    python benchmarks/batch_steps.py --target smollm2 --batch 1,2,4,8 --rows 1,4 --context 128 --out batch.json

A script, not a timed test. The torch backend packs the rows into one forward; the others (today) run the parts in
turn, so their ratio is about 1.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from hass_deploy.models.gguf import resolve_target
from hass_deploy.models.loading import load_target
from hass_deploy.runtime.backends.base import SequenceStep
from hass_deploy.runtime.backends.torch import TorchTarget


def median_ms(run, repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--batch", default="1,2,4,8", help="Sequences per step, comma-separated.")
    parser.add_argument("--rows", default="1,4", help="New rows per sequence, comma-separated.")
    parser.add_argument("--context", type=int, default=128, help="Committed rows of each sequence.")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    torch.manual_seed(0)
    target = load_target(resolve_target(args.target), "fp32", tokenizer=False)
    max_len = args.context + max(int(t) for t in args.rows.split(",")) + 1
    base = TorchTarget(target.module, max_len, steps="eager")
    vocab, results = target.config.vocab_size, []
    for batch in (int(b) for b in args.batch.split(",")):
        forks = [base.fork() for _ in range(batch)]
        for fork in forks:
            fork.step(torch.randint(0, vocab, (1, args.context)), torch.arange(args.context)[None], 0, None,
                      last_only=True)
        for rows in (int(t) for t in args.rows.split(",")):
            parts = [SequenceStep(fork, torch.randint(0, vocab, (1, rows)),
                                  torch.arange(args.context, args.context + rows)[None], args.context, None)
                     for fork in forks]
            packed = median_ms(lambda: base.step_batch(parts), args.repeats)
            turns = median_ms(lambda: [p.backend.step(p.input_ids, p.position_ids, p.cache_len, None)
                                       for p in parts], args.repeats)
            results.append({"batch": batch, "rows": rows, "packed_ms": packed, "one_at_a_time_ms": turns,
                            "speedup": turns / packed})
            print(f"B={batch} T={rows}: packed {packed:.1f} ms, one at a time {turns:.1f} ms "
                  f"({turns / packed:.2f}x)")
    Path(args.out).write_text(json.dumps({"target": args.target, "context": args.context, "torch_threads":
                                          torch.get_num_threads(), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
