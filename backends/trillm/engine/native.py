"""The engine's native kernels (``csrc/``): built for this CPU on first use, loaded with ctypes.

Four sources, one library: ``paged_decode.cpp`` (decode attention over the
paged cache, :class:`PagedDecode`), ``fused.cpp`` (the row-wise work
between a layer's matmuls, :class:`Fused`), ``qmatmul.cpp`` (int4 and
int8 weight-only matmuls with float32 activations, :class:`QMatmul`) and
``qmatmul_a8.cpp`` (the same weights against activations rounded to int8,
integer dot products, :class:`QMatmulA8`).

Why native: decode attention is one small computation per sequence per
layer (a query row against a few hundred keys), and torch pays several
microseconds of dispatch for each call of ``scaled_dot_product_attention``
(about 40-65 us per sequence per layer measured on a Sapphire Rapids Xeon),
so a step of 32 decodes spent most of its attention time in overhead. The
kernel does every decoding sequence of a layer in one call, reading the K/V
in place through the block tables, as vLLM's CPU paged attention does.

Building: the source has no torch headers, so ``c++ -O3 -march=native``
compiles it in about a second. The shared object is cached under
``$TRILLM_HOME/build/native/`` (else ``build/native`` under the working
directory), keyed by the source, the compiler and the CPU's flags (``-march=native``
code runs only where those flags are), written atomically so that processes
loading at once (tritonserver's model stubs) never see half a file. No
compiler, or a failed build: :func:`load` returns None with the reason, and
the engine keeps torch's attention (the engine logs which it uses).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

from trillm.engine.cpu import cpuinfo_fields

log = logging.getLogger("trillm.engine")

SOURCES = tuple(Path(__file__).with_name("csrc") / name
                for name in ("paged_decode.cpp", "fused.cpp", "qmatmul.cpp", "qmatmul_a8.cpp"))
HEADERS = tuple(Path(__file__).with_name("csrc") / name for name in ("numerics.h", "qmatmul_common.h"))
# -fno-trapping-math lets GCC if-convert the clamp in numerics.h's exp_f32 (a select, same values),
# without which no loop that calls it vectorises: silu_mul ran 2-3x slower than torch's on AVX2.
# It allows no value-changing rewrite (no reassociation, no contraction): results are the same bits.
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-fno-math-errno", "-fno-trapping-math", "-std=c++17")
# Tried first: the sequences of a call shared among torch's OpenMP threads (see the C source);
# a compiler without OpenMP builds the single-threaded kernel.
OPENMP_FLAGS = ("-fopenmp",)
BUILD_TIMEOUT_S = 120
DTYPE_CODES = {"float32": 0, "bfloat16": 1}  # what the kernel takes (q, caches and output alike)


def default_build_dir() -> Path:
    return Path(os.environ.get("TRILLM_HOME") or Path.cwd()) / "build" / "native"


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


class NativeUnavailable(RuntimeError):
    """No compiler, or the build failed: the reason is the message."""


def _key(cxx: str) -> str:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    digest = hashlib.sha256(b"".join(source.read_bytes() for source in SOURCES + HEADERS))
    digest.update(" ".join(FLAGS).encode() + version.encode())
    digest.update(_cpu_flags().encode())
    return digest.hexdigest()[:24]


def _cpu_flags() -> str:
    """Every ISA flag of this CPU (what ``-march=native`` code may use), and its model."""
    model, flags = cpuinfo_fields()
    return f"{model}|{' '.join(sorted(flags))}"


def build(build_dir: Path | None = None) -> Path:
    """Path of the shared object for this CPU, compiling it if it is not cached; NativeUnavailable otherwise."""
    cxx = compiler()
    if cxx is None:
        raise NativeUnavailable("no C++ compiler (c++, g++ or clang++; or set CXX)")
    try:
        key = _key(cxx)
    except (OSError, subprocess.SubprocessError) as e:
        raise NativeUnavailable(f"C++ compiler {cxx!r} does not run: {e}") from e
    target_dir = (build_dir or default_build_dir()) / key
    target = target_dir / "libtrillm_native.so"
    if target.is_file():
        return target
    target_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target_dir, suffix=".so.tmp")
    os.close(fd)
    try:
        for extra in (OPENMP_FLAGS, ()):
            result = subprocess.run([cxx, *FLAGS, *extra, "-o", tmp, *map(str, SOURCES)], capture_output=True,
                                    text=True, timeout=BUILD_TIMEOUT_S)
            if result.returncode == 0:
                break
        if result.returncode != 0:
            raise NativeUnavailable(f"{cxx} failed: {result.stderr.strip()[-500:]}")
        os.replace(tmp, target)  # atomic: a concurrent build of the same key writes the same bytes
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NativeUnavailable(f"{cxx} could not build {', '.join(p.name for p in SOURCES)}: {e}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


class PagedDecode:
    """``trillm_paged_decode`` from the built library (see the C source for the layout)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        lib = _library(path)
        fn = lib.trillm_paged_decode
        i64, vp = ctypes.c_int64, ctypes.c_void_p
        fn.argtypes = [ctypes.c_int, vp, i64, vp, vp, vp, i64, vp, vp, i64, i64, i64, i64, i64, ctypes.c_float, vp, i64]
        fn.restype = ctypes.c_int
        self._fn = fn

    @staticmethod
    def dtype_code(tensor) -> int:
        return _code(tensor)

    def __call__(self, dtype_code: int, q, q_row_stride: int, k_cache, v_cache, tables, max_blocks: int, lens, rows,
                 n: int, heads: int, kv_heads: int, head_dim: int, block_size: int, scale: float, out,
                 out_row_stride: int) -> None:
        """Arguments are tensors (their data pointers are passed) and ints; ctypes releases the GIL meanwhile."""
        rc = self._fn(dtype_code, q.data_ptr(), q_row_stride, k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(),
                      max_blocks, lens.data_ptr(), rows.data_ptr(), n, heads, kv_heads, head_dim, block_size, scale,
                      out.data_ptr(), out_row_stride)
        if rc != 0:
            raise ValueError(f"trillm_paged_decode: unsupported dtype code {dtype_code}")


