"""Weight-only int8/int4 quantisation (trillm.engine.quant): error bounds, kernels, cache, engine."""

from __future__ import annotations

import math

import pytest
import torch

import engine_helpers as H
from trillm.engine import EngineConfig, quant
from trillm.engine.checkpoint import LlamaSpec, load_tensors, read_config
from trillm.engine.cpu import cpuinfo_fields
from trillm.engine.quant import (
    QuantLinear,
    dequantize_int4,
    dequantize_int8,
    pack_nibbles,
    quantize_int4,
    quantize_int8,
    unpack_nibbles,
)

pytestmark = pytest.mark.engine

# the native kernels' instruction set on this CPU, as their names carry it
_FLAGS = set(cpuinfo_fields()[1])
ISA = "avx512" if {"avx512f", "avx512bw"} <= _FLAGS else "avx2" if {"avx2", "fma"} <= _FLAGS else "generic"
A8_ISA = ("avx512-vnni" if {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= _FLAGS
          else "avx2" if {"avx2", "fma"} <= _FLAGS else "generic")
# Which kernel runs a matmul depends on the CPU (quant.choose_kernel), so any of these may.
INT8_KERNELS = ("aten-int8pack-bf16", f"native-int8-{ISA}", f"native-a8-int8-{A8_ISA}")
INT4_G32_KERNELS = ("aten-int4pack-bf16-g32", f"native-int4-{ISA}-g32", f"native-a8-int4-{A8_ISA}-g32")

BF16_UNIT_ROUNDOFF = 2.0 ** -9
FP32_UNIT_ROUNDOFF = 2.0 ** -24
# fp32 rounding of w / scale before round(): a weight at a half step may land either side.
DIVISION_SLACK = 1 + 4 * FP32_UNIT_ROUNDOFF


def weights(out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    """Gaussian rows at scales from 1e-3 to 1e3, one all-zero row, one constant row, one offset row."""
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=generator)
    w *= torch.logspace(-3, 3, out_features)[:, None]
    w[0] = 0.0
    w[1] = 0.25
    w[2] = w[2].abs() + 5.0  # a row of one sign: the asymmetric int4 grid must still cover it
    return w


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory):
    """Shapes every kernel takes (inputs 64/128: groups of 32 and 64; outputs multiples of 16)."""
    return H.make_random_llama(
        tmp_path_factory.mktemp("quant-llama"), vocab_size=256, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True, attention_bias=True,
    )


@pytest.fixture(autouse=True)
def quant_cache(tmp_path, monkeypatch):
    """Every test writes its quantisation cache under its own tmp dir, never under build/."""
    monkeypatch.setenv("TRILLM_HOME", str(tmp_path))
    return tmp_path / "build" / "quant"


# ---- the formats --------------------------------------------------------------------------


