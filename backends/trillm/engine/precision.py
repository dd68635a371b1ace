"""Which dtype each part of the model computes in: ``dtype="auto"`` measures it on this CPU at load.

What auto decides, per matmul kind (``qkv``, ``o``, ``gate_up``, ``down``,
``lm_head``) and for the KV cache:

* No AMX or AVX512-BF16 (``CpuInfo.native_bf16`` false, e.g. an AVX2 EPYC):
  torch emulates bfloat16 through float32, which loses everywhere, so all
  float32 without measuring.
* Otherwise each matmul shape is timed at one row (a lone decode) and at a
  wide row count (a batch of decodes, a prefill chunk) with float32 and
  bfloat16 weights, both oneDNN-prepacked, and gets the dtype whose worse
  case is closer to the best (minimax: bfloat16 that is 1.3x slower alone
  and 5x faster wide wins). One dtype per shape for every row count:
  switching by row count would make a request's rounding depend on how
  many rows share its step. Measured on a Sapphire Rapids Xeon (AMX, one
  thread, SmolLM2-135M shapes): bfloat16 runs 3-6x faster at 64 rows, and
  0.8x-2.3x at one row.
* The KV cache: bfloat16 when one decode's attention over
  :data:`KV_PROBE_TOKENS` keys is faster in bfloat16 (it also halves the
  bytes read per step and the cache's memory).

The residual stream, norms, RoPE and embedding stay float32 under auto
(cheap, row-wise, and they carry the precision the matmuls round away); a
bfloat16 matmul rounds its input to bfloat16 and its output is promoted back
by the residual add. ``float32``/``bfloat16``/``float16`` mean that dtype for
everything, as requested.

The probe takes well under a second (a few matmuls per shape, best of
:data:`PROBE_REPEATS`) and is cached per shape and row count for the life of
the process. It runs on one thread and counts that thread's CPU time, so a
machine busy with other work does not decide it (wall time under contention
varied 10x between runs; the ratio of the two dtypes holds across thread
counts because both kernels split rows the same way).

bfloat16's kernels may not be row-invariant (oneDNN's AMX path serves more
than 32 rows, another path fewer, with different rounding): the engine's
probe (LlamaModel.probe_batch_invariance) then reports that a request's
output may depend on its batch, rather than pad every step past 32 rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from trillm.engine.checkpoint import TORCH_DTYPES, LlamaSpec
from trillm.engine.cpu import CpuInfo
from trillm.engine.linear import Linear, onednn_usable

MATMULS = ("qkv", "o", "gate_up", "down", "lm_head")
KV_PROBE_TOKENS = 256
PROBE_REPEATS = 3
# The wide row count timed: a batch of decodes, between 8-32 decoding streams and a 128-token prefill chunk.
WIDE_ROWS = 64


@dataclass(frozen=True)
class Precision:
    requested: str  # "auto" or the dtype asked for
    compute: torch.dtype  # residual stream, norms, RoPE, embedding
    linears: dict[str, str]  # per matmul kind (MATMULS): a dtype name, or the quantisation mode
    kv_cache: torch.dtype
    reason: str
    # auto's measurements: {kind: {"rows": [thin, wide], "float32": [ms, ms], "bfloat16": [ms, ms]}}
    timings_ms: dict = field(default_factory=dict)

    def linear_dtype(self, name: str) -> torch.dtype:
        """The dtype of the matmul named ``name`` ("layers.3.qkv", "lm_head")."""
        return TORCH_DTYPES[self.linears[name.rsplit(".", 1)[-1]]]

    def as_dict(self) -> dict:
        name = lambda d: str(d).removeprefix("torch.")  # noqa: E731
        return {"requested": self.requested, "compute": name(self.compute), "linears": dict(self.linears),
                "kv_cache": name(self.kv_cache), "reason": self.reason, "timings_ms": self.timings_ms}

    def summary(self) -> str:
        linears = ", ".join(f"{k} {v}" for k, v in self.linears.items())
        return (f"dtype {self.requested}: compute {str(self.compute).removeprefix('torch.')}; linears {linears}; "
                f"KV cache {str(self.kv_cache).removeprefix('torch.')} ({self.reason})")


def resolve_precision(requested: str, spec: LlamaSpec, cpu: CpuInfo, quantization: str = "none") -> Precision:
    """The precision for ``requested`` (a dtype name or "auto") on this CPU. With a
    ``quantization`` other than "none" the matmuls are quantised (quant.py) and not probed."""
    fp32, bf16 = torch.float32, torch.bfloat16
    quantized = dict.fromkeys(MATMULS, quantization) if quantization != "none" else None
    if requested != "auto":
        dtype = TORCH_DTYPES[requested]
        return Precision(requested, dtype, quantized or dict.fromkeys(MATMULS, requested), dtype, "requested")
    if not cpu.native_bf16:
        return Precision("auto", fp32, quantized or dict.fromkeys(MATMULS, "float32"), fp32,
                         "no AMX or AVX512-BF16 on this CPU: bfloat16 would be emulated")
    if not onednn_usable(bf16):
        return Precision("auto", fp32, quantized or dict.fromkeys(MATMULS, "float32"), fp32,
                         "oneDNN's bfloat16 linear is not usable in this torch")
    timings, linears = {}, {}
    for kind, (out_features, in_features) in ({} if quantized else matmul_shapes(spec)).items():
        t = {d: [_time_linear(out_features, in_features, d, rows) for rows in (1, WIDE_ROWS)] for d in (fp32, bf16)}
        best = [min(t[fp32][i], t[bf16][i]) for i in (0, 1)]
        worst = {d: max(t[d][i] / best[i] for i in (0, 1)) for d in (fp32, bf16)}
        linears[kind] = "bfloat16" if worst[bf16] < worst[fp32] else "float32"
        timings[kind] = {"rows": [1, WIDE_ROWS], "float32": [round(x, 4) for x in t[fp32]],
                         "bfloat16": [round(x, 4) for x in t[bf16]]}
    kv = {d: _time_decode_attention(spec, d) for d in (torch.float32, torch.bfloat16)}
    timings["decode_attention"] = {"tokens": KV_PROBE_TOKENS, **{str(d).removeprefix("torch."): round(v, 4)
                                                                  for d, v in kv.items()}}
    kv_dtype = bf16 if kv[bf16] < kv[fp32] else fp32
    return Precision("auto", fp32, quantized or linears, kv_dtype, "measured at load on this CPU", timings)


def matmul_shapes(spec: LlamaSpec) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each matmul kind, as llama.py fuses them."""
    h, d = spec.hidden_size, spec.head_dim
    return {"qkv": ((spec.num_heads + 2 * spec.num_kv_heads) * d, h), "o": (h, spec.num_heads * d),
            "gate_up": (2 * spec.intermediate_size, h), "down": (h, spec.intermediate_size),
            "lm_head": (spec.vocab_size, h)}