@cache
def _library(path: Path) -> ctypes.CDLL:
    return ctypes.CDLL(str(path))


def _code(tensor) -> int:
    return DTYPE_CODES[str(tensor.dtype).removeprefix("torch.")]


class Fused:
    """``csrc/fused.cpp``'s row-wise ops, on tensors (float32 or bfloat16, rows contiguous)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        lib = _library(path)
        i32, i64, vp, f32 = ctypes.c_int, ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
        lib.trillm_add_rms_norm.argtypes = [vp, vp, i32, vp, i32, f32, vp, i32, i64, i64]
        lib.trillm_rope_split.argtypes = [vp, i32, vp, vp, vp, vp, vp, vp, vp, vp, vp, i32, i64, i64, i64, i64]
        lib.trillm_silu_mul.argtypes = [vp, i32, vp, i32, i64, i64]
        for fn in (lib.trillm_add_rms_norm, lib.trillm_rope_split, lib.trillm_silu_mul):
            fn.restype = i32
        self._lib = lib

    def add_rms_norm(self, hidden, delta, weight, eps: float, x) -> None:
        """``hidden += delta`` (when not None; float32 ``hidden``), then ``x = rms_norm(hidden) * weight``."""
        rows, n = hidden.shape
        self._lib.trillm_add_rms_norm(hidden.data_ptr(), None if delta is None else delta.data_ptr(),
                                      0 if delta is None else _code(delta), weight.data_ptr(), _code(weight), eps,
                                      x.data_ptr(), _code(x), rows, n)

    def rope_split(self, qkv, cos, sin_signed, positions, slots, q, k, v, k_cache, v_cache) -> None:
        """q, k (rotated) and v out of ``qkv`` into ``q``/``k``/``v``, and k, v into the caches at ``slots``."""
        rows, heads, d = q.shape
        self._lib.trillm_rope_split(qkv.data_ptr(), _code(qkv), cos.data_ptr(), sin_signed.data_ptr(),
                                    positions.data_ptr(), slots.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(),
                                    k_cache.data_ptr(), v_cache.data_ptr(), _code(q), rows, heads, k.shape[1], d)

    def silu_mul(self, gate_up, x) -> None:
        """``x = silu(gate) * up`` for ``gate_up`` = [gate | up]."""
        rows, n = x.shape
        self._lib.trillm_silu_mul(gate_up.data_ptr(), _code(gate_up), x.data_ptr(), _code(x), rows, n)


class QMatmul:
    """``csrc/qmatmul.cpp``'s int4 and int8 matmuls, on tensors (float32 activations, rows contiguous)."""

    SYMBOL = ""  # the C functions are trillm_q4{SYMBOL}_matmul, trillm_q8{SYMBOL}_matmul, trillm_qmatmul{_SYMBOL}_isa
    MULTIPLE = 32  # of K, what the kernels take
    ISAS = {2: "avx512", 1: "avx2"}

    def __init__(self, path: Path) -> None:
        self.path = path
        lib = _library(path)
        i64, vp = ctypes.c_int64, ctypes.c_void_p
        self._q4 = getattr(lib, f"trillm_q4{self.SYMBOL}_matmul")
        self._q8 = getattr(lib, f"trillm_q8{self.SYMBOL}_matmul")
        isa = getattr(lib, f"trillm_qmatmul{'_' + self.SYMBOL if self.SYMBOL else ''}_isa")
        self._q4.argtypes = [vp, i64, i64, i64, vp, vp, vp, i64, i64, vp, vp, i64]
        self._q8.argtypes = [vp, i64, i64, i64, vp, vp, i64, vp, vp, i64]
        for fn in (self._q4, self._q8, isa):
            fn.restype = ctypes.c_int
        self.isa = self.ISAS.get(isa(), "generic")
        self._lib = lib

    def int4(self, x, packed, scale, zero, group: int, bias, y) -> None:
        """``y = x @ deq(W).T (+ bias)`` for int4 ``packed`` [N, K / 2] with float32 ``scale``/``zero`` [N, K / group]."""
        rows, k = x.shape
        rc = self._q4(x.data_ptr(), x.stride(0), rows, k, packed.data_ptr(), scale.data_ptr(), zero.data_ptr(), group,
                      packed.shape[0], None if bias is None else bias.data_ptr(), y.data_ptr(), y.stride(0))
        if rc != 0:
            raise ValueError(f"{self._q4.__name__}: {k} inputs with group {group} (needs a multiple of "
                             f"{self.MULTIPLE} and group 32/64/128)")

    def int8(self, x, q, scale, bias, y) -> None:
        """``y = x @ (q * scale[:, None]).T (+ bias)`` for int8 ``q`` [N, K] and float32 ``scale`` [N]."""
        rows, k = x.shape
        rc = self._q8(x.data_ptr(), x.stride(0), rows, k, q.data_ptr(), scale.data_ptr(), q.shape[0],
                      None if bias is None else bias.data_ptr(), y.data_ptr(), y.stride(0))
        if rc != 0:
            raise ValueError(f"{self._q8.__name__}: {k} inputs (needs a multiple of {self.MULTIPLE})")


