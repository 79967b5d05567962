"""The prepared GPU check: everything this project can verify on one CUDA machine, in one go, with one summary.

    pip install --no-deps --no-build-isolation -e .      # on the GPU machine (CUDA torch is there already)
    benchmarks/gpu_check.sh OUT                           # = python benchmarks/gpu_check.py --out OUT

Stages (each is timed and recorded as ok / failed / skipped; a failure does not stop the next stage, and a
stage is skipped when the time budget cannot cover it):

1. env: torch, CUDA, the GPU's name and compute capability, which optional engines import (TensorRT,
   onnxruntime providers).
2. gpu-tests: the test suite's GPU-marked tests (`pytest -m gpu`).
3. quickstart: the demo target and both drafts trained from scratch on the GPU, data extracted there
   (`hass-deploy quickstart --device cuda`: the training path of the training issue too); export, validation and
   the benchmark run on ONNX Runtime's CPU provider, as everywhere.
4. identity: greedy speculative against plain decoding on the GPU with the torch backend, token for token in fp32,
   with its steps captured as CUDA graphs (the default) and eager (`--no-cuda-graphs`), which must also agree with
   each other; tokens/s of both (the demo target is small enough to be bound by kernel launches). In bf16 the share
   of identical outputs is reported (a T-row verify and a 1-row step may round differently).
5. training: the command-line training path on the GPU, short: `hass-deploy data --device cuda` over part of the
   quickstart's draft text (the target in bf16, `--compute-dtype auto`), two epochs of `hass-deploy train --recipe
   hass --device cuda --precision bf16` (bf16 autocast over fp32 weights), then the new draft against plain
   decoding as in `identity` (fp32, token for token).
6. widen: the quickstart's target and drafts widened to a 7 B-class shape (`hass-deploy widen --dtype bf16`).
7. bench-wide: plain vs EAGLE-2 vs HASS (and prompt lookup) on the widened target, torch CUDA backend (CUDA graphs),
   bf16, the paper's tree (60 nodes, depth 6, top-k 10): tokens/s, tau, speedup. The goal is >= 2.5x for HASS.
8. tensorrt: where TensorRT imports, `hass-deploy export --engine trt` of the quickstart's target and HASS draft and
   a `bench --backend tensorrt` of them (plain vs HASS, lossless check); skipped, saying so, where it does not.

OUT/gpu_check.json and OUT/gpu_check.md hold the results; OUT/logs/ each stage's output. `--device cpu` with a
small preset and shape runs the same script on a CPU (what the project's own test of this script does).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent


class Skipped(Exception):
    """A stage that cannot run on this machine (not a failure)."""


class Check:
    """Runs the stages in order under a time budget and records each one."""

    def __init__(self, out: Path, budget_s: float):
        self.out, self.budget_s, self.start = out, budget_s, time.monotonic()
        self.stages: list[dict] = []
        (out / "logs").mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def stage(self, name: str, needs_s: float, work) -> dict:
        """Run `work()` (a dict of results) unless less than `needs_s` seconds of the budget are left."""
        record: dict = {"stage": name}
        if self.left() < needs_s:
            record.update(status="skipped", reason=f"{self.left():.0f} s of the budget left, needs about {needs_s:.0f}")
        else:
            begin = time.monotonic()
            try:
                record.update(status="ok", **work())
            except Skipped as why:
                record.update(status="skipped", reason=str(why))
            except Exception as err:  # recorded, and the next stage still runs
                record.update(status="failed", error=f"{type(err).__name__}: {err}"[-2000:])
            record["seconds"] = round(time.monotonic() - begin, 1)
        self.stages.append(record)
        print(json.dumps(record, default=str), file=sys.stderr, flush=True)
        return record

    def run(self, name: str, command: list[str], timeout_s: float | None = None, env: dict | None = None) -> str:
        """A command of the stage, its output logged; raises with the output's tail when it fails."""
        log = self.out / "logs" / f"{name}.log"
        timeout_s = max(10.0, min(timeout_s or self.left(), self.left()))
        with log.open("a") as handle:
            handle.write(f"$ {' '.join(command)}\n")
            handle.flush()
            try:
                done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout_s,
                                      env={**os.environ, **(env or {})})
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"timed out after {timeout_s:.0f} s: {' '.join(command)}") from None
        text = log.read_text()
        if done.returncode != 0:
            raise RuntimeError(f"exit {done.returncode}: {' '.join(command[:4])} ...\n" + text[-1500:])
        return text


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "hass_deploy.cli", *args]


