"""csrc/qmatmul.cpp: int4 and int8 weight-only matmuls with float32 activations, as built for this
CPU, as its AVX2 path (built without AVX-512, where the CPU has AVX2 and FMA) and as its generic
path (neither); and quant.choose_kernel, which picks it or aten's."""

from __future__ import annotations

import math

import pytest
import torch

from engine_helpers import build_generic
from trillm.engine import native, quant
from trillm.engine.cpu import cpuinfo_fields

pytestmark = pytest.mark.engine

FP32_U = 2.0 ** -24


@pytest.fixture(scope="module")
def built() -> native.QMatmul:
    found, why = native.load_qmatmul()
    if found is None:
        pytest.skip(f"native kernels unavailable here ({why}); quantised matmuls run on aten's")
    return found


# Each accumulator lane of a path adds K / (2 lanes) products (two accumulators), then a log2(lanes)-level tree.
LANES = {"avx512": 16, "avx2": 8, "generic": 16}


@pytest.fixture(scope="module")
def generic(built, tmp_path_factory) -> native.QMatmul:
    """The kernel built without AVX-512, AVX2 and FMA, as on a CPU without them."""
    path = build_generic("qmatmul.cpp", tmp_path_factory.mktemp("generic"), without=("avx512f", "avx2", "fma"))
    kernel = native.QMatmul(path)
    assert kernel.isa == "generic"
    return kernel


@pytest.fixture(scope="module")
def avx2(built, tmp_path_factory) -> native.QMatmul:
    """The kernel built without AVX-512: its AVX2 path where the CPU has AVX2 and FMA."""
    if not {"avx2", "fma"} <= set(cpuinfo_fields()[1]):
        pytest.skip("this CPU has no AVX2 and FMA")
    kernel = native.QMatmul(build_generic("qmatmul.cpp", tmp_path_factory.mktemp("avx2")))
    assert kernel.isa == "avx2"
    return kernel


@pytest.fixture(scope="module", params=["as-built", "avx2", "generic"])
def kernel(request, built) -> native.QMatmul:
    return built if request.param == "as-built" else request.getfixturevalue(request.param)


def _int4(out_features: int, in_features: int, group: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=generator) * torch.logspace(-2, 1, out_features)[:, None]
    w[0] += 3.0  # a row of one sign: zero far from 0, so (q - 8) * scale and zero nearly cancel
    q, scale_zero = quant.quantize_int4(w, group)
    sz = scale_zero.float()
    operands = (quant.pack_blocks(q), sz[..., 0].contiguous(), sz[..., 1].contiguous())
    # What each dequantised weight is made of: |(q - 8) * scale| + |zero| bounds its rounding.
    steps = (q.float().reshape(out_features, -1, group) - 8) * sz[..., 0:1]
    parts = (steps.abs() + sz[..., 1:2].abs()).reshape(out_features, in_features)
    return operands, quant.dequantize_int4(q, scale_zero, group), parts


def _int8(out_features: int, in_features: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=generator) * torch.logspace(-2, 1, out_features)[:, None]
    q, scale = quant.quantize_int8(w)
    deq = quant.dequantize_int8(q, scale)
    return (q, scale.float()), deq, deq.abs()


def _run(kernel, mode, operands, group, x, bias, out_features):
    y = torch.full((x.shape[0], out_features), float("nan"))
    if mode == "int4":
        kernel.int4(x, *operands, group, bias, y)
    else:
        kernel.int8(x, *operands, bias, y)
    return y


