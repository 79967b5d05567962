"""`hass-deploy serve` under load, measured from outside: a real server process per configuration, driven over
loopback by the load test (`hass_deploy.serving.loadtest`, what `hass-deploy bench-serve` runs).

    # throughput and latency at --parallel 1, 2, 4, speculation on and off (one server process each)
    python benchmarks/serve_load.py matrix --target T --draft D --artifacts A --prompts P --out OUT
    # a bounded soak: back-to-back load tests for --seconds, resident memory sampled after each
    python benchmarks/serve_load.py soak --target T --draft D --artifacts A --prompts P --seconds 300 --out OUT

Each server first serves one untimed warm-up batch (ORT run plans, staging buffers, allocator pools), then the
measured batch; its resident memory (VmRSS) is read after both. Resident memory per added slot is the slope of
RSS over --parallel. Results: OUT/matrix.json|md or OUT/soak.json|md.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from hass_deploy.serving.loadtest import LoadTestConfig, run_load_test


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class ServerProcess:
    """`hass-deploy serve` in a child process on a free port; stopped with SIGTERM (it must exit 0)."""

    def __init__(self, args, parallel: int, speculation: str):
        command = [sys.executable, "-m", "hass_deploy.cli", "serve", "--target", str(args.target), "--port", "0",
                   "--parallel", str(parallel), "--speculation", speculation, "--max-queue", "256",
                   "--served-model-name", "bench"]
        for flag, value in (("--draft", args.draft), ("--artifacts", args.artifacts),
                            ("--tree-tokens", args.tree_tokens), ("--tree-depth", args.tree_depth),
                            ("--tree-top-k", args.tree_top_k)):
            if value is not None:
                command += [flag, str(value)]
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        line = ""
        while " on http://" not in line:
            line = self.process.stderr.readline()
            if not line and self.process.poll() is not None:
                raise RuntimeError(f"the server exited ({self.process.returncode}) before it was ready")
        self.url = line.split(" on ")[1].split()[0]

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(120)


def load(args, url: str, requests: int, seed: int = 0) -> dict:
    config = LoadTestConfig(url=url, num_requests=requests, concurrency=args.concurrency, max_tokens=args.max_tokens,
                            seed=seed, max_prompts=args.max_prompts)
    return run_load_test(config, args.prompts, progress=False)


def row(report: dict) -> dict:
    """The figures a table shows, from one load-test report."""
    spec = report["speculation"]
    return {"completed": report["completed"], "failed": report["failed"],
            "request_throughput": report["request_throughput"], "output_throughput": report["output_throughput"],
            **{f"{metric}_p{q}": report[f"{metric}_ms"][f"p{q}"] for metric in ("ttft", "tpot", "itl", "e2e")
               for q in (50, 90, 99)},
            "mean_acceptance_length": spec.get("mean_acceptance_length") if spec.get("available") else None}


def matrix(args) -> dict:
    runs = []
    for parallel in args.parallel:
        for speculation in ("draft", "off"):
            server = ServerProcess(args, parallel, speculation)
            try:
                load(args, server.url, args.concurrency)  # warm-up
                report = load(args, server.url, args.requests)
                rss = rss_mib(server.process.pid)
            finally:
                status = server.stop()
            runs.append({"parallel": parallel, "speculation": speculation, "rss_mib": rss, "exit_status": status,
                         **row(report)})
            print(json.dumps(runs[-1]), file=sys.stderr)
    return {"kind": "matrix", "runs": runs, "per_slot_rss_mib": _slope(runs)}


def _slope(runs: list[dict]) -> float | None:
    """Least-squares MiB of resident memory per added slot (speculation on)."""
    points = [(r["parallel"], r["rss_mib"]) for r in runs if r["speculation"] == "draft"]
    if len(points) < 2:
        return None
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)


def soak(args) -> dict:
    server = ServerProcess(args, args.parallel[-1], "draft")
    batches = []
    try:
        start = time.perf_counter()
        while time.perf_counter() - start < args.seconds:
            report = load(args, server.url, args.requests, seed=len(batches))
            batches.append({"t_s": time.perf_counter() - start, "rss_mib": rss_mib(server.process.pid),
                            **row(report)})
            print(json.dumps(batches[-1]), file=sys.stderr)
    finally:
        status = server.stop()
    after_warmup = [b["rss_mib"] for b in batches[1:]] or [batches[0]["rss_mib"]]
    return {"kind": "soak", "parallel": args.parallel[-1], "seconds": batches[-1]["t_s"], "batches": batches,
            "requests": sum(b["completed"] + b["failed"] for b in batches),
            "completed": sum(b["completed"] for b in batches), "failed": sum(b["failed"] for b in batches),
            "rss_first_mib": batches[0]["rss_mib"], "rss_after_warmup_min_mib": min(after_warmup),
            "rss_after_warmup_max_mib": max(after_warmup), "exit_status": status}


def markdown(result: dict) -> str:
    if result["kind"] == "soak":
        return (f"soak: --parallel {result['parallel']}, {result['seconds']:.0f} s, {result['requests']} requests, "
                f"{result['completed']} completed, {result['failed']} failed; RSS {result['rss_first_mib']:.0f} MiB "
                f"after the first batch, {result['rss_after_warmup_min_mib']:.0f}-"
                f"{result['rss_after_warmup_max_mib']:.0f} MiB after; exit status {result['exit_status']}\n")
    lines = ["| parallel | speculation | req/s | out tok/s | TTFT p50/p90/p99 ms | TPOT p50/p90 ms | ITL p50/p99 ms | "
             "E2E p50/p90/p99 ms | tau | RSS MiB | failed |", "|" + "---|" * 11]
    for r in result["runs"]:
        tau = "-" if r["mean_acceptance_length"] is None else f"{r['mean_acceptance_length']:.2f}"
        lines.append(f"| {r['parallel']} | {r['speculation']} | {r['request_throughput']:.2f} | "
                     f"{r['output_throughput']:.0f} | {r['ttft_p50']:.0f}/{r['ttft_p90']:.0f}/{r['ttft_p99']:.0f} | "
                     f"{r['tpot_p50']:.2f}/{r['tpot_p90']:.2f} | {r['itl_p50']:.2f}/{r['itl_p99']:.2f} | "
                     f"{r['e2e_p50']:.0f}/{r['e2e_p90']:.0f}/{r['e2e_p99']:.0f} | {tau} | {r['rss_mib']:.0f} | "
                     f"{r['failed']} |")
    slope = result["per_slot_rss_mib"]
    lines.append("" if slope is None else f"\nresident memory per added slot: {slope:.1f} MiB")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("matrix", "soak"))
    parser.add_argument("--target", type=Path, required=True)
    parser.add_argument("--draft", type=Path)
    parser.add_argument("--artifacts", type=Path)
    parser.add_argument("--prompts", type=Path, action="append", required=True)
    parser.add_argument("--max-prompts", type=int)
    parser.add_argument("--parallel", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--requests", type=int, default=32, help="measured requests per server (per soak batch)")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--tree-tokens", type=int)
    parser.add_argument("--tree-depth", type=int)
    parser.add_argument("--tree-top-k", type=int)
    parser.add_argument("--seconds", type=float, default=300.0, help="soak: how long")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    result = matrix(args) if args.mode == "matrix" else soak(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.mode}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{args.mode}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
