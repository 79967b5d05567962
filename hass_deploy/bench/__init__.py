"""`hass-deploy bench`: plain vs speculative decoding (one draft or several) on the same prompts, with the
paper's metrics, a lossless check, `--tree auto`, and JSON / Markdown / PNG reports.

    config.py       what a run measures (no torch: the CLI reads its defaults)
    metrics.py      the metric definitions (pure functions)
    costs.py        measured step latencies (the cost curve) and a step-timing proxy
    tree_search.py  `--tree auto`: candidate grid, cost model, chooser
    runner.py       loading, warm-up, the alternating loop: `run_bench`, `run_drafts`
    results.py      records, summaries, `BenchReport`
    report.py       bench.json, bench.md, bench.png
"""

import importlib

from hass_deploy.bench.config import BenchConfig, TreeSearchConfig

# name -> the module that defines it; these import torch, so they load on first use.
_LAZY = {"BenchReport": "results", "MethodSummary": "results", "PromptRun": "results", "bench_decoders": "runner",
         "run_bench": "runner", "run_drafts": "runner", "BenchDraft": "runner", "TreeChoice": "tree_search", "choose_tree": "tree_search"}
__all__ = ["BenchConfig", "TreeSearchConfig", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"hass_deploy.bench.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'hass_deploy.bench' has no attribute {name!r}")