def env_stage(device: str) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("this torch sees no CUDA device")
        index = torch.device(device).index or 0
        info["gpu"] = torch.cuda.get_device_name(index)
        info["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability(index)))
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(index).total_memory / 2**30, 1)
    for module in ("tensorrt", "onnxruntime"):
        try:
            imported = __import__(module)
            info[module] = getattr(imported, "__version__", "?")
        except ImportError:
            info[module] = None
    if info["onnxruntime"]:
        import onnxruntime

        info["onnxruntime_providers"] = onnxruntime.get_available_providers()
    return info


# (label, dtype, CUDA graphs): fp32 with and without graphs must give one output; bf16 is reported.
VARIANTS = (("fp32", "fp32", True), ("fp32-eager", "fp32", False), ("bf16", "bf16", True))


def identity_stage(workdir: Path, device: str, prompts: int, new_tokens: int, draft: str | None = None,
                   variants: tuple[tuple[str, str, bool], ...] = VARIANTS) -> dict:
    """Speculative vs plain greedy decoding with the torch backend on `device`: fp32 must be identical, with and
    without CUDA graphs, and the two must agree.

    The quickstart's target, prompts and tree; its HASS draft unless `draft` names another one.
    """
    import torch

    from hass_deploy.bench.runner import load_prompt_sets
    from hass_deploy.config import GenerationConfig, RuntimeConfig, TreeConfig
    from hass_deploy.generation import Pipeline
    from hass_deploy.runtime.decoder import SpeculativeDecoder

    summary = json.loads((workdir / "summary.json").read_text())
    paths, tree = summary["artifacts"], summary["bench"]["tree"]
    texts = [p.text for s in load_prompt_sets([paths["prompts"][0]], prompts) for p in s.prompts]
    result, outputs_by = {}, {}
    for label, dtype, cuda_graphs in variants:
        config = GenerationConfig(max_new_tokens=new_tokens, tree=TreeConfig(**tree))  # the quickstart's own tree
        runtime = RuntimeConfig(device=device, dtype=dtype, cuda_graphs=cuda_graphs)
        pipe = Pipeline.load(paths["target"], draft or paths["draft_hass"], runtime, config)
        plain = SpeculativeDecoder(pipe.decoder.target, None)
        same, spent, tokens, taus = 0, {"plain": 0.0, "hass": 0.0}, 0, []
        for text in texts:
            ids = pipe.encode(text, chat=False)[-512:]
            outputs = {}
            for name, decoder in (("plain", plain), ("hass", pipe.decoder)):
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                begin = time.perf_counter()
                outputs[name] = decoder.generate(ids, config)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                spent[name] += time.perf_counter() - begin
            same += outputs["plain"].output_ids == outputs["hass"].output_ids
            tokens += len(outputs["plain"].output_ids)
            taus.append(outputs["hass"].tau)
            outputs_by.setdefault(label, []).append(outputs["plain"].output_ids)
        result[label] = {"identical": f"{same}/{len(texts)}", "tau": round(sum(taus) / len(taus), 3),
                         "plain_tok_s": round(tokens / spent["plain"], 1), "hass_tok_s": round(tokens / spent["hass"], 1)}
        del pipe, plain
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    for label in ("fp32", "fp32-eager"):
        if label in result and not result[label]["identical"].startswith(f"{len(texts)}/"):
            raise RuntimeError(f"{label}: speculative decoding differs from plain decoding: {result}")
    if "fp32-eager" in outputs_by and outputs_by["fp32-eager"] != outputs_by["fp32"]:
        raise RuntimeError(f"fp32 output with CUDA graphs differs from eager steps: {result}")
    return result


