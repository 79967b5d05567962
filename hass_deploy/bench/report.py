"""A benchmark's three files: `bench.json` (everything), `bench.md` (tables) and `bench.png` (plots)."""

from __future__ import annotations

import datetime
import itertools
import json
import os
import platform
from importlib import metadata
from pathlib import Path

from hass_deploy.bench.results import HYBRID, OVERALL, PLAIN, BenchReport, MethodSummary
from hass_deploy.atomic import check_output_dir

# Plain decoding grey, then matplotlib's tab10 (a method per colour up to ten, then around again).
COLORS = ("#7f7f7f", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22",
          "#17becf")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(backend: str) -> dict:
    """Where and with what the numbers were measured."""
    import torch

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    return {
        "cpu": _cpu_model(), "logical_cores": os.cpu_count(), "usable_cores": usable,
        "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__, "onnxruntime": _version("onnxruntime"),
        "numpy": _version("numpy"), "hass_deploy": _version("hass-deploy"), "backend": backend,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _number(value: float | None, digits: int = 2, suffix: str = "") -> str:
    return "–" if value is None else f"{value:.{digits}f}{suffix}"


def _identical(summary: MethodSummary) -> str:
    if summary.identical is None:
        return "–" if summary.method == PLAIN else "not checked (sampling)"
    return "yes" if summary.identical else f"**NO** ({len(summary.mismatched)} differ)"


def _draft_share(report: BenchReport) -> str:
    summary = report.summaries[OVERALL][HYBRID]
    return f"{summary.draft_rounds / summary.rounds:.0%}" if summary.rounds else "none"


def render_markdown(report: BenchReport) -> str:
    """The summary tables, the settings and the machine, as Markdown."""
    c, m = report.config, report.machine
    tree = report.tree
    lines = [
        "# hass-deploy bench", "",
        f"{'**' + report.lossless_line() + '**' if report.lossless is False else report.lossless_line()}", "",
        f"- target: `{report.sources['target']}`; backend {c.runtime.backend}, {c.runtime.dtype}",
        *[f"- {method.key}: {method.label}" + (f", `{method.path}`" if method.path else "") for method in report.methods],
        f"- tree: tokens {tree.tokens}, depth {tree.depth}, top-k {tree.top_k}"
        + (" (chosen by `--tree auto`)" if report.tree_choice else ""),
        *([] if c.lookup is None else [
            f"- prompt lookup: tokens {c.lookup.tokens}, depth {c.lookup.depth}, n-grams {c.lookup.min_ngram}.."
            f"{c.lookup.max_ngram} (counts of the prompt and output so far), {c.lookup.branches} branches per node, "
            "no draft model"]),
        *([] if report.hybrid is None else [
            f"- hybrid: the draft's and prompt lookup's candidates reranked into one tree of {report.hybrid.tokens} "
            f"nodes; the draft ran in {_draft_share(report)} of rounds (draft cost {report.hybrid.draft_cost:g}, "
            f"{report.hybrid.row_cost:g} a context row, in verify steps)"]),
        f"- {c.max_new_tokens} new tokens max, temperature {c.sampling.temperature:g}, {c.warmup} warm-up runs per "
        f"method, methods alternating per prompt; prompts encoded by {report.prompt_encoding}"
        + (f"; {report.truncated_prompts} prompts cut from the left to fit the KV cache" if report.truncated_prompts else ""),
        f"- machine: {m['cpu']}, {m['usable_cores']} cores, torch {m['torch']} ({m['torch_threads']} threads)"
        + (f", onnxruntime {m['onnxruntime']}" if m.get("onnxruntime") else "") + f"; {m['date']}",
        "",
        "τ: the paper's macro average over prompts of mean(accepted + 1) per round. tok/s: per prompt, new tokens / "
        "wall time (prefill included); median [Q1–Q3] over prompts. Speedup: mean spec tok/s ÷ mean plain tok/s "
        "(the paper's), and the median of per-prompt ratios.", "",
        "| prompt set | method | prompts | τ | tok/s median [IQR] | speedup (ratio of means) | speedup (median ratio) "
        "| greedy identical |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, by_method in report.summaries.items():
        for key, s in by_method.items():
            t = s.tokens_per_s
            set_name = f"**{name}**" if name == OVERALL else name
            lines.append(f"| {set_name} | {report.label(key)} | {s.prompts} | {_number(s.tau)} | "
                         f"{t.median:.1f} [{t.q1:.1f}–{t.q3:.1f}] | {_number(s.speedup, suffix='×')} | "
                         f"{_number(s.speedup_median, suffix='×')} | {_identical(s)} |")
    overall = {k: s for k, s in report.summaries[OVERALL].items() if k != PLAIN}
    depth = max((len(s.depth_acceptance) for s in overall.values()), default=0)
    if depth:
        lines += ["", "Per-depth acceptance (all prompts): accepted at depth d ÷ rounds that tried depth d with "
                  "every shallower token accepted; rounds tried in parentheses.", "",
                  "| method | " + " | ".join(f"d{d + 1}" for d in range(depth)) + " |",
                  "|---|" + "---:|" * depth]
        for key, s in overall.items():
            cells = [f"{s.depth_acceptance[d]:.2f} ({s.depth_attempts[d]})" if d < len(s.depth_acceptance) else "–"
                     for d in range(depth)]
            lines.append(f"| {report.label(key)} | " + " | ".join(cells) + " |")
    if report.tree_choice is not None:
        lines += _auto_section(report)
    return "\n".join(lines) + "\n"


def _auto_section(report: BenchReport) -> list[str]:
    choice, outcome = report.tree_choice, report.auto_outcome
    curve = choice.curve
    lines = ["", "## `--tree auto`", "",
             f"Chose tokens {choice.tree.tokens}, depth {choice.tree.depth}, top-k {choice.tree.top_k} in "
             f"{choice.seconds:.0f} s from the cost curve below and tau measured on {len(choice.calibration_prompts)} "
             f"calibration prompts ({', '.join(choice.calibration_prompts)}"
             + ("; they are also benchmarked" if choice.calibration_overlaps_bench else "") + ")."
             + (f" The choice is the grid's largest {' and '.join(choice.at_grid_edge)}: a larger tree might be "
                "faster still." if choice.at_grid_edge else ""),
             f"Per-round correction to the cost curve's steps (the loop's own work, and in-loop against isolated "
             f"step time), fitted on the calibration runs: {choice.overhead.base_ms:+.2f} ms "
             f"{choice.overhead.per_level_ms:+.2f} ms per draft level; plain decoding {choice.overhead.plain_ms:+.2f} ms.",
             ""]
    if outcome is not None:
        lines += ["| | predicted tok/s | measured tok/s (mean over prompts) |", "|---|---:|---:|",
                  f"| {report.label(report.drafts[0])} | {outcome.predicted_tokens_per_s:.1f} (with the bench's τ: "
                  f"{outcome.predicted_with_bench_tau:.1f}) | {outcome.measured_tokens_per_s:.1f} (runtime "
                  f"efficiency {outcome.efficiency:.2f}) |",
                  f"| plain decoding | {outcome.predicted_plain_tokens_per_s:.1f} | "
                  f"{outcome.measured_plain_tokens_per_s:.1f} |", ""]
    lines += ["| tokens | depth | top-k | τ (calibration) | prompts | round ms | predicted tok/s |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    for cand in choice.finalists:
        lines.append(f"| {cand.tree.tokens} | {cand.tree.depth} | {cand.tree.top_k} | {cand.tau:.2f} | {cand.prompts} | "
                     f"{cand.round_ms:.2f} | {cand.predicted_tokens_per_s:.1f} |")
    lines += ["", f"Cost curve at a {curve.context}-token context (median ms of {curve.repeats} interleaved repeats; "
              f"prefill of {curve.context} tokens: target {curve.prefill_ms:.1f} ms, draft {curve.draft_prefill_ms:.1f} ms):", "",
              "| rows | " + " | ".join(str(t) for t, _ in curve.target_ms) + " |",
              "|---|" + "---:|" * len(curve.target_ms),
              "| target step | " + " | ".join(f"{ms:.2f}" for _, ms in curve.target_ms) + " |"]
    if curve.draft_ms:
        lines += ["", "| rows | " + " | ".join(str(r) for r, _ in curve.draft_ms) + " |",
                  "|---|" + "---:|" * len(curve.draft_ms),
                  "| draft step | " + " | ".join(f"{ms:.2f}" for _, ms in curve.draft_ms) + " |"]
    return lines


def _legend_columns(entries: int) -> int:
    return min(entries, 2 if entries <= 4 else 3)


def _headroom(entries: int) -> float:
    """The factor on a bar panel's height that leaves its legend room: 1.2 for one row of labels, 1.35 for two."""
    rows = -(-entries // _legend_columns(entries)) if entries else 1
    return 1.2 if rows == 1 else 1.15 + 0.1 * rows


def render_png(report: BenchReport, path: Path) -> None:
    """Three panels: per-depth acceptance of each draft (and prompt lookup); tok/s per prompt set and method
    (median, IQR bars); speedup over plain decoding per prompt set and speculative method (the paper's ratio of
    means)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = [m.key for m in report.methods]
    drafts = [k for k in keys if k != PLAIN]
    groups = list(report.summaries)
    colors = dict(zip(keys, itertools.cycle(COLORS)))
    figure = Figure(figsize=(15, 4.6), layout="constrained")
    FigureCanvasAgg(figure)
    ax_depth, ax_speed, ax_ratio = figure.subplots(1, 3, width_ratios=(1, 1.4, 1.2))

    for key in drafts:
        s = report.summaries[OVERALL][key]
        depths = list(range(1, len(s.depth_acceptance) + 1))
        ax_depth.plot(depths, s.depth_acceptance, marker="o", color=colors[key],
                      label=f"{report.label(key)}, τ = {_number(s.tau)}")
    # Prompt lookup's trees may be deeper than the draft's.
    deepest = max([report.tree.depth] + [len(report.summaries[OVERALL][key].depth_acceptance) for key in drafts])
    ax_depth.set(title="Acceptance per depth (conditional, all prompts)", xlabel="draft depth d",
                 ylabel="accepted at d / tried at d", ylim=(-0.02, 1.05), xlim=(0.5, deepest + 0.5))
    ax_depth.set_xticks(range(1, deepest + 1))
    ax_depth.grid(alpha=0.3)
    ax_depth.legend(fontsize=8, loc="best")

    width = 0.8 / len(keys)
    positions = range(len(groups))
    for i, key in enumerate(keys):
        stats = [report.summaries[g][key].tokens_per_s for g in groups]
        xs = [p + (i - (len(keys) - 1) / 2) * width for p in positions]
        medians = [t.median for t in stats]
        errors = [[t.median - t.q1 for t in stats], [t.q3 - t.median for t in stats]]
        ax_speed.bar(xs, medians, width, yerr=errors, capsize=3, color=colors[key], label=report.label(key))
    ax_speed.set(title=f"Tokens/s per prompt (median, IQR) — {report.config.runtime.backend}", ylabel="tokens/s")
    ax_speed.set_xticks(list(positions), groups, rotation=20, ha="right")
    ax_speed.grid(axis="y", alpha=0.3)
    # Headroom for the legend: a tenth of the panel per row of labels, two or three to a row.
    ax_speed.set_ylim(0, ax_speed.get_ylim()[1] * _headroom(len(keys)))
    ax_speed.legend(fontsize=8, loc="upper left", ncols=_legend_columns(len(keys)))

    width = 0.8 / max(len(drafts), 1)
    highest = 1.0
    for i, key in enumerate(drafts):
        values = [report.summaries[g][key].speedup or 0.0 for g in groups]
        xs = [p + (i - (len(drafts) - 1) / 2) * width for p in positions]
        highest = max(highest, *values)
        bars = ax_ratio.bar(xs, values, width, color=colors[key], label=report.label(key))
        ax_ratio.bar_label(bars, fmt="%.2f×", fontsize=7)
    ax_ratio.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax_ratio.set(title="Speedup over plain decoding (ratio of mean tok/s)", ylabel="×",
                 ylim=(0, highest * (0.1 + _headroom(len(drafts)))))
    ax_ratio.set_xticks(list(positions), groups, rotation=20, ha="right")
    ax_ratio.grid(axis="y", alpha=0.3)
    ax_ratio.legend(fontsize=8, loc="upper left", ncols=_legend_columns(len(drafts)))
    lossless = report.lossless
    verdict = {True: "greedy outputs identical to plain decoding", False: "LOSSLESS CHECK FAILED",
               None: "sampling: identity not checked"}[lossless]
    figure.suptitle(f"{Path(report.sources['target']).name}: tree {report.tree.tokens}/{report.tree.depth}/"
                    f"{report.tree.top_k} (tokens/depth/top-k), T = {report.config.sampling.temperature:g} — {verdict}",
                    color="red" if lossless is False else "black")
    figure.savefig(path, dpi=110)


def write_report(report: BenchReport, out: str | Path) -> dict[str, Path]:
    """Write bench.json, bench.md and bench.png into `out` (created if needed)."""
    out = check_output_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "bench.json", "markdown": out / "bench.md", "png": out / "bench.png"}
    paths["json"].write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    paths["markdown"].write_text(render_markdown(report))
    render_png(report, paths["png"])
    return paths
