"""`make bench`: benchmarks (a)-(d) of the issue in one run, on one workload.

(a)-(c) come from bench_engine (transformers one at a time, transformers
static batches, our engine in process); (d) is the same workload served
through tritonserver (benchmarks/served.py) at 1, 8, 32 and 64 clients.
Writes benchmarks/results/latest.json and the figures in docs/benchmarks.md;
the targets are ratios of rows measured in this same run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import signal
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from benchmarks import bench_engine
from benchmarks.served import bench_served
from trillm.demo_model import build_demo_model
from trillm.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
SERVED_CONCURRENCY = (1, 8, 32, 64)
# The OpenAI API's rows (the same workload through trillm.openai): its TTFT cost alone, and its throughput loaded.
OPENAI_CONCURRENCY = (1, 32)


def served_workloads(config: bench_engine.BenchConfig, vocab_size: int,
                     concurrencies: tuple[int, ...] = SERVED_CONCURRENCY) -> dict[int, list[tuple[str, int]]]:
    """The engine's workload as text: each concurrency gets max(2c, engine_requests) requests
    (the first of the same fixed-seed list), c=1 as many as the engine's batch-1 row.

    Served prompts are the engine's token ids decoded to text; re-encoding may merge or split a
    few tokens, so their lengths match the engine's only approximately."""
    tok = load_tokenizer(config.checkpoint)
    n = max(2 * max(concurrencies), config.engine_requests)
    items = bench_engine.make_workload(n, config, vocab_size)
    text = [(tok.decode(w.prompt_ids), w.max_tokens) for w in items]
    return {c: text[: (config.batch1_requests if c == 1 else max(2 * c, config.engine_requests))] for c in concurrencies}


def ratios(rows: dict[str, dict], roofline: dict) -> dict:
    def tok_s(name: str) -> float | None:
        return rows[name]["output_tok_s"] if name in rows else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    static = next((n for n in rows if n.startswith("hf_generate_static_batch")), None)
    served32, engine32, lone = rows.get("served_c32"), rows.get("trillm_engine_c32"), rows.get("served_c1")
    return {
        "served32_vs_hf_sequential": ratio(tok_s("served_c32"), tok_s("hf_generate_sequential")),
        "served32_vs_hf_static": ratio(tok_s("served_c32"), tok_s(static) if static else None),
        "engine32_vs_hf_static": ratio(tok_s("trillm_engine_c32"), tok_s(static) if static else None),
        "served32_vs_engine32": ratio(served32 and served32["output_tok_s"], engine32 and engine32["output_tok_s"]),
        "batch1_fraction_of_roofline": roofline.get("fraction_of_roofline"),
        "served32_ttft_p99_vs_lone_ttft": ttft_vs_lone(served32, lone, steady=True),
        "served32_burst_ttft_p99_vs_lone_ttft": ttft_vs_lone(served32, lone, steady=False),
        "openai32_vs_served32": ratio(tok_s("openai_c32"), tok_s("served_c32")),
        "openai1_ttft_p50_overhead_ms": ttft_overhead_ms(rows.get("openai_c1"), lone),
    }


def ttft_overhead_ms(openai: dict | None, grpc: dict | None) -> float | None:
    """What the OpenAI API adds to a lone request's TTFT p50 (ms), against gRPC on the same workload."""
    if not openai or not grpc:
        return None
    return (openai["ttft_p50_s"] - grpc["ttft_p50_s"]) * 1e3


def ttft_vs_lone(loaded: dict | None, lone: dict | None, steady: bool) -> float | None:
    """p99 over ``loaded``'s requests of TTFT / (a lone request's TTFT at the same prompt length).

    A lone request's TTFT is a straight line in the prompt length (prefill is linear in it at these
    lengths), fitted to the lone (c=1) requests; ``steady`` leaves out the first wave.
    """
    if not loaded or not lone or len(lone.get("per_request", [])) < 2:
        return None
    xs = [r["input_tokens"] for r in lone["per_request"]]
    slope, intercept = np.polyfit(xs, [r["ttft_s"] for r in lone["per_request"]], 1)
    ratios_ = [r["ttft_s"] / max(intercept + slope * r["input_tokens"], 1e-6)
               for r in loaded["per_request"] if not (steady and r["first_wave"])]
    return float(np.percentile(ratios_, 99)) if ratios_ else None


TARGETS = [
    ("served32_vs_hf_sequential", ">= 10x", 10.0),
    ("served32_vs_hf_static", ">= 1.5x", 1.5),
    ("served32_vs_engine32", ">= 0.85x", 0.85),
    ("batch1_fraction_of_roofline", ">= 0.60", 0.60),
    ("served32_ttft_p99_vs_lone_ttft", "<= 3x", -3.0),
    ("openai32_vs_served32", ">= 0.9x", 0.9),
    ("openai1_ttft_p50_overhead_ms", "<= 10 ms", -10.0),
]


