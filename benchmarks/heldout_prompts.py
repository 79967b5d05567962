"""Held-out chat prompts that no draft trained on: first user turns of dataset conversations that none of the given
data directories (`hass-deploy data` outputs, both splits) drew a record from, picked by a seeded shuffle.

    python benchmarks/heldout_prompts.py --dataset sharegpt --data RUNS/sg640 --count 20 --out heldout.jsonl

Conversations, not records: ShareGPT splits a long conversation into parts `ID_0`, `ID_1`, ...; a prompt from an
unused part of a trained conversation would share its context with the training data. Benchmark prompts are left
out of the candidates as `hass-deploy data` leaves them out of training (decontaminate.py).
"""

from __future__ import annotations

import argparse
import json
import random

from hass_deploy.packages import DATASETS, named
from hass_deploy.training.chat import read_records
from hass_deploy.training.data import trained_conversations
from hass_deploy.training.decontaminate import Blocklist, benchmark_files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="sharegpt", help="A packaged dataset's name or a ShareGPT file.")
    parser.add_argument("--data", action="append", default=[], help="A data directory whose records to avoid.")
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--max-chars", type=int, default=1500, help="A prompt's most characters (questions, not documents).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    records, _ = read_records(named(args.dataset, DATASETS), "sharegpt", False, Blocklist.of_files(benchmark_files()))
    used = {c for d in args.data for c in trained_conversations(d)}
    firsts: dict = {}
    for record in records:  # a conversation's first part opens it
        firsts.setdefault(record.conversation or str(record.index), record)
    candidates = [(c, r) for c, r in firsts.items() if c not in used]
    random.Random(args.seed).shuffle(candidates)
    lines = []
    for conversation, record in candidates:
        first = next((m["content"] for m in record.messages if m["role"] == "user"), "")
        if first.strip() and len(first) <= args.max_chars:
            lines.append({"prompt": first, "id": str(conversation)})
        if len(lines) == args.count:
            break
    with open(args.out, "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    print(f"{len(lines)} prompts from {len(candidates)} of {len(firsts)} conversations unused by {len(used)} trained ones")


if __name__ == "__main__":
    main()
