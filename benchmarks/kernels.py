"""The engine's native kernels against its torch-only path, on one machine in one run (`make bench-kernels`).

For each configuration (a quantisation mode and a number of concurrent
decoding streams), two engines run the same workload in turn, each in its
own process: one with the native kernels (``TRILLM_NATIVE=1``: decode
attention in one call per layer, norm/RoPE/SiLU fused; trillm/engine/native.py)
and one without (``TRILLM_NATIVE=0``: SDPA per sequence, eager torch ops).

Two measures per engine:

- **CPU ms per step, one thread**: the engine runs with one torch thread and
  each step's CPU time is read with ``time.thread_time`` in the engine's own
  thread, for the steps where every stream decodes. CPU time does not grow
  when other processes share the cores, so this figure holds on a busy
  machine; it is the one to compare.
- **wall ITL p50, all threads**: what a stream sees, with the default thread
  count; noisy where other work runs.

The CPU model and ISA flags come with the figures. Run:

    python -m benchmarks.kernels [--checkpoint DIR] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CHECKPOINT = ROOT / "build" / "smollm2" / "SmolLM2-135M-Instruct"
RESULTS = ROOT / "benchmarks" / "results"
# (quantisation, streams): int4 at one stream is the batch-1 case of the quantisation issue;
# the float model (dtype auto) at 8 and 32 is the served-under-load case of the peers issue.
CONFIGS = (("int4", 1), ("none", 1), ("none", 8), ("none", 32))
PROMPT_TOKENS, OUTPUT_TOKENS = 100, 64


def one(args: argparse.Namespace) -> dict:
    """In the child: one engine, one configuration; prints a JSON row."""
    import torch

    from benchmarks.bench_engine import WorkItem, bench_engine
    from trillm.engine import EngineConfig, TorchEngine

    streams = args.streams
    row: dict = {"quantization": args.quantization, "streams": streams, "native": os.environ["TRILLM_NATIVE"] == "1"}
    default_threads = torch.get_num_threads()
    for threads, key in ((1, "cpu"), (default_threads, "wall")):  # num_threads sets torch's global count
        engine = TorchEngine(EngineConfig(checkpoint_dir=str(args.checkpoint), quantization=args.quantization,
                                          max_model_len=1024, max_num_seqs=max(streams, 8),
                                          enable_prefix_caching=False, num_threads=threads))
        try:
            step_cpu: list[float] = []
            run = engine.runner.run

            def timed(chunks, run=run, step_cpu=step_cpu):
                start = time.thread_time()
                out = run(chunks)
                if len(chunks) == streams and all(c.num_tokens == 1 for c in chunks):
                    step_cpu.append(time.thread_time() - start)
                return out

            engine.runner.run = timed
            bench_engine(engine, [WorkItem(list(range(6, 6 + PROMPT_TOKENS)), 8)], 1, name="warm-up")
            step_cpu.clear()
            # A distinct first token per request: no two prompts share a prefix.
            items = [WorkItem([5 + i] + list(range(6, 6 + PROMPT_TOKENS)), OUTPUT_TOKENS) for i in range(2 * streams)]
            result = bench_engine(engine, items, streams, name=key)
            if key == "cpu":
                step_cpu.sort()
                row["cpu_ms_per_step_p50"] = step_cpu[len(step_cpu) // 2] * 1e3 if step_cpu else None
                row["decode_attention"] = engine.kernels["decode_attention"]
                row["fused_row_ops"] = engine.kernels["fused_row_ops"]
                row["torch_threads_default"] = default_threads
            else:
                row["wall_itl_p50_ms"] = result["itl_p50_s"] * 1e3
                row["wall_output_tok_s"] = result["output_tok_s"]
        finally:
            engine.shutdown()
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--json", type=Path, default=RESULTS / "kernels-smollm2.json")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--quantization", default="none", help=argparse.SUPPRESS)
    parser.add_argument("--streams", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one(args)))
        return 0

    from benchmarks.run import cpu_line
    from trillm.engine.cpu import cpu_info

    rows = []
    for quantization, streams in CONFIGS:
        for native in ("0", "1"):
            cmd = [sys.executable, "-m", "benchmarks.kernels", "--one", "--checkpoint", str(args.checkpoint),
                   "--quantization", quantization, "--streams", str(streams)]
            env = {**os.environ, "TRILLM_NATIVE": native}
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{quantization:5s} {streams:3d} streams native={native}: {r['cpu_ms_per_step_p50']:.1f} CPU ms/step "
                  f"(1 thread, {r['decode_attention']}, fused {r['fused_row_ops']}); wall ITL p50 "
                  f"{r['wall_itl_p50_ms']:.1f} ms, {r['wall_output_tok_s']:.1f} tok/s", flush=True)
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    machine = {"cpu": cpu_info().as_dict(), "torch_threads": rows[0]["torch_threads_default"], "loadavg_end": load}
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine,
              "cpu_line": cpu_line({"cpu": machine["cpu"], "torch_threads": machine["torch_threads"],
                                    "cpus": os.cpu_count()}),
              "checkpoint": str(args.checkpoint), "workload": {"prompt_tokens": PROMPT_TOKENS,
                                                               "output_tokens": OUTPUT_TOKENS,
                                                               "requests_per_stream": 2},
              "rows": rows}
    pairs = {}
    for r in rows:
        pairs.setdefault((r["quantization"], r["streams"]), {})[r["native"]] = r
    report["speedups"] = [{"quantization": q, "streams": s,
                           "cpu_per_step": p[False]["cpu_ms_per_step_p50"] / p[True]["cpu_ms_per_step_p50"],
                           "wall_itl_p50": p[False]["wall_itl_p50_ms"] / p[True]["wall_itl_p50_ms"]}
                          for (q, s), p in pairs.items()]
    print(report["cpu_line"], "; load average at the end", " ".join(load))
    for sp in report["speedups"]:
        print(f"speed-up {sp['quantization']} x{sp['streams']}: CPU per step {sp['cpu_per_step']:.2f}x, "
              f"wall ITL p50 {sp['wall_itl_p50']:.2f}x")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    print("wrote", args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