def cpu_line(machine: dict) -> str:
    """The facts that select kernels, for the header of every table of figures."""
    cpu = machine.get("cpu")
    if not cpu:
        return machine["processor"]
    l3 = f"{cpu['l3_bytes'] >> 20} MiB L3" if cpu["l3_bytes"] else "L3 unknown"
    return (f"{cpu['model_name']}, torch capability {cpu['torch_capability']}, "
            f"ISA {' '.join(cpu['flags']) or 'baseline x86-64'}, {l3}, {cpu['threads']} torch threads")


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        "# Benchmarks",
        "",
        "Written by `make bench` (`python -m benchmarks.run`); every figure below is from one run,",
        f"on {results['date']}: {m['cpus']} CPUs ({m['processor']}), torch {m['torch']} with "
        f"{m['torch_threads']} threads, Python {m['python']}; demo model (56M parameters, float32).",
        f"CPU: {cpu_line(m)}.",
        f"Memory bandwidth ({results['memory_bandwidth']['buffer_mib']} MiB buffers, larger than the L3): "
        f"copy {results['memory_bandwidth']['copy_gb_s']:.1f} GB/s, read {results['memory_bandwidth']['read_gb_s']:.1f} GB/s.",
        "",
        "Workload: fixed seed, prompts of 32-512 tokens, max_tokens 64-256 (no early stop: the demo model",
        "never emits its end token). Served rows: gRPC streaming to `ensemble`, ITL measured between",
        "streamed text pieces. openai rows: the same workload, right after the gRPC row of the same",
        "clients, through the OpenAI-compatible API (streamed `/v1/completions`, trillm.openai).",
        "",
        "TTFT p99 steady: the requests after the first wave (every client's first request leaves together).",
        "",
        "| configuration | clients | requests | output tok/s | TTFT p50 | TTFT p99 | TTFT p99 steady | ITL p50 | ITL p99 | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['name']} | {r['concurrency']} | {r['requests']} | {r['output_tok_s']:.1f} | "
            f"{r['ttft_p50_s']:.3f} s | {r['ttft_p99_s']:.3f} s | {r.get('ttft_steady_p99_s', float('nan')):.3f} s | "
            f"{r['itl_p50_s'] * 1e3:.1f} ms | "
            f"{r['itl_p99_s'] * 1e3:.1f} ms | {r['errors']} |"
        )
    roof = results.get("batch1_roofline", {})
    lines += ["", "Batch-1 decode: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                                 for k, v in roof.items()), "", "## Targets", "",
              "| ratio | target | measured | met |", "|---|---|---|---|"]
    for key, label, bound in TARGETS:
        value = results["ratios"].get(key)
        met = "n/a" if value is None else ("yes" if (value >= bound if bound > 0 else value <= -bound) else "**no**")
        shown = "n/a" if value is None else f"{value:.2f}"
        lines.append(f"| {key} | {label} | {shown} | {met} |")
    lines += ["", "Where a target is missed, docs/benchmarks.md's notes below say why (kept by hand).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=bench_engine.BenchConfig.engine_requests)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--engine-concurrency", type=int, nargs="+",
                        default=list(bench_engine.BenchConfig.engine_concurrencies))
    parser.add_argument("--served-concurrency", type=int, nargs="+", default=list(SERVED_CONCURRENCY))
    parser.add_argument("--openai-concurrency", type=int, nargs="*", default=list(OPENAI_CONCURRENCY),
                        help="served concurrencies that also get an OpenAI API row (none: skip them)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "latest.json")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the served benchmark's tritonserver is always stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    checkpoint = build_demo_model(ROOT / "build" / "demo-model")
    config = replace(bench_engine.BenchConfig(), checkpoint=checkpoint, engine_requests=args.requests,
                     skip_hf=args.skip_hf, engine_concurrencies=tuple(args.engine_concurrency))
    results = bench_engine.run(config)
    vocab = load_tokenizer(checkpoint).vocab_size
    print("served through tritonserver (ensemble, gRPC streaming; openai: the OpenAI API in front):", flush=True)
    for row in bench_served(checkpoint, served_workloads(config, vocab, tuple(args.served_concurrency)),
                            ROOT / "build" / "bench-serve", tuple(args.openai_concurrency)):
        row["name"] = f"{'served' if row['path'] == 'grpc' else 'openai'}_c{row['concurrency']}"
        results["rows"].append(row)
    results["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    results["ratios"] = ratios({r["name"]: r for r in results["rows"]}, results.get("batch1_roofline", {}))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str))
    notes = ""
    if args.doc.exists() and "\n## Notes" in args.doc.read_text():
        notes = args.doc.read_text()[args.doc.read_text().index("\n## Notes"):]
    args.doc.write_text(markdown(results) + notes)
    print(json.dumps(results["ratios"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
