"""Our conversion of the real SmolLM2 GGUF decodes as llama.cpp decodes the file: greedy, on the prompts of
tests/models/data/llama_cpp_smollm2.json (MT-bench, HumanEval, GSM8K and Alpaca questions in the chat template),
against llama.cpp's tokens on the F32 file `llama-quantize` writes from the Q4_1 one (the dequantized weights: the
numbers our fp32 conversion holds). The fixture, and how to write it again: benchmarks/record_llama_parity.py.

Two fp32 implementations sum in different orders, so a prompt may part where the two best logits are almost equal;
that is allowed, and only that: at the first differing token our two best logits must be within NEAR_TIE and be
llama.cpp's token and ours. The tokens after it are not compared (the contexts differ from there)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import NEEDS_SMOLLM2, make_decoder
from hass_deploy.config import GenerationConfig
from hass_deploy.models.loading import load_target

FIXTURE = Path(__file__).parent / "data" / "llama_cpp_smollm2.json"
# Logits here run to about 45; where ours and llama.cpp's F32 agreed, the two best were as close as 0.003. A wrong
# weight, a mis-tokenized prompt or a broken template moves them by whole units.
NEAR_TIE = 0.05


def until_eos(ids: list[int], eos: int) -> list[int]:
    """Up to and including the first EOS: our decoder stops there, llama.cpp ran on (--ignore-eos)."""
    return ids[: ids.index(eos) + 1] if eos in ids else ids


def top2(target, ids: list[int]) -> tuple[list[int], float]:
    """Our two best next tokens after `ids` (one forward, no cache) and their logit gap."""
    with torch.no_grad():
        hidden = target.module(torch.tensor([ids]), torch.arange(len(ids))[None])
        best = torch.topk(target.module.logits(hidden[0, -1]).float(), 2)
    return best.indices.tolist(), float(best.values[0] - best.values[1])


def compare(target, prompt_ids: list[int], ours: list[int], theirs: list[int]) -> dict:
    """Where our tokens and llama.cpp's first differ (None: identical), and our top-2 there."""
    same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    if same is None and len(ours) == len(theirs):
        return {"matched": len(ours), "diverges": None}
    at = same if same is not None else min(len(ours), len(theirs))  # one stopped at EOS, the other did not
    tokens, gap = top2(target, prompt_ids + ours[:at])
    return {"matched": at, "diverges": at, "ours": ours[at] if at < len(ours) else None,
            "theirs": theirs[at] if at < len(theirs) else None, "top2": tokens, "gap": gap}


@pytest.mark.slow
@NEEDS_SMOLLM2
def test_our_conversion_decodes_as_llama_cpp_on_the_real_gguf(smollm2_converted):
    fixture = json.loads(FIXTURE.read_text())
    target = load_target(smollm2_converted)
    assert json.loads((smollm2_converted / "hass_deploy_gguf.json").read_text())["sha256"] == fixture["gguf"]["sha256"]
    eos, new_tokens = fixture["eos_token_id"], fixture["new_tokens"]
    assert target.eos_token_ids == (eos,)
    asserted = fixture["asserted_format"]
    lines, bad, identical = [], [], {name: 0 for name in fixture["formats"]}
    for prompt in fixture["prompts"]:
        ids = prompt["prompt_ids"]
        config = GenerationConfig(max_new_tokens=new_tokens, eos_token_ids=target.eos_token_ids)
        ours = make_decoder(target, max_len=len(ids) + new_tokens).generate(ids, config).output_ids
        for name, theirs in prompt["llama_ids"].items():
            found = compare(target, ids, ours, until_eos(theirs, eos))
            identical[name] += found["diverges"] is None
            label = f"{name} {prompt['set']}#{prompt['question_id']}"
            if found["diverges"] is None:
                lines.append(f"{label}: identical ({found['matched']} tokens)")
                continue
            near_tie = (found["gap"] <= NEAR_TIE and found["theirs"] is not None and found["ours"] is not None
                        and sorted(found["top2"]) == sorted([found["ours"], found["theirs"]]))
            lines.append(f"{label}: {found['matched']} tokens matched, then ours {found['ours']} / llama.cpp "
                         f"{found['theirs']}, our top-2 {found['top2']} {found['gap']:.4f} apart"
                         + ("" if near_tie or name != asserted else " (NOT a near-tie)"))
            if name == asserted and not near_tie:
                bad.append(lines[-1])
    summary = ", ".join(f"{name}: {identical[name]}/{len(fixture['prompts'])} identical" for name in identical)
    print("\n".join([f"llama.cpp {fixture['llama_cpp']['commit'][:12]} ({summary}; only {asserted} asserted)",
                     *lines]))
    assert not bad, f"{summary}; diverged without a near-tie (gap > {NEAR_TIE}):\n" + "\n".join(bad)
