"""Batch-1 decode speed and resident memory of the engine for each quantisation mode.

Each mode runs in its own process (so its resident memory is its own): load
the engine, decode one request alone (``prompt`` tokens, then ``tokens``
generated), optionally a closed loop of ``concurrency`` clients; report
inter-token latency p50/p99, tok/s, the share of the weight-bytes roofline
(bytes the decode step reads / memory bandwidth, measured once with buffers
larger than the L3: benchmarks.bench_engine.memory_bandwidth) and VmRSS. The
roofline counts what a decode step reads (every quantised matrix, the scales,
the norms; the embedding table only by row), not the KV cache.

On a machine other jobs share, the figures are indicative; the CPU is in the
output. Run:

    python -m benchmarks.quant [--checkpoint DIR] [--modes none int8 int4] [--concurrency 32] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CHECKPOINT = ROOT / "build" / "smollm2" / "SmolLM2-135M-Instruct"
RESULTS = ROOT / "benchmarks" / "results"


def one_mode(args: argparse.Namespace) -> dict:
    """Runs in the child process: one engine, one mode."""
    import torch

    from benchmarks.bench_engine import BenchConfig, batch1_decode, bench_engine, make_workload
    from trillm.engine import EngineConfig, TorchEngine
    from trillm.engine.quant import resident_memory_bytes

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    engine = TorchEngine(EngineConfig(checkpoint_dir=str(args.checkpoint), dtype=args.dtype, quantization=args.one,
                                      quant_group_size=args.group_size, max_model_len=1024,
                                      max_num_seqs=max(args.concurrency, 8), enable_prefix_caching=False))
    load_s = time.perf_counter() - start
    try:
        rss_loaded = resident_memory_bytes()
        bench_engine(engine, make_workload(1, BenchConfig(output_tokens=(4, 4)), engine.vocab_size), 1, "warm-up")
        row = {"mode": args.one, "dtype": args.dtype, "group_size": args.group_size if args.one == "int4" else None,
               "load_s": load_s, "from_cache": engine.quantization["from_cache"],
               "kernel": engine.kernels["linear_kernel"], "batch_invariant": engine.kernels["batch_invariant"],
               "step_row_multiple": engine.kernels["step_row_multiple"],
               **batch1_decode(engine, args.bandwidth, prompt_len=args.prompt, tokens=args.tokens)}
        if args.concurrency > 1:
            config = BenchConfig(prompt_tokens=(32, 256), output_tokens=(32, 96))
            workload = make_workload(2 * args.concurrency, config, engine.vocab_size)
            batched = bench_engine(engine, workload, args.concurrency)
            row.update({f"c{args.concurrency}_output_tok_s": batched["output_tok_s"],
                        f"c{args.concurrency}_itl_p50_s": batched["itl_p50_s"]})
        row["rss_loaded_bytes"] = rss_loaded
        row["rss_after_bytes"] = resident_memory_bytes()
        return row
    finally:
        engine.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--modes", nargs="+", default=["none", "int8", "int4"])
    parser.add_argument("--group-size", type=int, default=32, help="int4 group size")
    parser.add_argument("--dtype", default="float32",
                        help="the engine's dtype (default float32, the issue's baseline; the quantised matmuls run in bf16)")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens of the batch-1 request")
    parser.add_argument("--tokens", type=int, default=128, help="tokens it generates")
    parser.add_argument("--concurrency", type=int, default=0, help="also a closed loop of this many clients")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help=f"default {RESULTS}/quant-<date>.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--bandwidth", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one_mode(args)))
        return 0

    from benchmarks.bench_engine import memory_bandwidth
    from trillm.engine.cpu import cpu_info

    bandwidth = memory_bandwidth()
    gb_s = max(bandwidth["copy_gb_s"], bandwidth["read_gb_s"])
    cpu = cpu_info()
    print(f"CPU: {cpu.summary()}\nmemory bandwidth {gb_s:.1f} GB/s ({bandwidth['buffer_mib']} MiB buffers)")
    rows = []
    for mode in args.modes:
        child = [sys.executable, "-m", "benchmarks.quant", "--one", mode, "--bandwidth", str(gb_s),
                 "--checkpoint", str(args.checkpoint), "--dtype", args.dtype, "--group-size", str(args.group_size),
                 "--prompt", str(args.prompt), "--tokens", str(args.tokens),
                 "--concurrency", str(args.concurrency), "--threads", str(args.threads)]
        done = subprocess.run(child, cwd=ROOT, capture_output=True, text=True)
        if done.returncode:  # one mode failing must not lose the others' figures
            rows.append({"mode": mode, "error": f"exit {done.returncode}: {done.stderr[-2000:]}"})
            print(f"{mode:<9} FAILED (exit {done.returncode}):\n{done.stderr[-2000:]}", flush=True)
            continue
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(format_row(row, args.concurrency), flush=True)
    result = {"cpu": cpu.as_dict(), "memory_bandwidth": bandwidth, "checkpoint": str(args.checkpoint),
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows}
    path = args.json or RESULTS / f"quant-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return 1 if any("error" in row for row in rows) else 0


def format_row(row: dict, concurrency: int = 0) -> str:
    label = row["mode"] + (f" g{row['group_size']}" if row["group_size"] else "")
    text = (f"{label:<9} ITL p50 {row['itl_p50_s'] * 1e3:6.1f} ms p99 {row['itl_p99_s'] * 1e3:6.1f} ms  "
            f"{row['decode_tok_s']:6.1f} tok/s  weights {row['weight_bytes'] / 1e6:6.1f} MB  "
            f"{100 * row['fraction_of_roofline']:5.0f}% of roofline  RSS {row['rss_after_bytes'] / 2**20:6.0f} MiB  "
            f"load {row['load_s']:.1f} s{' (cache)' if row['from_cache'] else ''}  "
            f"batch-invariant {row['batch_invariant']}")
    if concurrency > 1:
        text += f"  c{concurrency} {row[f'c{concurrency}_output_tok_s']:.1f} tok/s"
    return text


if __name__ == "__main__":
    sys.exit(main())