def best_cpu_ms(candidates: dict, calls: int, repeats: int = PROBE_REPEATS) -> dict[str, float]:
    """Best-of-``repeats`` CPU milliseconds per call of each candidate function, on one thread.

    The candidates take turns within each repeat, so a busy spell of the
    machine slows them alike; each is called once first (packing caches, page faults).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for fn in candidates.values():
            fn()
        best = dict.fromkeys(candidates, float("inf"))
        for _ in range(repeats):
            for name, fn in candidates.items():
                start = time.thread_time()
                for _ in range(calls):
                    fn()
                best[name] = min(best[name], (time.thread_time() - start) / calls)
    finally:
        torch.set_num_threads(threads)
    return {name: seconds * 1e3 for name, seconds in best.items()}


def _best_ms(fn, calls: int) -> float:
    """Best-of-PROBE_REPEATS CPU milliseconds of ``fn`` on one thread."""
    return best_cpu_ms({"fn": fn}, calls)["fn"]


_cache: dict[tuple, float] = {}


def _time_linear(out_features: int, in_features: int, dtype: torch.dtype, rows: int) -> float:
    key = ("linear", out_features, in_features, dtype, rows)
    if key not in _cache:
        generator = torch.Generator().manual_seed(0)
        linear = Linear(torch.randn(out_features, in_features, generator=generator).to(dtype))
        x = torch.randn(rows, in_features, generator=generator).to(dtype)
        with torch.inference_mode():
            _cache[key] = _best_ms(lambda: linear(x), calls=4)
    return _cache[key]


def _time_decode_attention(spec: LlamaSpec, dtype: torch.dtype) -> float:
    key = ("attention", spec.num_heads, spec.num_kv_heads, spec.head_dim, dtype)
    if key not in _cache:
        generator = torch.Generator().manual_seed(0)
        q = torch.randn(1, spec.num_heads, 1, spec.head_dim, generator=generator).to(dtype)
        k, v = (torch.randn(1, spec.num_kv_heads, KV_PROBE_TOKENS, spec.head_dim, generator=generator).to(dtype)
                for _ in range(2))
        gqa = spec.num_heads != spec.num_kv_heads
        with torch.inference_mode():
            _cache[key] = _best_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa), calls=32)
    return _cache[key]