class QMatmulA8(QMatmul):
    """``csrc/qmatmul_a8.cpp``: qmatmul.cpp's int4 and int8 weights against activations rounded to
    int8 per block of 32 inputs (integer dot products: VNNI on AVX-512, vpmaddubsw on AVX2). Its
    :meth:`int8` takes ``q`` in the pair layout (quant.pack_pairs)."""

    SYMBOL = "a8"
    MULTIPLE = 64
    ISAS = {2: "avx512-vnni", 1: "avx2"}

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        i64, vp = ctypes.c_int64, ctypes.c_void_p
        self._lib.trillm_a8_quantize.argtypes = [vp, i64, i64, i64, vp, vp]
        self._lib.trillm_a8_quantize.restype = ctypes.c_int

    def quantize(self, x, xq, dx) -> None:
        """x [M, K] float32 -> xq int8 [M, K] (the pair layout) and dx float32 [M, K / 32], as the matmuls do."""
        rows, k = x.shape
        if self._lib.trillm_a8_quantize(x.data_ptr(), x.stride(0), rows, k, xq.data_ptr(), dx.data_ptr()) != 0:
            raise ValueError(f"trillm_a8_quantize: {k} inputs (needs a multiple of 64)")


@cache
def library() -> tuple[Path | None, str]:
    """(the built library, "") or (None, why not). Built at most once per process."""
    if os.environ.get("TRILLM_NATIVE", "1") == "0":
        return None, "disabled by TRILLM_NATIVE=0"
    try:
        return build(), ""
    except (NativeUnavailable, OSError) as e:
        log.warning("native kernels unavailable: %s", e)
        return None, str(e)


def _bind(kind):
    """(``kind`` bound to the built library, "") or (None, why not)."""
    path, why = library()
    if path is None:
        return None, why
    try:
        return kind(path), ""
    except OSError as e:
        return None, str(e)


@cache
def load() -> tuple[PagedDecode | None, str]:
    """(the decode attention kernel, "") or (None, why not)."""
    return _bind(PagedDecode)


@cache
def load_fused() -> tuple[Fused | None, str]:
    """(the fused row-wise ops, "") or (None, why not)."""
    return _bind(Fused)


@cache
def load_qmatmul() -> tuple[QMatmul | None, str]:
    """(the quantised matmuls, "") or (None, why not)."""
    return _bind(QMatmul)


@cache
def load_qmatmul_a8() -> tuple[QMatmulA8 | None, str]:
    """(the quantised matmuls with int8 activations, "") or (None, why not)."""
    return _bind(QMatmulA8)


def main() -> int:
    """``python -m trillm.engine.native``: build (or find) the kernel for this CPU and print its path."""
    kernel, why = load()
    if kernel is None:
        print(f"native kernel unavailable: {why}")
        return 1
    print(kernel.path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
