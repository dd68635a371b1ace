"""Linear layers for CPU decoding: weights prepacked once for oneDNN.

Why not ``F.linear``: torch's CPU BLAS (MKL) is slow for the few-row
matmuls of decoding on this hardware class (AMD EPYC, AVX2: about 3 GB/s of
weights at 4 rows, against 10+ GB/s for oneDNN with prepacked weights), and
it rounds a row differently depending on how many rows share the call (1,
2-3 and 4+ rows take different kernels). oneDNN's prepacked inner product
was measured to give every row the same bits whatever the row count (1 to
700 rows, 1 to 3 threads), which is what makes a request's output
independent of its batch.

Where oneDNN cannot be used (a torch build without it, or a dtype other than
float32), ``F.linear`` is used and ``ROW_MULTIPLE_FALLBACK`` rows are the
matmul granularity that keeps MKL's results row-independent.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

ROW_MULTIPLE_FALLBACK = 4  # MKL: 4 or more rows, in multiples of 4, share one kernel


@functools.cache
def onednn_usable() -> bool:
    """Whether oneDNN's prepacked linear exists here and agrees with F.linear."""
    ops = getattr(torch.ops, "mkldnn", None)
    if not torch.backends.mkldnn.is_available() or ops is None:
        return False
    try:
        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(24, 40, generator=generator)
        bias = torch.randn(24, generator=generator)
        x = torch.randn(3, 40, generator=generator)
        packed = ops._reorder_linear_weight(weight, None)
        got = ops._linear_pointwise(x, packed, bias, "none", [None], "")
        return bool(torch.allclose(got, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5))
    except (RuntimeError, AttributeError):
        return False


class Linear:
    """``x @ weight.T + bias``, with ``weight`` prepacked for oneDNN when possible."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.nbytes = weight.numel() * weight.element_size()
        if bias is not None:
            self.nbytes += bias.numel() * bias.element_size()
        self.bias = bias
        self.packed = weight.dtype == torch.float32 and onednn_usable()
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, None) if self.packed else weight

    @property
    def row_multiple(self) -> int:
        """Rows per matmul must be a multiple of this for results not to depend on the row count."""
        return 1 if self.packed else ROW_MULTIPLE_FALLBACK

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [None], "")
        return F.linear(x, self.weight, self.bias)
