"""Linear layers for CPU decoding, and the probe that makes a row's result independent of its batch.

Why oneDNN: torch's CPU BLAS (MKL) is slow for the few-row matmuls of
decoding (measured on AMD EPYC, AVX2: about 3 GB/s of weights at 4 rows,
against 10+ GB/s for oneDNN with prepacked weights). float32 weights (and
bfloat16 ones where oneDNN has native bfloat16) are prepacked once for
oneDNN's inner product; other dtypes use ``F.linear``.

Batch invariance: a request must get the same bits whether it runs alone or
shares a step with others, so no row's result may depend on how many rows
share its matmul. No library promises that, and the kernel a library picks
depends on the CPU, the shape, the row count and the thread count:
measured, oneDNN's fp32 inner product of a 640x1728 weight on a Xeon with
AVX-512 rounds a lone row differently from a row among 2 or more (it splits
the 1728-long reductions for one row), while on an AVX2 EPYC and for
1536x576 it gives the same bits for 1 to 700 rows; MKL's ``F.linear`` is
row-invariant only in multiples of 4 rows on the EPYC, of 16 on the Xeon.
So the engine does not assume: :func:`probe_row_multiple` runs every row
count a step can use, on this CPU, with this thread count, and finds the
smallest row multiple (steps are padded to it) at which every row comes out
the same; or reports that none exists, and the engine says it is not
batch-invariant.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

# Candidate paddings, smallest first; the probe's largest call is a multiple of all of them.
# No larger: padding a lone decode to more rows multiplies its matmul work by more than
# the invariance is worth (oneDNN's bfloat16 AMX kernels are row-invariant only from 33
# rows on, so they would need 64); such matmuls run unpadded and the engine says so.
ROW_MULTIPLES = (1, 2, 4, 8, 16)
SMALL_COUNTS = ROW_MULTIPLES[-1]  # row counts the probe runs on every window of its input (row_variant_counts)


# The dtypes oneDNN's prepacked linear is tried for, with the tolerance its agreement
# with F.linear is checked to (a few units in the last place of the dtype).
PACKED_DTYPES = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@functools.cache
def onednn_usable(dtype: torch.dtype = torch.float32) -> bool:
    """Whether oneDNN's prepacked linear exists here for ``dtype`` and agrees with F.linear.

    bfloat16 needs AVX512-BF16 or AMX in oneDNN; measured on a Sapphire Rapids
    Xeon, prepacked bfloat16 runs 2-3x faster than F.linear's bfloat16 path.
    """
    ops = getattr(torch.ops, "mkldnn", None)
    if dtype not in PACKED_DTYPES or not torch.backends.mkldnn.is_available() or ops is None:
        return False
    if dtype == torch.bfloat16 and not ops._is_mkldnn_bf16_supported():
        return False
    try:
        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(24, 40, generator=generator).to(dtype)
        bias = torch.randn(24, generator=generator).to(dtype)
        x = torch.randn(3, 40, generator=generator).to(dtype)
        packed = ops._reorder_linear_weight(weight, None)
        got = ops._linear_pointwise(x, packed, bias, "none", [None], "")
        tol = PACKED_DTYPES[dtype]
        return bool(torch.allclose(got.float(), F.linear(x, weight, bias).float(), rtol=tol, atol=tol))
    except (RuntimeError, AttributeError):
        return False


class Linear:
    """``x @ weight.T + bias``, with ``weight`` prepacked for oneDNN when possible.

    The input is rounded to the weight's dtype (a bfloat16 matmul in a float32
    model: precision.py); the result is in that dtype.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        self.nbytes = weight.numel() * weight.element_size()
        if bias is not None:
            self.nbytes += bias.numel() * bias.element_size()
        self.bias = bias
        self.packed = onednn_usable(weight.dtype)
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, None) if self.packed else weight

    @property
    def kernel(self) -> str:
        return "onednn-prepacked" if self.packed else "aten-linear"

    @property
    def input_dtype(self) -> torch.dtype:
        """What the matmul reads (an input in another dtype is rounded to it first)."""
        return self.dtype

    @property
    def shape_key(self) -> tuple:
        """What selects the kernel: the shape, dtype, bias and the path (not the values)."""
        return (self.out_features, self.in_features, str(self.dtype), self.bias is not None, self.packed)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.dtype:
            x = x.to(self.dtype)
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [None], "")
        return F.linear(x, self.weight, self.bias)


def _pad(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def row_variant_counts(linear: Linear, max_rows: int) -> frozenset[int]:
    """The row counts below the probe's largest call whose rows differ from that call's.

    Runs ``linear`` on every row count from 1 to ``max_rows`` padded to the
    largest of ROW_MULTIPLES, on this CPU and thread count; cached per kernel
    shape, row limit and thread count (what the kernel choice depends on).
    Stops once every candidate multiple has a variant count (then no padding
    works, whatever the larger counts do: bfloat16's probe ends after 16 calls).

    A count up to :data:`SMALL_COUNTS` is run on every window of that many rows
    of the probe's input, not only the first: a bfloat16 result hides most of
    a kernel's other summation order in its rounding, so one row can agree by
    chance. Measured on an AMD EPYC with AVX512-BF16 (torch 2.13): oneDNN's
    576x1536 bfloat16 inner product (random weights and inputs) agreed with
    the 64-row call on 57 of 64 lone rows, the first row among them. Larger counts compare all of
    their rows already.
    """
    key = (linear.shape_key, max_rows, torch.get_num_threads())
    if key not in _probe_cache:
        largest = _pad(max_rows, ROW_MULTIPLES[-1])
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(largest, linear.in_features, generator=generator).to(linear.dtype)
        with torch.inference_mode():
            reference = linear(x)
            variants: set[int] = set()
            for n in range(1, largest):
                starts = range(0, largest - n + 1, n) if n <= SMALL_COUNTS else (0,)
                if any(not torch.equal(linear(x[i:i + n]), reference[i:i + n]) for i in starts):
                    variants.add(n)
                    if all(any(v % m == 0 for v in variants) for m in ROW_MULTIPLES):
                        break
            _probe_cache[key] = frozenset(variants)
    return _probe_cache[key]


def smallest_row_multiple(variant_counts: list[frozenset[int]], max_rows: int) -> int | None:
    """The smallest of ROW_MULTIPLES at which no padded row count up to ``max_rows`` is
    variant for any of the matmuls; None when there is none."""
    return next((m for m in ROW_MULTIPLES
                 if not any(n % m == 0 and n <= _pad(max_rows, m) for counts in variant_counts for n in counts)),
                None)


_probe_cache: dict[tuple, frozenset[int]] = {}