def training_stage(check: Check, workdir: Path, out: Path, device: str, records: int, prompts: int,
                   new_tokens: int) -> dict:
    """`hass-deploy data` and a two-epoch HASS `hass-deploy train` on `device`, then the new draft's identity."""
    target = json.loads((workdir / "summary.json").read_text())["artifacts"]["target"]
    data, draft = out / "training" / "data", out / "training" / "draft"
    check.run("training", cli("data", "--target", target, "--dataset", str(workdir / "corpus" / "draft_text.jsonl"),
                              "--format", "text", "--max-samples", str(records), "--max-length", "256",
                              "--eval-fraction", "0.1", "--device", device, "--out", str(data), "--force"))
    check.run("training", cli("train", "--target", target, "--data", str(data), "--out", str(draft), "--recipe",
                              "hass", "--epochs", "2", "--batch-size", "8", "--max-length", "256", "--precision",
                              "bf16", "--device", device, "--force"))
    manifest = json.loads((data / "manifest.json").read_text())
    metrics = json.loads((draft / "metrics.jsonl").read_text().splitlines()[-1])
    return {"compute_dtype": manifest["settings"]["compute_dtype"], "tokens": manifest["totals"]["train"]["tokens"],
            "eval_tau": round(metrics["eval_expected_tau"], 3),
            "identity": identity_stage(workdir, device, prompts, new_tokens, str(draft), VARIANTS[:1])["fp32"]}