@pytest.mark.parametrize(("mode", "group"), [("int8", 0), ("int4", 32), ("int4", 64), ("int4", 128)])
@pytest.mark.parametrize("rows", [1, 3, 4, 9])
def test_equals_the_dequantized_reference(kernel, mode, group, rows):
    """Against x @ deq(W).T + b in float64. Per output element, float32 arithmetic: each dequantised
    weight is rounded once or twice (<= 2u of |(q - 8) scale| + |zero|; int8's weights are exact and
    its scale multiplies the sum, one rounding), each product once, and each of the K / (2 lanes)
    additions a lane accumulates (K / 32 with 16 lanes, K / 16 with AVX2's 8), the two accumulators'
    sum and the log2(lanes)-level lane tree once each (plus the bias). So |got - ref| <=
    (K / (2 lanes) + log2(lanes) + 5) u sum_k |x_k| parts_k + u |b|, times 1.01.
    A wrong nibble, scale, group or layout errs by the weights' own size, far past this."""
    out_features, in_features = 70, 256  # 70: column tiles of 4, 2 and 1, and a chunk boundary
    if mode == "int4":
        operands, deq, parts = _int4(out_features, in_features, group, seed=rows)
    else:
        operands, deq, parts = _int8(out_features, in_features, seed=rows)
    generator = torch.Generator().manual_seed(100 + rows)
    wide = torch.randn(rows, in_features + 24, generator=generator)
    x = wide[:, 8:8 + in_features]  # rows in_features + 24 apart: the kernel follows the stride
    bias = torch.randn(out_features, generator=generator)
    got = _run(kernel, mode, operands, group, x, bias, out_features).double()
    ref = x.double() @ deq.double().T + bias.double()
    lanes = LANES[kernel.isa]
    depth = in_features / (2 * lanes) + math.log2(lanes) + 5
    tol = 1.01 * (depth * FP32_U * (x.double().abs() @ parts.double().T)
                  + FP32_U * bias.double().abs())
    assert ((got - ref).abs() <= tol).all(), f"worst excess {((got - ref).abs() - tol).max().item():.3g}"


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_rows_are_the_same_bits_whatever_shares_the_call(kernel, mode):
    """Batch invariance: each row of a call of 1-11 rows equals that row computed alone, bit for bit
    (row tiles of 1-4 and column tiles of 4/2/1 each take an element through the same operations)."""
    out_features, in_features = 66, 192
    operands, _, _ = _int4(out_features, in_features, 32, seed=7) if mode == "int4" else _int8(out_features,
                                                                                                 in_features, seed=7)
    x = torch.randn(11, in_features, generator=torch.Generator().manual_seed(8))
    alone = torch.cat([_run(kernel, mode, operands, 32, x[i:i + 1], None, out_features) for i in range(11)])
    for rows in range(1, 12):
        assert torch.equal(_run(kernel, mode, operands, 32, x[:rows], None, out_features), alone[:rows]), rows


def test_shapes_it_does_not_take_are_refused(built):
    x = torch.randn(1, 48)
    with pytest.raises(ValueError, match="multiple of 32"):
        built.int8(x, torch.zeros(4, 48, dtype=torch.int8), torch.ones(4), None, torch.empty(1, 4))
    with pytest.raises(ValueError, match="group 96"):
        built.int4(torch.randn(1, 192), torch.zeros(4, 96, dtype=torch.uint8), torch.ones(4, 2), torch.ones(4, 2), 96,
                   None, torch.empty(1, 4))
    assert quant.choose_kernel("int8", 16, 48, 0)[0] == "aten"  # the engine keeps aten's for such a shape


def test_quant_linear_on_the_native_kernel_matches_aten_s(built):
    """The same QuantLinear weights on both kernels: aten rounds x to bfloat16 (2^-9 relative),
    the native kernel does not, so they agree to about 2^-8 of sum |x w|, and the native one
    returns float32 in the engine's dtype."""
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(3))
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(4))
    for mode, (q, scales) in (("int8", quant.quantize_int8(w)), ("int4", quant.quantize_int4(w, 32))):
        group = 32 if mode == "int4" else 0
        ours = quant.QuantLinear(mode, q, scales, None, torch.float32, group, kernel="native")
        theirs = quant.QuantLinear(mode, q, scales, None, torch.float32, group, kernel="aten")
        assert ours.input_dtype == torch.float32 and ours.kernel.startswith(f"native-{mode}-{built.isa}")
        deq = quant.dequantize_int8(q, scales) if mode == "int8" else quant.dequantize_int4(q, scales, 32)
        magnitude = x.abs() @ deq.abs().T
        assert ((ours(x) - theirs(x)).abs() <= 2.0 ** -7 * magnitude).all(), mode
        assert ours(x).dtype == torch.float32


@pytest.mark.parametrize("choice", ["native", "native-a8", "aten"])
def test_kernel_choice_follows_the_environment(built, monkeypatch, choice):
    quant.choose_kernel.cache_clear()
    monkeypatch.setenv("TRILLM_QUANT_KERNEL", choice)
    try:
        assert quant.choose_kernel("int4", 64, 128, 32) == (choice, f"TRILLM_QUANT_KERNEL={choice}")
        monkeypatch.setenv("TRILLM_QUANT_KERNEL", "fastest")
        quant.choose_kernel.cache_clear()
        with pytest.raises(ValueError, match="TRILLM_QUANT_KERNEL"):
            quant.choose_kernel("int4", 64, 128, 32)
    finally:
        quant.choose_kernel.cache_clear()


def test_auto_choice_follows_the_table_and_measure_times_both(built, monkeypatch):
    """auto is the same choice at every load (no timing: the kernels round differently);
    measure times both and keeps the faster."""
    monkeypatch.delenv("TRILLM_QUANT_KERNEL", raising=False)
    quant.choose_kernel.cache_clear()
    try:
        for mode, group in (("int8", 0), ("int4", 32)):
            expected = quant.KERNEL_TABLE.get((mode, built.isa), ("aten",))[0]
            kernel, why = quant.choose_kernel(mode, 64, 128, group)
            assert kernel == expected and why.startswith("table: ")
        monkeypatch.setenv("TRILLM_QUANT_KERNEL", "measure")
        quant.choose_kernel.cache_clear()
        kernel, why = quant.choose_kernel("int8", 64, 128, 0)
        assert kernel in ("native", "native-a8", "aten") and why.startswith("measured at load (64x128, 1 row): native ")
        assert " vs native-a8 " in why and " vs aten " in why
        timings = dict(part.split(" ")[:2] for part in why.split(": ", 1)[1].split(" vs "))
        assert kernel == min(timings, key=lambda name: float(timings[name]))
    finally:
        quant.choose_kernel.cache_clear()


