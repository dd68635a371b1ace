"""Weight-only int8 and int4 linears on torch's CPU kernels or ours, quantised at load and cached on disk.

Formats (what torch's kernels take; ``q`` are the stored integers):

- **int8**, per output channel: ``w = q * scale``, ``q`` in [-127, 127],
  one scale per row; ``aten._weight_int8pack_mm``.
- **int4**, per group of ``group_size`` inputs of a row: ``w = (q - 8) * scale
  + zero``, ``q`` in [0, 15] (asymmetric, llama.cpp's Q4_1 with ``zero = min +
  8 * scale``); ``aten._weight_int4pack_mm_for_cpu`` on the packing of
  ``aten._convert_weight_to_int4pack_for_cpu``. The LM head of an int4
  model is int8 (:data:`LM_HEAD_MODES`). Quantising a llama.cpp Q4_1 tensor
  (dequantised by the GGUF conversion) with groups of 32 gives back exactly
  its own integers: Q4_1 puts each block's min at 0 and max at 15, which is
  this grid.

Three kernels for each format, chosen per matmul by a table measured on the
project's Xeon (AVX-512), EPYCs (AVX2; Zen 5 with AVX-512) (:func:`choose_kernel`;
``stats()["kernels"]["quant_kernels"]`` says which and why; ``TRILLM_QUANT_KERNEL=measure``
times them at load instead):

- torch's (aten): they take bfloat16 activations and scales. Measured on
  torch 2.13 (Xeon with AMX, 2 threads), their float32 paths run 10-300x
  slower than float32 oneDNN, their bfloat16 ones 2-5x faster at one row. So
  such a matmul rounds its input to bfloat16 and returns its result in the
  engine's dtype.
- ours (``csrc/qmatmul.cpp``): float32 activations, the weights unpacked in
  registers; the result is the float32 matmul of the dequantised weights.
  Measured there at one row: int8 1.3-1.6x faster than aten's, int4 10-20%
  slower (aten's uses AVX512-BF16 dot products). On the AVX2 EPYC, where
  aten's bfloat16 is emulated, the AVX2 path is faster for both.
- ours with int8 activations (``csrc/qmatmul_a8.cpp``, "native-a8"): each
  row of x rounded to int8 per block of 32 inputs (scale max|x| / 127, as
  llama.cpp's Q8_1), then integer dot products with the same weights. It
  reads the same weight bytes with about half the instructions; the price is
  x's rounding (``<= max|x| / 254`` per input of a block). Chosen where
  unpacking, not memory, binds (the AVX2 rows of :data:`KERNEL_TABLE`).

The rest of the model (norms, attention, residuals, embedding) keeps the
engine's dtype. Scales are chosen, then rounded to bfloat16, and only
then are the integers chosen against the rounded scales, so the stored grid
is the grid the error bounds hold for (int8: ``|w - deq| <= scale / 2``;
int4: ``<= scale / 2`` plus the bfloat16 rounding of the zero).

The kernels need ``in_features`` divisible by the group size (int4) and
``out_features`` by 16 (aten's int4 packing); a model whose shapes break that is
refused at load, naming the matrix.

Cache: quantising SmolLM2-135M takes seconds on 2 cores; the integers and
scales of every linear are written once to ``build/quant/<key>/`` (key: the
checkpoint's weight files' sha256, the mode, the group size and
:data:`FORMAT_VERSION`) in a portable layout (int4 as plain nibbles; the
kernel's packing depends on the CPU's ISA, so it is redone at load).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from trillm.engine.config import QUANT_GROUP_SIZES
from trillm.engine.linear import Linear

INT4_N_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu: "expect N to be dividable by 16"
KERNEL_DTYPE = torch.bfloat16
FORMAT_VERSION = 2  # bump when what the cache holds for a checkpoint changes
# The LM head of an int4 model is int8: llama.cpp's Q4 files keep it at Q8_0 or Q6_K too.
# Measured on SmolLM2-135M (a Q4_1 GGUF, its tied LM head Q8_0): an int4 LM head raises
# the perplexity of benchmarks/data/ppl.txt from 18.0 to 19.1 (docs/benchmarks.md).
LM_HEAD_MODES = {"int4": "int8"}


def _round_up_bf16(x: torch.Tensor) -> torch.Tensor:
    """The smallest bfloat16 >= each float32 element (so a scale never shrinks in rounding)."""
    rounded = x.to(KERNEL_DTYPE)
    low = rounded.float() < x
    return torch.where(low, torch.nextafter(rounded, torch.tensor(float("inf"), dtype=KERNEL_DTYPE)), rounded)


# ---- int8, per output channel ---------------------------------------------------------------

def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [out, in], scale bfloat16 [out]) with ``|w - q * scale| <= scale / 2``."""
    w = weight.float()
    scale = _round_up_bf16(w.abs().amax(1).clamp(min=1e-30) / 127)
    q = torch.round(w / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[:, None]


# ---- int4, group-wise asymmetric -------------------------------------------------------------

def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q uint8 [out, in] in [0, 15], scale_zero bfloat16 [out, in / group, 2]).

    ``w = (q - 8) * scale + zero``; the grid of a group spans its min to max
    (``zero = min + 8 * scale``), so ``|w - deq| <= scale / 2 + |zero - (min + 8 * scale)|``
    (the second term: the zero's rounding to bfloat16).
    """
    out_features, in_features = weight.shape
    w = weight.float().reshape(out_features, in_features // group_size, group_size)
    low, high = w.amin(-1), w.amax(-1)
    scale = _round_up_bf16((high - low).clamp(min=1e-30) / 15)
    zero = (low + 8 * scale.float()).to(KERNEL_DTYPE)
    q = torch.round((w - zero.float()[..., None]) / scale.float()[..., None]).add_(8).clamp_(0, 15)
    return q.to(torch.uint8).reshape(out_features, in_features), torch.stack([scale, zero], -1)


def dequantize_int4(q: torch.Tensor, scale_zero: torch.Tensor, group_size: int) -> torch.Tensor:
    out_features, in_features = q.shape
    groups = q.float().reshape(out_features, in_features // group_size, group_size) - 8
    sz = scale_zero.float()
    return (groups * sz[..., 0:1] + sz[..., 1:2]).reshape(out_features, in_features)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """[out, in] values in [0, 15] -> [out, in / 2] bytes (even column in the low nibble)."""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 15, packed >> 4], -1).reshape(packed.shape[0], -1)


# ---- the linear ----------------------------------------------------------------------------

@dataclass(frozen=True)
class QuantConfig:
    mode: str  # EngineConfig.quantization
    group_size: int  # EngineConfig.quant_group_size (int4 only)


class QuantLinear:
    """``x @ deq(weight).T + bias`` on torch's weight-only kernels (module docstring).

    The same interface as :class:`~trillm.engine.linear.Linear`, so the batch-
    invariance probe runs on it unchanged; ``dtype`` is the engine's dtype
    (what it takes and returns), ``kernel_dtype`` what the kernel computes in.
    """

    def __init__(self, mode: str, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                 dtype: torch.dtype, group_size: int = 0, kernel: str = "aten") -> None:
        self.mode, self.group_size = mode, group_size
        self.out_features, self.in_features = q.shape
        self.dtype = dtype
        self.bias = bias
        self.native = native_kernel(kernel, self.in_features)
        self.a8 = kernel == "native-a8"
        if self.native is not None:
            # csrc/qmatmul.cpp: float32 activations, weights unpacked in registers;
            # csrc/qmatmul_a8.cpp: activations rounded to int8 in the kernel, integer dot products
            self.kernel_dtype = torch.float32
            if bias is not None:
                self.bias = bias.float()
            if mode == "int8":
                self.weight = pack_pairs(q) if self.a8 else q.contiguous()
                self.scales = scales.float().contiguous()
                self.zeros = None
            else:
                self.weight = pack_blocks(q)
                self.scales = scales[..., 0].float().contiguous()
                self.zeros = scales[..., 1].float().contiguous()
        else:
            self.kernel_dtype = KERNEL_DTYPE
            self.zeros = None
            self.scales = scales.contiguous()
            if mode == "int8":
                self.weight = q.contiguous()
            else:
                # The kernel wants [in / group, out, 2]; q as int32 for the packing op.
                self.scales = scales.transpose(0, 1).contiguous()
                self.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
        tensors = [self.weight, self.scales] + [t for t in (self.zeros, self.bias) if t is not None]
        self.nbytes = sum(t.numel() * t.element_size() for t in tensors)

    @property
    def kernel(self) -> str:
        if self.native is not None:
            return (f"native-{'a8-' if self.a8 else ''}{self.mode}-{self.native.isa}"
                    + (f"-g{self.group_size}" if self.mode == "int4" else ""))
        return "aten-int8pack-bf16" if self.mode == "int8" else f"aten-int4pack-bf16-g{self.group_size}"

    @property
    def shape_key(self) -> tuple:
        """What selects the kernel: shape, mode, group size, bias, dtypes (not the values)."""
        return (self.out_features, self.in_features, self.mode, self.group_size, self.bias is not None,
                str(self.dtype), str(self.kernel_dtype), self.kernel)

    @property
    def input_dtype(self) -> torch.dtype:
        return self.kernel_dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.native is not None:
            if x.dtype != torch.float32 or x.stride(-1) != 1:
                x = x.float().contiguous()
            y = torch.empty(x.shape[0], self.out_features, dtype=torch.float32)
            if self.mode == "int8":
                self.native.int8(x, self.weight, self.scales, self.bias, y)
            else:
                self.native.int4(x, self.weight, self.scales, self.zeros, self.group_size, self.bias, y)
            return y if self.dtype == torch.float32 else y.to(self.dtype)
        xq = x.to(self.kernel_dtype)
        if self.mode == "int8":
            y = torch.ops.aten._weight_int8pack_mm(xq, self.weight, self.scales)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xq, self.weight, self.group_size, self.scales)
        y = y.to(self.dtype)
        return y if self.bias is None else y + self.bias


def pack_blocks(q: torch.Tensor) -> torch.Tensor:
    """[out, in] values in [0, 15] -> csrc/qmatmul.cpp's int4 layout [out, in / 2]: per block of 32
    inputs, byte j = q[j] | q[j + 16] << 4 (one mask or shift unpacks 16 consecutive weights)."""
    out_features, in_features = q.shape
    blocks = q.reshape(out_features, in_features // 32, 2, 16)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(out_features, in_features // 2).contiguous()


def pack_pairs(q: torch.Tensor) -> torch.Tensor:
    """int8 [out, in] -> csrc/qmatmul_a8.cpp's pair layout: per 64 inputs (blocks b0, b1),
    [b0 0-15 | b1 0-15 | b0 16-31 | b1 16-31], the order its int4 unpacking gives."""
    out_features, in_features = q.shape
    pairs = q.reshape(out_features, in_features // 64, 2, 2, 16)  # [pair, block, half, 16]
    return pairs.transpose(2, 3).reshape(out_features, in_features).contiguous()


# What each native kernel needs of in_features (the a8 kernels work on pairs of 32-input blocks).
NATIVE_MULTIPLES = {"native": 32, "native-a8": 64}


def native_kernel(choice: str, in_features: int):
    """The kernels for ``choice`` "native" (csrc/qmatmul.cpp) or "native-a8" (csrc/qmatmul_a8.cpp);
    ValueError when they cannot run; None for "aten"."""
    if choice not in NATIVE_MULTIPLES:
        return None
    multiple = NATIVE_MULTIPLES[choice]
    if in_features % multiple:
        raise ValueError(f"the {choice} quantised matmul needs in_features divisible by {multiple}, not {in_features}")
    from trillm.engine import native  # not at import: the build runs on first use

    kernel, why = native.load_qmatmul_a8() if choice == "native-a8" else native.load_qmatmul()
    if kernel is None:
        raise ValueError(f"the {choice} quantised matmul is unavailable ({why})")
    return kernel


KERNEL_CHOICES = ("auto", "native", "native-a8", "aten", "measure")
PROBE_ROWS = 1  # what "measure" times: one decoding row, the case quantisation is for


@functools.cache
def choose_kernel(mode: str, out_features: int, in_features: int, group_size: int) -> tuple[str, str]:
    """("native" or "aten", why) for a quantised matmul of this shape on this CPU.

    ``TRILLM_QUANT_KERNEL`` = auto (default) | native | aten | measure.

    auto follows :data:`KERNEL_TABLE`, measured per ISA of the native build: on
    a Sapphire Rapids Xeon the native int8 kernel (AVX-512) is 1.3-1.6x faster
    than aten's at one row and aten's bfloat16 int4 kernel 10-20% faster than
    the native one; on an AMD EPYC with AVX2 only, aten's kernels emulate
    bfloat16 and the native AVX2 path wins both. The generic path (neither
    ISA) is not measured faster, so it gets aten's. It is not timed at load, because
    the two kernels round differently. A choice that flips between loads of the
    same model on a busy machine would change a version's greedy text after a
    reload; this was seen in tests/versions with a timing probe.

    measure times both kernels at load on random weights of the shape (one row,
    one thread, precision.best_cpu_ms) and keeps the faster. Use it to check the
    table on another CPU. Where the native kernels cannot be built, or the shape
    is not theirs, the choice is aten.
    """
    choice = os.environ.get("TRILLM_QUANT_KERNEL", "auto")
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"TRILLM_QUANT_KERNEL: {choice!r} is not one of {', '.join(KERNEL_CHOICES)}")
    if choice in ("native", "native-a8", "aten"):
        return choice, f"TRILLM_QUANT_KERNEL={choice}"
    if in_features % 32:
        return "aten", f"native kernels need in_features divisible by 32 ({in_features})"
    from trillm.engine import native

    kernel, why = native.load_qmatmul()
    if kernel is None:
        return "aten", why
    if choice == "measure":
        return _measured(mode, out_features, in_features, group_size)
    chosen, why = KERNEL_TABLE.get((mode, kernel.isa), ("aten", f"table: no measurement favours the native {mode} "
                                                                f"kernel's {kernel.isa} path over aten's"))
    if chosen == "native-a8" and in_features % NATIVE_MULTIPLES["native-a8"]:
        return "native", f"{why}; but native-a8 needs in_features divisible by 64 ({in_features})"
    return chosen, why


# (mode, native kernel's ISA) -> (kernel, why), measured at one row and 32 (docs/benchmarks.md "Kernels, per matmul").
KERNEL_TABLE = {
    ("int8", "avx512"): ("native", "table: native int8 (AVX-512) 1.3-1.6x aten's at one row on a Sapphire Rapids Xeon"),
    ("int4", "avx512"): ("aten", "table: aten's bfloat16 int4 kernel 10-20% faster than the native one at one row "
                                 "(Sapphire Rapids)"),
    # The AVX2 rows: native beat aten's (bfloat16 emulated) on an AVX2-only AMD EPYC, 1.3-6x; the a8 kernel's
    # AVX2 path then beat the native one at one row 1.2-1.5x, measured as AVX2 code on a Zen 5 EPYC
    # (make bench-qmatmul's -mno-avx512f builds; docs/benchmarks.md "Kernels, per matmul"), not yet on an
    # AVX2-only CPU. Batch-1 decoding is what quantisation is for, so int4 takes a8 despite 0.8-1.0x at 32 rows.
    ("int8", "avx2"): ("native-a8", "table: a8 int8 (AVX2) 1.2-1.4x native's at one row, 1.2-1.4x at 32 (AVX2 code "
                                    "on an AMD EPYC Zen 5); native 6x aten's on an AVX2-only EPYC"),
    ("int4", "avx2"): ("native-a8", "table: a8 int4 (AVX2) 1.3-1.5x native's at one row, 0.8-1.0x at 32 (AVX2 "
                                    "code on an AMD EPYC Zen 5); native faster than aten's on an AVX2-only EPYC"),
}


def _measured(mode: str, out_features: int, in_features: int, group_size: int) -> tuple[str, str]:
    from trillm.engine.precision import best_cpu_ms

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(out_features, in_features, generator=generator) * 0.05
    q, scales = quantize_int8(weight) if mode == "int8" else quantize_int4(weight, group_size)
    x = torch.randn(PROBE_ROWS, in_features, generator=generator)
    names = [name for name in ("native", "native-a8", "aten")
             if in_features % NATIVE_MULTIPLES.get(name, 1) == 0]
    candidates = {name: QuantLinear(mode, q, scales, None, torch.float32, group_size, kernel=name) for name in names}
    calls = max(1, int(2e6 // (out_features * in_features)))
    with torch.inference_mode():
        ms = best_cpu_ms({name: (lambda linear=linear: linear(x)) for name, linear in candidates.items()}, calls)
    best = min(ms, key=ms.get)
    return best, (f"measured at load ({out_features}x{in_features}, {PROBE_ROWS} row): "
                  + " vs ".join(f"{name} {ms[name]:.3f} ms" for name in names))


# ---- building a model's linears, with the cache ------------------------------------------------

def default_cache_dir() -> Path:
    """``$TRILLM_HOME/build/quant``, else ``build/quant`` under the working directory (as GGUF conversions)."""
    return Path(os.environ.get("TRILLM_HOME") or Path.cwd()) / "build" / "quant"


def checkpoint_key(files: list[Path]) -> str:
    """sha256 of the weight files' names and contents (what the quantised weights derive from)."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


class LinearBuilder:
    """Makes each named linear of a model: a float :class:`Linear`, or a :class:`QuantLinear`
    from the cache when it holds this checkpoint's quantisation, else quantised now
    (and :meth:`save` writes the cache)."""

    def __init__(self, quant: QuantConfig, dtype: torch.dtype, weight_files: list[Path] | None = None,
                 cache_dir: Path | None = None) -> None:
        self.quant = quant
        self.dtype = dtype
        self.cache_path: Path | None = None
        self.cached: dict[str, torch.Tensor] = {}
        self.made: dict[str, torch.Tensor] = {}
        self.kernel_choices: dict[str, str] = {}  # "<mode> <out>x<in>" -> "native|aten: why"
        self.loaded_from_cache = False
        if quant.mode != "none" and weight_files:
            cache_dir = cache_dir or default_cache_dir()
            group = f"-g{quant.group_size}" if quant.mode == "int4" else ""
            key = checkpoint_key(weight_files)[:24]
            self.cache_path = Path(cache_dir) / f"{key}-{quant.mode}{group}-v{FORMAT_VERSION}"
            self.cached = _read_cache(self.cache_path)
            self.loaded_from_cache = bool(self.cached)

    def __call__(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None = None):
        mode = self.quant.mode
        if mode == "none":
            return Linear(weight, bias)
        if name == "lm_head":
            mode = LM_HEAD_MODES.get(mode, mode)
        out_features, in_features = weight.shape
        group = self.quant.group_size if mode == "int4" else 0
        if mode == "int4":
            if in_features % group:
                raise ValueError(f"quant_group_size: {group} does not divide the {in_features} inputs of {name}; "
                                 f"use one of {[g for g in QUANT_GROUP_SIZES if in_features % g == 0] or 'none'}")
            if out_features % INT4_N_MULTIPLE:
                raise ValueError(f"quantization: int4 needs out_features divisible by {INT4_N_MULTIPLE}; "
                                 f"{name} has {out_features} (use int8)")
        q, scales = self._quantized(name, weight, mode, group)
        kernel, why = choose_kernel(mode, out_features, in_features, group)
        self.kernel_choices[f"{mode}{f'-g{group}' if group else ''} {out_features}x{in_features}"] = f"{kernel}: {why}"
        return QuantLinear(mode, q, scales, bias, self.dtype, group, kernel=kernel)

    def _quantized(self, name: str, weight: torch.Tensor, mode: str, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        if f"{name}.q" in self.cached:
            q, scales = self.cached[f"{name}.q"], self.cached[f"{name}.scales"]
            if mode == "int4":
                q = unpack_nibbles(q)
            if tuple(q.shape) != tuple(weight.shape):
                raise ValueError(f"quant cache {self.cache_path}: {name} has shape {tuple(q.shape)}, "
                                 f"the checkpoint {tuple(weight.shape)}; delete the cache dir")
            return q, scales
        if mode == "int8":
            q, scales = quantize_int8(weight)
            self.made[f"{name}.q"] = q
        else:
            q, scales = quantize_int4(weight, group)
            self.made[f"{name}.q"] = pack_nibbles(q)
        self.made[f"{name}.scales"] = scales
        return q, scales

    def save(self) -> None:
        """Write what was quantised into the cache (atomically: a reader sees all or nothing)."""
        if self.cache_path is None or self.loaded_from_cache or not self.made:
            return
        from safetensors.torch import save_file

        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=self.cache_path.parent, prefix=f".{self.cache_path.name}-"))
        try:
            save_file(self.made, staging / "weights.safetensors")
            manifest = {"format_version": FORMAT_VERSION, "mode": self.quant.mode,
                        "group_size": self.quant.group_size if self.quant.mode == "int4" else None,
                        "tensors": len(self.made)}
            (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
            for path in staging.iterdir():
                os.chmod(path, 0o644)  # mkdtemp and safetensors make 0700/0600; a server may run as another user
            os.chmod(staging, 0o755)
            try:
                os.replace(staging, self.cache_path)
            except OSError:  # another engine wrote the same cache first
                if not (self.cache_path / "manifest.json").is_file():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self.made = {}


def _read_cache(path: Path) -> dict[str, torch.Tensor]:
    if not (path / "manifest.json").is_file():
        return {}
    from safetensors.torch import load_file

    # Copies, not the file's mapping: safetensors places tensors at 8-byte offsets, and
    # aten._weight_int8pack_mm crashes (SIGSEGV, torch 2.13, AVX-512) on a weight that is
    # not 64-byte aligned; torch's allocator aligns to 64.
    return {name: tensor.clone() for name, tensor in load_file(path / "weights.safetensors").items()}


def resident_memory_bytes() -> int:
    """This process's resident set (VmRSS of /proc/self/status; 0 where there is none)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def release_freed_memory() -> None:
    """Hand the heap freed after loading (the float checkpoint) back to the OS.

    glibc keeps freed small-block arenas mapped, so without this the float
    weights quantised away at load stay in the resident set.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
