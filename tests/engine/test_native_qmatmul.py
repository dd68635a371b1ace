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


@pytest.mark.parametrize("choice", ["native", "aten"])
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
        assert kernel in ("native", "aten") and why.startswith("measured at load (64x128, 1 row): native ")
        timings = dict(part.split(" ")[:2] for part in why.split(": ", 1)[1].split(" vs "))
        assert kernel == min(timings, key=lambda name: float(timings[name]))
    finally:
        quant.choose_kernel.cache_clear()