# ---- csrc/qmatmul_a8.cpp: the same weights against activations rounded to int8 ----------------

@pytest.fixture(scope="module")
def built_a8() -> native.QMatmulA8:
    found, why = native.load_qmatmul_a8()
    if found is None:
        pytest.skip(f"native kernels unavailable here ({why})")
    return found


@pytest.fixture(scope="module", params=["as-built", "avx2", "generic"])
def a8(request, built_a8, tmp_path_factory) -> native.QMatmulA8:
    """qmatmul_a8.cpp as built for this CPU, as its AVX2 path (built without AVX-512, where the CPU
    has AVX2 and FMA) and as its portable path (without AVX-512, AVX2 and FMA)."""
    if request.param == "as-built":
        return built_a8
    if request.param == "avx2" and not {"avx2", "fma"} <= set(cpuinfo_fields()[1]):
        pytest.skip("this CPU has no AVX2 and FMA")
    without = ("avx512f",) if request.param == "avx2" else ("avx512f", "avx2", "fma")
    kernel = native.QMatmulA8(build_generic("qmatmul_a8.cpp", tmp_path_factory.mktemp(request.param), without))
    assert kernel.isa == request.param
    return kernel


def _pair_order(in_features: int) -> torch.Tensor:
    """Index of the input at each position of the pair layout (qmatmul_a8.cpp)."""
    return quant.pack_pairs(torch.arange(in_features).reshape(1, -1))[0]