def bench_summary(out: Path) -> dict:
    """Per method: median tokens/s, tau and speedup over plain decoding (bench.json's overall summary)."""
    report = json.loads((out / "bench.json").read_text())
    overall = report["summaries"]["overall"]
    methods = {name: {"tok_s": round(m["tokens_per_s"]["median"], 1), "tau": m["tau"] and round(m["tau"], 2),
                      "speedup": m["speedup_median"] and round(m["speedup_median"], 2), "identical": m["identical"]}
               for name, m in overall.items()}
    return {"tree": report.get("tree"), "lossless": report.get("lossless"), "methods": methods}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", default="default", help="the quickstart's preset")
    parser.add_argument("--wide", default="4224,11264,32", help="hidden,intermediate,layers of the widened target "
                        "(default ~6 B parameters; hidden a multiple of 192 keeps the demo's head_dim and GQA group)")
    parser.add_argument("--wide-dtype", default="bf16")
    parser.add_argument("--bench-dtype", default="bf16")
    parser.add_argument("--tree", default="60,6,10", help="tokens,depth,top_k for the widened benchmark")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--train-records", type=int, default=256, help="draft-text records of the training stage")
    parser.add_argument("--budget-s", type=float, default=480.0, help="the whole check's time budget")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    check = Check(out, args.budget_s)
    home = {"HASS_DEPLOY_HOME": str(out / "home")}  # an empty cache: the target is trained here
    workdir = out / "quickstart"

    environment = check.stage("env", 0, lambda: env_stage(args.device))
    check.stage("gpu-tests", 60, lambda: {"tail": check.run("gpu-tests", [
        sys.executable, "-m", "pytest", "-q", "-m", "gpu", str(HERE.parent / "tests")], 240).strip()[-300:]})

    def quickstart() -> dict:
        check.run("quickstart", cli("quickstart", "--preset", args.preset, "--workdir", str(workdir), "--device",
                                    args.device, "--no-progress"), env=home)
        summary = json.loads((workdir / "summary.json").read_text())
        return {"seconds_by_stage": summary.get("seconds_this_run"), "bench": {k: summary["bench"].get(k) for k in (
            "tree", "tau", "tokens_per_s", "speedup", "lossless_check")}}

    trained = check.stage("quickstart", 120, quickstart)
    ready = trained["status"] == "ok"
    check.stage("identity", 30, (lambda: identity_stage(workdir, args.device, args.prompts, args.new_tokens))
                if ready else (lambda: _needs("quickstart")))
    check.stage("training", 60, (lambda: training_stage(check, workdir, out, args.device, args.train_records,
                                                        args.prompts, args.new_tokens))
                if ready else (lambda: _needs("quickstart")))

    hidden, intermediate, layers = (int(x) for x in args.wide.split(","))
    wide = out / "wide"

    def widen() -> dict:
        paths = json.loads((workdir / "summary.json").read_text())["artifacts"]
        check.run("widen", cli("widen", "--target", paths["target"], "--draft", paths["draft_hass"], "--draft",
                               paths["draft_eagle2"], "--out", str(wide), "--hidden-size", str(hidden),
                               "--intermediate-size", str(intermediate), "--num-layers", str(layers), "--dtype",
                               args.wide_dtype, "--force"))
        size = sum(f.stat().st_size for f in (wide / "target").glob("*.safetensors"))
        return {"shape": [hidden, intermediate, layers], "dtype": args.wide_dtype, "gib": round(size / 2**30, 2)}

    widened = check.stage("widen", 60, widen if ready else (lambda: _needs("quickstart")))

    def bench_wide() -> dict:
        paths = json.loads((workdir / "summary.json").read_text())["artifacts"]
        tokens, depth, top_k = args.tree.split(",")
        bench_out = out / "bench-wide"
        try:
            check.run("bench-wide", cli(
                "bench", "--target", str(wide / "target"), "--draft", str(wide / "drafts" / "hass"),
                "--baseline-draft", str(wide / "drafts" / "eagle2"), "--prompts", paths["prompts"][0],
                "--max-prompts", str(args.prompts), "--max-new-tokens", str(args.new_tokens), "--backend", "torch",
                "--device", args.device, "--dtype", args.bench_dtype, "--tree-tokens", tokens, "--tree-depth", depth,
                "--tree-top-k", top_k, "--warmup", "1", "--out", str(bench_out)))
        except RuntimeError:
            if not (bench_out / "bench.json").exists():
                raise  # a bf16 output that differs from plain decoding still writes bench.json: read it
        return bench_summary(bench_out)

    check.stage("bench-wide", 90, bench_wide if widened["status"] == "ok" else (lambda: _needs("widen")))

    def tensorrt() -> dict:
        if not environment.get("tensorrt"):
            raise Skipped("TensorRT is not installed on this machine: its export and backend did not run")
        paths = json.loads((workdir / "summary.json").read_text())["artifacts"]
        engines, bench_out = out / "trt", out / "bench-trt"
        check.run("tensorrt", cli("export", "--engine", "trt", "--target", paths["target"], "--draft",
                                  paths["draft_hass"], "--out", str(engines), "--force"))
        check.run("tensorrt", cli(
            "bench", "--target", paths["target"], "--draft", paths["draft_hass"], "--prompts", paths["prompts"][0],
            "--max-prompts", str(args.prompts), "--max-new-tokens", str(args.new_tokens), "--backend", "tensorrt",
            "--artifacts", str(engines), "--device", args.device, "--no-lookup", "--warmup", "1", "--out",
            str(bench_out)))
        return {"tensorrt": environment["tensorrt"], **bench_summary(bench_out)}

    check.stage("tensorrt", 60, tensorrt if ready else (lambda: _needs("quickstart")))
    write_summary(out, check.stages, args)


def _needs(stage: str) -> dict:
    raise RuntimeError(f"needs the {stage} stage, which did not pass")


def write_summary(out: Path, stages: list[dict], args) -> None:
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "stages": stages}
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    lines = [f"# GPU check ({stages[0].get('gpu', args.device)}, {stages[0].get('date', '')})", "",
             "| stage | status | seconds | result |", "|---|---|---:|---|"]
    for stage in stages:
        detail = stage.get("error") or stage.get("reason") or json.dumps(
            {k: v for k, v in stage.items() if k not in ("stage", "status", "seconds")}, default=str)
        lines.append(f"| {stage['stage']} | {stage['status']} | {stage.get('seconds', '-')} | "
                     f"{detail.replace('|', '/').replace(chr(10), ' ')[:400]} |")
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