def test_int8_error_is_at_most_half_a_step():
    w = weights(64, 96)
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.bfloat16 and q.abs().max() <= 127
    error = (w - dequantize_int8(q, scale)).abs()
    assert (error <= scale.float()[:, None] / 2 * DIVISION_SLACK).all()
    assert (w[0] == dequantize_int8(q, scale)[0]).all()


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_error_is_at_most_half_a_step_plus_the_zero_rounding(group_size):
    """Half a step of the group's bfloat16 scale, plus how far rounding the zero to
    bfloat16 moved the grid (the grid is chosen first, the integers against it)."""
    w = weights(48, 256)
    q, scale_zero = quantize_int4(w, group_size)
    assert q.dtype == torch.uint8 and 0 <= q.min() and q.max() <= 15
    assert scale_zero.shape == (48, 256 // group_size, 2) and scale_zero.dtype == torch.bfloat16
    groups = w.double().reshape(48, -1, group_size)
    scale, zero = scale_zero.double().unbind(-1)
    zero_shift = (zero - (groups.amin(-1) + 8 * scale)).abs()
    bound = (scale / 2 * DIVISION_SLACK + zero_shift)[..., None]
    error = (groups - dequantize_int4(q, scale_zero, group_size).double().reshape(48, -1, group_size)).abs()
    assert (error <= bound).all()
    # The shift is the bfloat16 rounding of the zero, far below a step for zero-centred groups.
    assert (zero_shift[3:] <= scale[3:] * 0.5).all()


def test_int4_group_32_takes_back_a_q4_1_tensor_s_own_integers():
    """A llama.cpp Q4_1 block stores w = m + q * d (q in [0, 15], d and m in float16, the
    block's min at q = 0 and its max at q = 15); dequantised, then quantised here with
    groups of 32, it gets back exactly its q: the GGUF's own integers, not a second
    rounding. What moves is the scale and zero, rounded to bfloat16 for the kernel: the
    scale up by less than one bfloat16 ulp (2^-7 relative), and the zero, min + 8 scales,
    by 8 times that plus its own rounding to the nearest (2^-8 relative)."""
    generator = torch.Generator().manual_seed(5)
    out_features, in_features = 32, 128
    d = (torch.rand(out_features, in_features // 32, 1, generator=generator) * 0.1 + 1e-3).half().float()
    m = (-8 * d - torch.rand(out_features, in_features // 32, 1, generator=generator) * 0.01).half().float()
    q = torch.randint(0, 16, (out_features, in_features // 32, 32), generator=generator)
    q[..., 0], q[..., 1] = 0, 15  # llama.cpp maps a block's min to 0 and its max to 15
    w = (m + q * d).reshape(out_features, in_features)
    got, scale_zero = quantize_int4(w, 32)
    assert torch.equal(got.reshape(q.shape).long(), q)
    scale, zero = scale_zero.float().unbind(-1)
    assert ((scale[..., None] - d).abs() <= d * 2.0 ** -7).all()
    assert ((zero[..., None] - (m + 8 * d)).abs() <= 8 * d * 2.0 ** -7 + (m + 8 * d).abs() * 2.0 ** -8).all()


def test_nibbles_round_trip():
    q = torch.randint(0, 16, (32, 64), dtype=torch.uint8)
    packed = pack_nibbles(q)
    assert packed.shape == (32, 32)
    assert torch.equal(unpack_nibbles(packed), q)


# ---- the kernels ----------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "group_size"), [("int8", 0), ("int4", 32), ("int4", 64), ("int4", 128)])
@pytest.mark.parametrize("rows", [1, 5, 64])
def test_quantized_matmul_equals_the_dequantized_reference(mode, group_size, rows):
    """QuantLinear(x) against x @ deq(W).T + b in float64, with x rounded to bfloat16 as the kernel takes it.

    Tolerance, per output element y = sum_k x_k w_k: the result is rounded to
    bfloat16 (<= u |y|, u = 2^-9); a kernel may round each dequantised weight to
    bfloat16 before multiplying (<= u sum_k |x_k w_k|); float32 accumulation
    over K terms adds <= K 2^-24 sum_k |x_k w_k|. So
    |got - ref| <= u |ref| + (u + K 2^-24) sum_k |x_k w_k|, times 1.01 for the
    second-order terms. A wrong scale, zero, group or layout errs by the
    weights' own size, far past this.
    """
    out_features, in_features = 96, 256
    w = weights(out_features, in_features, seed=1) / 1e3 ** 0.5
    bias = torch.randn(out_features)
    if mode == "int8":
        q, scales = quantize_int8(w)
        deq = dequantize_int8(q, scales)
    else:
        q, scales = quantize_int4(w, group_size)
        deq = dequantize_int4(q, scales, group_size)
    linear = QuantLinear(mode, q, scales, bias, torch.float32, group_size)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(2))
    got = linear(x).double()
    xb = x.to(torch.bfloat16).double()
    ref = xb @ deq.double().T + bias.double()
    magnitude = xb.abs() @ deq.double().abs().T
    tol = 1.01 * (BF16_UNIT_ROUNDOFF * ref.abs()
                  + (BF16_UNIT_ROUNDOFF + in_features * FP32_UNIT_ROUNDOFF) * magnitude)
    assert got.dtype == torch.float64 and linear(x).dtype == torch.float32
    assert ((got - ref).abs() <= tol).all(), f"worst excess {((got - ref).abs() - tol).max().item():.3g}"
    # Bytes a matmul reads: int8 1 per weight + a bfloat16 scale per row; int4 half a byte per
    # weight + a bfloat16 scale and zero per group; the float32 bias.
    per_row = in_features + 2 if mode == "int8" else in_features // 2 + 4 * in_features // group_size
    assert linear.nbytes == out_features * (per_row + 4)


# ---- the engine ----------------------------------------------------------------------------


@pytest.mark.parametrize(("changes", "field"), [
    ({"quantization": "int3"}, "quantization"),
    ({"quantization": "fp8"}, "quantization"),
    ({"quant_group_size": 48}, "quant_group_size"),
    ({"quant_group_size": True}, "quant_group_size"),
])
def test_bad_config_values_are_named(small_llama, changes, field):
    with pytest.raises(ValueError, match=f"^{field}: "):
        EngineConfig(checkpoint_dir=str(small_llama), **changes).validate()


def test_shapes_the_int4_kernel_cannot_take_are_named(tmp_path):
    odd_inputs = H.make_random_llama(tmp_path / "a", vocab_size=256, hidden_size=96, intermediate_size=128,
                                     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(ValueError, match=r"^quant_group_size: 64 does not divide the 96 inputs of layers\.0\.qkv"):
        H.make_engine(odd_inputs, quantization="int4", quant_group_size=64, max_model_len=64)
    odd_outputs = H.make_random_llama(tmp_path / "b", vocab_size=256, hidden_size=64, intermediate_size=100,
                                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(ValueError, match=r"^quantization: int4 needs out_features divisible by 16; layers\.0\.gate_up has 200"):
        H.make_engine(odd_outputs, quantization="int4", max_model_len=64)


def test_an_int4_model_has_an_int8_lm_head(small_llama):
    engine = H.make_engine(small_llama, quantization="int4", max_model_len=64, max_num_seqs=2)
    try:
        assert engine.model.lm_head.mode == "int8" and engine.model.layers[0].down.mode == "int4"
        assert engine.model.lm_head.kernel in INT8_KERNELS
        assert engine.model.layers[0].down.kernel in INT4_G32_KERNELS
        assert engine.kernels["lm_head_kernel"] == engine.model.lm_head.kernel
        assert all(v.startswith(("native: ", "native-a8: ", "aten: ")) for v in engine.kernels["quant_kernels"].values())
    finally:
        engine.shutdown()


def _greedy_run(engine, prompt_list, max_tokens):
    results = H.run_alone(engine, H.requests(prompt_list, H.greedy(max_tokens)))
    return [results[f"r{i}"] for i in range(len(prompt_list))]


def test_cache_round_trip(small_llama, quant_cache):
    """The second engine loads the first one's quantisation and computes the same bits."""
    prompt_list = H.prompts(3, [5, 9], 256)
    first = H.make_engine(small_llama, quantization="int4", max_model_len=128, max_num_seqs=4)
    try:
        assert first.stats()["quantization"]["from_cache"] is False
        expected = _greedy_run(first, prompt_list, 6)
    finally:
        first.shutdown()
    (cached,) = quant_cache.iterdir()
    assert cached.name.endswith("-int4-g32-v2") and (cached / "weights.safetensors").is_file()
    second = H.make_engine(small_llama, quantization="int4", max_model_len=128, max_num_seqs=4)
    try:
        assert second.stats()["quantization"]["from_cache"] is True
        # The kernels crash on weights that are not 64-byte aligned (a view of the cache file).
        assert all(t.data_ptr() % 64 == 0 for lin in [second.model.lm_head, second.model.layers[0].qkv]
                   for t in (lin.weight, lin.scales))
        got = _greedy_run(second, prompt_list, 6)
        assert [r.tokens for r in got] == [r.tokens for r in expected]
        assert [r.log_probs for r in got] == [r.log_probs for r in expected]
    finally:
        second.shutdown()
    other_group = H.make_engine(small_llama, quantization="int4", quant_group_size=64, max_model_len=128,
                                max_num_seqs=4)
    other_group.shutdown()
    assert len(list(quant_cache.iterdir())) == 2  # the key has the group size


@pytest.mark.parametrize("kernel", ["auto", "native-a8"])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_batch_invariance_is_as_the_engine_reports(small_llama, mode, kernel, monkeypatch):
    """The probe's claim, checked: when the engine says batch-invariant, a request's
    tokens and log-probs are bit for bit the same alone and batched; when it says
    not, some matmul has no row padding that makes it so."""
    # No prefix cache: the batched run would hit the alone runs' blocks and compute the
    # prompts' tails on their own, which rounds differently in a bfloat16 KV cache.
    # native-a8 (int8 activations) is what the table picks on AVX2 CPUs: run it on every CPU.
    monkeypatch.setenv("TRILLM_QUANT_KERNEL", kernel)
    quant.choose_kernel.cache_clear()
    try:
        engine = H.make_engine(small_llama, quantization=mode, max_model_len=128, max_num_seqs=6,
                               enable_prefix_caching=False)
    finally:
        quant.choose_kernel.cache_clear()
    try:
        kernels = engine.kernels
        assert kernels["linear_kernel"] == engine.model.layers[0].qkv.kernel
        assert kernels["linear_kernel"] in (INT8_KERNELS if mode == "int8" else INT4_G32_KERNELS)
        if kernel == "native-a8":
            assert kernels["linear_kernel"].startswith(f"native-a8-{mode}-")
        assert engine.stats()["quantization"]["mode"] == mode
        if not kernels["batch_invariant"]:
            assert None in kernels["row_multiples"].values()
            return
        prompt_list = H.prompts(4, [3, 17, 8, 30, 1, 12], 256)
        alone = _greedy_run(engine, prompt_list, 8)
        together = H.run(engine, H.requests(prompt_list, H.greedy(8)))
        for i, result in enumerate(alone):
            assert together[f"r{i}"].tokens == result.tokens, i
            assert together[f"r{i}"].log_probs == result.log_probs, i
    finally:
        engine.shutdown()


def int8_logit_error(checkpoint) -> float:
    """Bound on an int8 logit's error relative to the step's largest |logit|.

    Per matmul: a weight's error is uniform within half a step, scale/2 with
    scale = max|w_row| / 127, so a dot product over K random-sign terms errs
    by about sqrt(K) * scale / sqrt(12) * rms(x) against an output of
    sqrt(K) * rms(w_row) * rms(x): relative rho / (127 sqrt(12)), rho =
    max|w_row| / rms(w_row) (the checkpoint's largest); the bfloat16 input and
    output roundings add 2 * 2^-9. These independent errors add in quadrature
    over the 4 * layers + 1 matmuls from the embedding to a logit, like
    engine_helpers.fp32_logit_error's. On the demo model this gives 0.09; the
    largest error measured there is 0.04.
    """
    spec = LlamaSpec.from_config(read_config(checkpoint))
    rho = max((w.abs().amax(1) / w.pow(2).mean(1).sqrt().clamp(min=1e-30)).max().item()
              for name, w in load_tensors(checkpoint, torch.float32).items()
              if w.dim() == 2 and "embed" not in name)
    per_matmul = rho / (127 * math.sqrt(12)) + 2 * BF16_UNIT_ROUNDOFF
    return per_matmul * math.sqrt(4 * spec.num_layers + 1)


def test_int8_greedy_equals_fp32_where_the_margin_is_clear(demo_checkpoint):
    """The demo model's fp32 next token (transformers) after each of many prompts against
    the int8 engine's: wherever the reference's top-2 margin exceeds twice the int8 logit
    error bound (int8_logit_error), the token must be the same and its log-prob within
    twice the bound. The demo model is random, so few of its steps are clear: hence many
    short prompts, one token each."""
    model = H.load_hf(demo_checkpoint)
    spec = LlamaSpec.from_config(read_config(demo_checkpoint))
    rel = int8_logit_error(demo_checkpoint)
    prompt_list = H.prompts(11, [6] * 384, spec.vocab_size)
    with torch.no_grad(), H.torch_threads(1):
        logits = model(torch.tensor(prompt_list)).logits[:, -1].float()
    del model
    top2 = logits.topk(2, -1)
    margins = top2.values[:, 0] - top2.values[:, 1]
    errors = rel * logits.abs().amax(-1)
    clear = [i for i in range(len(prompt_list)) if margins[i] > 2 * errors[i]]
    assert clear, "no clear-margin prompt: the test would check nothing"
    engine = H.make_engine(demo_checkpoint, quantization="int8", max_model_len=64, max_num_seqs=32,
                           max_num_batched_tokens=64)
    try:
        got = H.run(engine, H.requests([prompt_list[i] for i in clear], H.greedy(1)))
    finally:
        engine.shutdown()
    log_probs = torch.log_softmax(logits, -1)
    for n, i in enumerate(clear):
        result = got[f"r{n}"]
        assert result.tokens == [top2.indices[i, 0].item()], f"prompt {i}: margin {margins[i]:.3g}"
        expected = log_probs[i, top2.indices[i, 0]].item()
        assert abs(result.log_probs[0] - expected) <= 2 * errors[i], f"prompt {i}: log-prob"