def _a8_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(xq [M, K] in input order, dx [M, K / 32]) by qmatmul_a8.cpp's rule, in torch: per block
    of 32, dx = max|x| / 127 and xq = round-half-even(x * (127 / max|x|))."""
    rows, in_features = x.shape
    blocks = x.reshape(rows, in_features // 32, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    inverse = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    return torch.round(blocks * inverse).reshape(rows, in_features), (amax / 127).reshape(rows, -1)


def _dequantized(xq: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    rows, in_features = xq.shape
    return (xq.double().reshape(rows, -1, 32) * dx.double()[..., None]).reshape(rows, in_features)


def test_a8_rounds_activations_by_its_rule(a8):
    """The kernel's int8 activations are the reference rule's integers, in the pair layout, on
    every path; within dx / 2 of x (plus dx's own float32 rounding); a block of zeros is zeros,
    and a block holding NaN or inf gets a NaN scale, so that it reaches the output."""
    x = torch.randn(3, 192, generator=torch.Generator().manual_seed(11)) * torch.logspace(-3, 2, 192)
    x[1, 32:64] = 0.0
    x[2, 64] = float("nan")
    x[2, 130] = float("inf")
    xq, dx = torch.empty(3, 192, dtype=torch.int8), torch.empty(3, 6)
    a8.quantize(x, xq, dx)
    finite = x.reshape(3, 6, 32).isfinite().all(-1)
    ref_q, ref_dx = _a8_reference(torch.where(x.isfinite(), x, torch.zeros_like(x)))
    positions = _pair_order(192)
    got_q = torch.empty_like(xq)
    got_q[:, positions] = xq  # back to input order
    in_finite_blocks = finite.repeat_interleave(32, 1)
    assert torch.equal(got_q.float()[in_finite_blocks], ref_q[in_finite_blocks])
    assert (got_q[~in_finite_blocks] == 0).all()
    assert torch.equal(dx[finite], ref_dx[finite]) and dx[~finite].isnan().all()
    assert (got_q[1, 32:64] == 0).all() and dx[1, 1] == 0
    error = (x.double() - _dequantized(got_q.float(), dx)).abs().reshape(3, 6, 32)[finite]
    assert (error <= dx.double()[finite][:, None] * (0.5 + 2.0 ** -20)).all()


@pytest.mark.parametrize(("mode", "group"), [("int8", 0), ("int4", 32), ("int4", 64), ("int4", 128)])
@pytest.mark.parametrize("rows", [1, 3, 4, 9])
def test_a8_equals_the_reference_on_its_int8_activations(a8, mode, group, rows):
    """Against deq(xq) @ deq(W).T + b in float64, xq by the reference rule. The integer sums are
    exact; per block, float32 rounds the scale products, the block's two terms and their
    accumulation (at most 5 roundings of terms bounded by sum_k |deq(xq)_k| parts_k), then at most
    K / 32 additions and the lane tree: |got - ref| <= (K / 32 + 9) u sum |deq(xq)| parts + u |b|,
    times 1.01. A wrong nibble, scale, group, layout or rounding rule errs far past this; the
    documented price of int8 activations, against the float32 matmul, is sum |x - deq(xq)| |w|."""
    out_features, in_features = 70, 256
    if mode == "int4":
        (packed, scale, zero), deq, parts = _int4(out_features, in_features, group, seed=rows)
        operands = (packed, scale, zero)
    else:
        (q, scale), deq, parts = _int8(out_features, in_features, seed=rows)
        operands = (quant.pack_pairs(q), scale)
    generator = torch.Generator().manual_seed(200 + rows)
    wide = torch.randn(rows, in_features + 24, generator=generator)
    x = wide[:, 8:8 + in_features]
    bias = torch.randn(out_features, generator=generator)
    y = torch.full((rows, out_features), float("nan"))
    if mode == "int4":
        a8.int4(x, *operands, group, bias, y)
    else:
        a8.int8(x, *operands, bias, y)
    xdeq = _dequantized(*_a8_reference(x))
    ref = xdeq @ deq.double().T + bias.double()
    tol = 1.01 * ((in_features / 32 + 9) * FP32_U * (xdeq.abs() @ parts.double().T) + FP32_U * bias.double().abs())
    assert ((y.double() - ref).abs() <= tol).all(), f"worst excess {((y.double() - ref).abs() - tol).max().item():.3g}"
    float_ref = x.double() @ deq.double().T + bias.double()
    price = (x.double() - xdeq).abs() @ deq.double().abs().T
    assert ((y.double() - float_ref).abs() <= 1.01 * price + tol).all()


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a8_rows_are_the_same_bits_whatever_shares_the_call(a8, mode):
    out_features, in_features = 66, 192
    if mode == "int4":
        operands, _, _ = _int4(out_features, in_features, 32, seed=7)
    else:
        (q, scale), _, _ = _int8(out_features, in_features, seed=7)
        operands = (quant.pack_pairs(q), scale)

    def run(x):
        y = torch.empty(x.shape[0], out_features)
        a8.int4(x, *operands, 32, None, y) if mode == "int4" else a8.int8(x, *operands, None, y)
        return y

    x = torch.randn(11, in_features, generator=torch.Generator().manual_seed(8))
    alone = torch.cat([run(x[i:i + 1]) for i in range(11)])
    for rows in range(1, 12):
        assert torch.equal(run(x[:rows]), alone[:rows]), rows


def test_a8_refuses_inputs_not_in_pairs_of_blocks(built_a8):
    with pytest.raises(ValueError, match="multiple of 64"):
        built_a8.int8(torch.randn(1, 96), torch.zeros(4, 96, dtype=torch.int8), torch.ones(4), None, torch.empty(1, 4))
    with pytest.raises(ValueError, match="multiple of 64"):
        built_a8.int4(torch.randn(1, 96), torch.zeros(4, 48, dtype=torch.uint8), torch.ones(4, 3), torch.ones(4, 3),
                      32, None, torch.empty(1, 4))
    w = torch.randn(16, 96)
    with pytest.raises(ValueError, match="divisible by 64"):
        quant.QuantLinear("int8", *quant.quantize_int8(w), None, torch.float32, 0, kernel="native-a8")


def test_quant_linear_on_the_a8_kernel_is_within_its_rounding_of_the_float_one(built, built_a8):
    """QuantLinear with kernel native-a8 (int8 weights re-laid in pairs, int4 as they are) against
    the float-activation native kernel: apart by at most the int8 activations' price."""
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(3))
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(4))
    xdeq = _dequantized(*_a8_reference(x))
    for mode, (q, scales) in (("int8", quant.quantize_int8(w)), ("int4", quant.quantize_int4(w, 32))):
        group = 32 if mode == "int4" else 0
        ours = quant.QuantLinear(mode, q, scales, None, torch.float32, group, kernel="native-a8")
        exact = quant.QuantLinear(mode, q, scales, None, torch.float32, group, kernel="native")
        assert ours.kernel.startswith(f"native-a8-{mode}-{built_a8.isa}") and ours.input_dtype == torch.float32
        deq = quant.dequantize_int8(q, scales) if mode == "int8" else quant.dequantize_int4(q, scales, 32)
        price = (x.double() - xdeq).abs() @ deq.double().abs().T
        magnitude = x.double().abs() @ deq.double().abs().T
        assert ((ours(x).double() - exact(x).double()).abs() <= 1.01 * price + 2.0 ** -16 * magnitude).all(), mode
        assert (ours(x) != exact(x)).any(), mode  # it is a different kernel, not the float one again
