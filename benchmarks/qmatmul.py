"""Per-matmul times of the quantised kernels (docs/benchmarks.md "Kernels, per matmul").

For each of a model's linear shapes (SmolLM2-135M's by default) at 1 and 32
rows: float32 oneDNN (prepacked, the unquantised engine's matmul), and for
int8 and int4 (group 32) aten's weight-only kernels (bfloat16 activations),
ours with float32 activations (``csrc/qmatmul.cpp``, "native") and ours with
int8 activations (``csrc/qmatmul_a8.cpp``, "native-a8"). Each kernel as built
for this CPU, and with ``--avx2`` also ours built without AVX-512 (their AVX2
paths, as an AVX2-only CPU would run them, though on this CPU's cores).

Wall microseconds per call, best of 7 rounds in which the kernels take turns,
all torch threads; the weights of one matrix stay cache-resident where they
fit, so this is each kernel's compute, not DRAM. Run:

    python -m benchmarks.qmatmul [--avx2] [--rows 1 32] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
# (name, out_features, in_features) of SmolLM2-135M-Instruct's linears.
SHAPES = (("qkv", 960, 576), ("gate_up", 3072, 576), ("down", 576, 1536), ("lm_head", 49152, 576))
ROUNDS = 7


def _best_us(fns: dict, calls: int) -> dict[str, float]:
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(ROUNDS):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            best[name] = min(best[name], (time.perf_counter() - start) / calls * 1e6)
    return best


def _avx2_builds(directory: Path):
    """qmatmul.cpp and qmatmul_a8.cpp built with -mno-avx512f (their AVX2 paths)."""
    import subprocess

    from trillm.engine import native

    built = []
    for name, kind in (("qmatmul.cpp", native.QMatmul), ("qmatmul_a8.cpp", native.QMatmulA8)):
        source = next(p for p in native.SOURCES if p.name == name)
        path = directory / f"lib{source.stem}_avx2.so"
        subprocess.run([native.compiler(), *native.FLAGS, *native.OPENMP_FLAGS, "-mno-avx512f", "-o", str(path),
                        str(source)], check=True, capture_output=True, timeout=native.BUILD_TIMEOUT_S)
        built.append(kind(path))
    return built


def measure(rows_list: list[int], avx2: bool) -> list[dict]:
    import torch

    from trillm.engine import native, quant
    from trillm.engine.linear import Linear

    kernels = {"": (native.load_qmatmul()[0], native.load_qmatmul_a8()[0])}
    if kernels[""][0] is None:
        raise SystemExit("native kernels unavailable here")
    tmp = tempfile.TemporaryDirectory()
    if avx2:
        kernels["avx2 "] = tuple(_avx2_builds(Path(tmp.name)))
    out = []
    generator = torch.Generator().manual_seed(0)
    for name, n, k in SHAPES:
        w = torch.randn(n, k, generator=generator) * 0.05
        q8, s8 = quant.quantize_int8(w)
        q4, sz = quant.quantize_int4(w, 32)
        fp32 = Linear(w)
        aten8 = quant.QuantLinear("int8", q8, s8, None, torch.float32, 0, kernel="aten")
        aten4 = quant.QuantLinear("int4", q4, sz, None, torch.float32, 32, kernel="aten")
        ours = {"int8": (q8.contiguous(), quant.pack_pairs(q8), s8.float().contiguous()),
                "int4": (quant.pack_blocks(q4), sz[..., 0].float().contiguous(), sz[..., 1].float().contiguous())}
        for rows in rows_list:
            x = torch.randn(rows, k, generator=generator)
            y = torch.empty(rows, n)
            fns = {"fp32 oneDNN": lambda: fp32(x), "int8 aten": lambda: aten8(x), "int4 aten": lambda: aten4(x)}
            for label, (qm, a8) in kernels.items():
                q8c, q8p, s8f = ours["int8"]
                packed, s4, z4 = ours["int4"]
                fns[f"int8 {label}native"] = lambda qm=qm: qm.int8(x, q8c, s8f, None, y)
                fns[f"int8 {label}native-a8"] = lambda a8=a8: a8.int8(x, q8p, s8f, None, y)
                fns[f"int4 {label}native"] = lambda qm=qm: qm.int4(x, packed, s4, z4, 32, None, y)
                fns[f"int4 {label}native-a8"] = lambda a8=a8: a8.int4(x, packed, s4, z4, 32, None, y)
            calls = max(1, int(2e7 // (n * k * max(1, rows // 4))))
            with torch.inference_mode():
                us = _best_us(fns, calls)
            out.append({"matmul": name, "out_features": n, "in_features": k, "rows": rows, "us": us})
            print(f"{name} {n}x{k} rows {rows}: " + ", ".join(f"{key} {v:.0f}" for key, v in us.items()), flush=True)
    tmp.cleanup()
    return out


def markdown(report: dict) -> str:
    rows = report["rows"]
    columns = list(rows[0]["us"])
    lines = [f"{report['date']}, {report['cpu_line']}; load average {' '.join(report['loadavg_end'])} at the end.",
             "", "| matmul | rows | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for r in rows:
        lines.append(f"| {r['matmul']} {r['out_features']}x{r['in_features']} | {r['rows']} | "
                     + " | ".join(f"{r['us'][c]:.0f}" for c in columns) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--avx2", action="store_true", help="also our kernels built without AVX-512")
    parser.add_argument("--json", type=Path, default=None, help=f"default {RESULTS}/qmatmul-<date>.json")
    args = parser.parse_args(argv)

    import torch

    from benchmarks.run import cpu_line
    from trillm.engine.cpu import cpu_info

    rows = measure(args.rows, args.avx2)
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    cpu = cpu_info().as_dict()
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": {"cpu": cpu},
              "cpu_line": cpu_line({"cpu": cpu, "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count()}),
              "loadavg_end": load, "unit": "wall microseconds per call, best of 7", "rows": rows}
    path = args.json or RESULTS / f"qmatmul-{time.strftime('%Y-%m-%d')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(markdown(report))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
