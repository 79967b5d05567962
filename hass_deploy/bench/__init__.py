"""`hass-deploy bench`: plain vs speculative decoding (vs a baseline draft) on the same prompts, with the
paper's metrics, a lossless check, `--tree auto`, and JSON / Markdown / PNG reports.

    metrics.py      the metric definitions (pure functions)
    costs.py        measured step latencies (the cost curve) and a step-timing proxy
    tree_search.py  `--tree auto`: candidate grid, cost model, chooser
    runner.py       loading, warm-up, the alternating loop: `run_bench`
    results.py      records, summaries, `BenchReport`
    report.py       bench.json, bench.md, bench.png
"""

from hass_deploy.bench.config import BenchConfig, TreeSearchConfig
from hass_deploy.bench.results import BenchReport, MethodSummary, PromptRun
from hass_deploy.bench.runner import bench_decoders, run_bench
from hass_deploy.bench.tree_search import TreeChoice, choose_tree

__all__ = ["BenchConfig", "BenchReport", "MethodSummary", "PromptRun", "TreeChoice", "TreeSearchConfig",
           "bench_decoders", "choose_tree", "run_bench"]
