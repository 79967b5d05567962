"""Peak memory of one training step at a real vocabulary (issue 13, item 3).

    python benchmarks/train_memory.py [--vocab 128256] [--batch 2] [--seqs 256,512,1024] [--code DIR]

Each measurement runs in a fresh Python process (Linux only). It builds a tiny random draft (H 64, 4 heads, 2 KV
heads, intermediate 176) and an lm_head [V, 64], one random right-padded batch, and runs `trainer.train_losses`
(the default recipe, HASS with 3 aligned steps, at the default precision) once to warm up. Then it resets the
kernel's peak resident-set counter (writing 5 to /proc/self/clear_refs), runs one more step and reads VmHWM from
/proc/self/status: the step's peak is VmHWM minus the resident memory just before it (weights and batch excluded).
Torch's CPU tensors are plain malloc/mmap memory, so the resident peak is the tensors' peak plus allocator slack;
it is deterministic to a few MB.

`--code DIR` imports `hass_deploy` from DIR, e.g. the last commit's code for a before/after comparison:

    mkdir -p /tmp/head && git archive HEAD hass_deploy | tar -x -C /tmp/head
    python benchmarks/train_memory.py --code /tmp/head
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def _resident_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(vocab: int, batch: int, seq: int) -> dict:
    """In this process: the resident peak of one training step above the memory held before it, in MiB."""
    import torch

    import hass_deploy
    from hass_deploy.config import TrainConfig
    from hass_deploy.models.draft import DraftHead
    from hass_deploy.models.target import ModelConfig
    from hass_deploy.training.alignment import HarmonizedDraft
    from hass_deploy.training.trainer import Batch, train_losses

    torch.manual_seed(0)
    head = DraftHead(ModelConfig("LlamaForCausalLM", vocab, 64, 176, 1, 4, 2, 16, 1e-6, 4096)).train()
    lm_head = torch.randn(vocab, 64) * 0.125
    features = torch.randn(batch, seq + 1, 64)
    valid = torch.ones(batch, seq, dtype=torch.bool)
    valid[-1, seq - seq // 4 :] = False
    data = Batch(features[:, :-1], torch.randint(0, vocab, (batch, seq)), features[:, 1:], valid.float(), valid)
    config = TrainConfig()
    model = HarmonizedDraft(head)

    def one_step() -> None:
        train_losses(model, lm_head, data, config, config.phases[0], None, float(data.loss_mask.sum()), 1,
                     torch.device("cpu"))
        head.zero_grad(set_to_none=True)

    one_step()  # first-use allocations (thread pools, kernels) are not the step's
    before = _resident_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    one_step()
    peak = _resident_kib("VmHWM")
    return {"code": str(Path(hass_deploy.__file__).parent), "vocab": vocab, "batch": batch, "seq": seq,
            "step_peak_mib": (peak - before) / 1024, "vocab_tensor_mib": batch * seq * vocab * 4 / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=128256)  # Llama 3's
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seqs", default="256,512,1024")
    parser.add_argument("--code", type=Path, help="import hass_deploy from this directory instead")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)  # one measurement at this sequence length
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args.vocab, args.batch, args.child)))
        return

    env = dict(os.environ)
    if args.code is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(args.code.resolve()), env.get("PYTHONPATH", "")])
    print("One training step (the default recipe and precision), peak RSS above the resident memory before it, "
          "a fresh process per row.")
    print("| code | B | N | V | fp32 [B, N, V] | step peak |")
    print("| --- | --- | --- | --- | --- | --- |")
    for seq in (int(s) for s in args.seqs.split(",")):
        out = subprocess.run([sys.executable, __file__, "--vocab", str(args.vocab), "--batch", str(args.batch),
                              "--child", str(seq)], env=env, check=True, capture_output=True, text=True).stdout
        row = json.loads(out.splitlines()[-1])
        print(f"| {row['code']} | {row['batch']} | {row['seq']} | {row['vocab']} | {row['vocab_tensor_mib']:.0f} MiB "
              f"| {row['step_peak_mib']:.0f} MiB |")


if __name__ == "__main__":
    main()
