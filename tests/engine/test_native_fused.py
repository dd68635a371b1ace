"""The native fused row-wise ops (csrc/fused.cpp, native.Fused): the eager arithmetic within derived bounds,
batch-invariant, writing only what they own; and the model and engine with them on and off.

Each op is called through ``native.Fused`` (the wrapper ``LlamaModel._forward_fused`` uses) and compared with
the eager functions the model uses without it: ``llama.rms_norm``, ``rope.apply_rope`` on
``rope.cos_sin_tables``, and ``F.silu(g) * u``. bfloat16 inputs are exact in float32, so both sides see the
same values; a bfloat16 output is checked twice: bitwise, as the kernel's float32 result rounded by torch
(the kernel rounds to nearest even, as torch does), and within one bfloat16 ulp of the eager result.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from engine_helpers import greedy, make_engine, prompts, requests, run, torch_threads
from test_native_attention import DTYPES, FP32_U, fresh_load  # noqa: F401 (fresh_load: a fixture)
from trillm.engine import native
from trillm.engine.attention import AttentionMetadata, SequenceAttention
from trillm.engine.checkpoint import LlamaSpec
from trillm.engine.kv_cache import KVCache
from trillm.engine.llama import rms_norm
from trillm.engine.rope import apply_rope, cos_sin_tables

pytestmark = pytest.mark.engine



def DTYPE_IDS(dtype: torch.dtype | None) -> str:
    return str(dtype).removeprefix("torch.") if dtype is not None else "no-delta"

BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16}


@pytest.fixture(scope="module")
def fused() -> native.Fused:
    found, why = native.load_fused()
    if found is None:
        pytest.skip(f"native fused ops unavailable here ({why}); the engine runs the eager ops")
    return found


def _randn(*shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(BITS[t.dtype])


def _bf16_ulp(t: torch.Tensor) -> torch.Tensor:
    """One bfloat16 ulp at |t| (float64): 2^(e - 8) for |t| in [2^(e-1), 2^e); the smallest normal's below."""
    _, e = torch.frexp(t.double().abs().clamp_min(2.0 ** -126))
    return torch.ldexp(torch.ones_like(t, dtype=torch.float64), e - 8)


def _assert_within_one_bf16_ulp(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """got, ref bfloat16: equal, or neighbours (one rounding each of float32 values closer than an ulp)."""
    g, r = got.double(), ref.double()
    ulp = _bf16_ulp(torch.maximum(g.abs(), r.abs()))
    err = (g - r).abs()
    assert (err <= ulp).all(), f"{what}: {err.max().item():.3g} apart, over one bfloat16 ulp"


# ---- add_rms_norm -------------------------------------------------------------------------------

def _rms_tolerance(ref: torch.Tensor, n: int) -> torch.Tensor:
    """Elementwise bound on |kernel - eager| for float32 RMSNorm rows of n (u = 2^-24).

    Both compute y_k = h_k * r * w_k, r = 1 / sqrt(sum(h^2) / n + eps), in float32, the sums in different
    orders (the kernel: 16 lanes then a tree; torch: its own blocking). Each sum of n positive terms has
    relative rounding error with random signs, of order sqrt(n) u (the worst case, about n u, needs every
    rounding one way); r halves that (the square root) and adds 3 roundings (divide, sqrt, reciprocal; or
    torch's rsqrt); the two products add 2. So the two differ by at most (2 sqrt(n) + 10) u relative,
    i.e. a few ulp times sqrt(n) for the sums plus a few for the rest; that is 2.9e-6 at n = 2048,
    while a skipped element, eps or weight misses by 1/n or more.
    """
    return ref.double().abs() * (2 * math.sqrt(n) + 10) * FP32_U


RMS_WIDTHS = [7, 100, 257, 2048 + 13]  # none but 2048 + 13's bulk a multiple of 16


@pytest.mark.parametrize("x_dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("delta_dtype", [None, torch.float32, torch.bfloat16], ids=DTYPE_IDS)
@pytest.mark.parametrize("n", RMS_WIDTHS)
def test_add_rms_norm_matches_eager(fused, n, delta_dtype, x_dtype):
    rows, eps = 11, 1e-5
    hidden = _randn(rows, n, seed=n, scale=3.0)
    hidden[3] *= 1e-3  # a row of small values: eps matters there
    weight = 1 + _randn(n, seed=n + 1, scale=0.2)
    delta = None if delta_dtype is None else _randn(rows, n, seed=n + 2).to(delta_dtype)
    expected_hidden = hidden.clone() if delta is None else hidden + delta.float()
    ref32 = rms_norm(expected_hidden, weight, eps)  # float32, as the eager forward feeds a matmul

    x = torch.full((rows, n), math.nan, dtype=x_dtype)
    got_hidden = hidden.clone()
    fused.add_rms_norm(got_hidden, delta, weight, eps, x)
    assert torch.equal(_bits(got_hidden), _bits(expected_hidden)), "hidden is not float32 hidden + float(delta)"

    x32 = torch.full((rows, n), math.nan)
    fused.add_rms_norm(hidden.clone(), delta, weight, eps, x32)
    err = (x32.double() - ref32.double()).abs()
    tol = _rms_tolerance(ref32, n)
    assert torch.isfinite(x32).all()
    assert (err <= tol).all(), f"error {err.max().item():.3g} over bound {tol.flatten()[err.flatten().argmax()]:.3g}"
    assert tol.max() < 1e-4 * ref32.abs().max()  # not vacuous
    if x_dtype == torch.bfloat16:
        assert torch.equal(_bits(x), _bits(x32.to(torch.bfloat16)))
        _assert_within_one_bf16_ulp(x, ref32.to(torch.bfloat16), f"n {n}")
    else:
        assert torch.equal(_bits(x), _bits(x32))


@pytest.mark.parametrize("x_dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n", [100, 2048 + 13])
def test_add_rms_norm_is_batch_invariant(fused, n, x_dtype):
    """A row's bits (x and the updated hidden) are the same alone as among 12 (the parallel path), and on 1 thread."""
    rows, eps = 12, 1e-6
    hidden = _randn(rows, n, seed=5, scale=2.0)
    delta = _randn(rows, n, seed=6).to(torch.bfloat16)
    weight = 1 + _randn(n, seed=7, scale=0.1)

    def norm(h: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = h.clone()
        x = torch.empty(h.shape, dtype=x_dtype)
        fused.add_rms_norm(h, d, weight, eps, x)
        return _bits(h), _bits(x)

    together = norm(hidden, delta)
    with torch_threads(1):
        one_thread = norm(hidden, delta)
    reversed_rows = norm(hidden.flip(0), delta.flip(0))
    for r in range(rows):
        alone = norm(hidden[r:r + 1], delta[r:r + 1])
        for name, part in (("together", together), ("one thread", one_thread)):
            assert torch.equal(part[0][r], alone[0][0]) and torch.equal(part[1][r], alone[1][0]), f"row {r} {name}"
        assert torch.equal(reversed_rows[1][rows - 1 - r], alone[1][0]), f"row {r} at {rows - 1 - r}"


# ---- rope_split ---------------------------------------------------------------------------------

ROPE_SHAPES = [(9, 3, 64), (4, 4, 16), (8, 2, 128)]
MAX_POSITIONS = 8192


def _spec(heads: int, kv_heads: int, d: int) -> LlamaSpec:
    return LlamaSpec.from_config({
        "model_type": "llama", "vocab_size": 64, "hidden_size": heads * d, "intermediate_size": 64,
        "num_hidden_layers": 1, "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": d,
        "rope_theta": 500000.0, "max_position_embeddings": MAX_POSITIONS,
    })


def _rope_tolerance(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Bound on |kernel - apply_rope| per element of x [rows, heads, d] (float32 values).

    Each output is a * c + b * s (b the other half's element). torch rounds both products and the sum
    (3 roundings); the kernel the same, or one fused multiply-add when the compiler contracts it
    (-march=native): each is within 2 u (|a c| + |b s|) (+ u^2 terms) of the exact value, so the two
    differ by at most 4 u (|a c| + |b s|); 4.5 u covers the second-order terms.
    """
    swapped = x.roll(x.shape[-1] // 2, -1)
    return 4.5 * FP32_U * ((x * cos).abs() + (swapped * sin).abs()).double()


@pytest.mark.parametrize("kv_dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("qkv_dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("heads,kv_heads,d", ROPE_SHAPES, ids=lambda x: str(x))
def test_rope_split_matches_apply_rope_and_writes_only_its_slots(fused, heads, kv_heads, d, qkv_dtype, kv_dtype):
    rows, blocks, block_size = 13, 6, 16
    generator = torch.Generator().manual_seed(heads * d)
    cos, sin = cos_sin_tables(_spec(heads, kv_heads, d), MAX_POSITIONS, torch.float32)
    positions = torch.randint(0, MAX_POSITIONS, (rows,), generator=generator)
    positions[:3] = torch.tensor([0, MAX_POSITIONS - 1, 1])
    slots = torch.randperm(blocks * block_size, generator=generator)[:rows]
    width = (heads + 2 * kv_heads) * d
    qkv = torch.randn(rows, width, generator=generator).mul_(2).to(qkv_dtype)
    q = torch.full((rows, heads, d), math.nan, dtype=kv_dtype)
    k = torch.full((rows, kv_heads, d), math.nan, dtype=kv_dtype)
    v = torch.full_like(k, math.nan)
    k_cache = torch.full((blocks, block_size, kv_heads, d), math.nan, dtype=kv_dtype)
    v_cache = torch.full_like(k_cache, math.nan)
    fused.rope_split(qkv, cos, sin, positions, slots, q, k, v, k_cache, v_cache)

    # eager: LlamaModel.forward's arithmetic on the same values
    x = qkv.float()
    c, s = cos[positions][:, None], sin[positions][:, None]
    qk_in = x[:, :(heads + kv_heads) * d].view(rows, heads + kv_heads, d)
    ref = apply_rope(qk_in, c, s)  # float32
    ref_v = x[:, (heads + kv_heads) * d:].view(rows, kv_heads, d)
    tol = _rope_tolerance(qk_in, c, s)
    got = torch.cat([q, k], dim=1)
    assert torch.isfinite(got).all()
    if kv_dtype == torch.float32:
        err = (got.double() - ref.double()).abs()
        worst = err.flatten().argmax()
        assert (err <= tol).all(), f"error {err.max().item():.3g} over bound {tol.flatten()[worst]:.3g}"
        assert tol.max() < 1e-5 * ref.abs().max()  # not vacuous: a wrong position or half misses by O(|x|)
    else:
        _assert_within_one_bf16_ulp(got, ref.to(kv_dtype), "q, k")
        q32 = torch.empty(rows, heads, d)
        k32, v32 = torch.empty(rows, kv_heads, d), torch.empty(rows, kv_heads, d)
        fused.rope_split(qkv, cos, sin, positions, slots, q32, k32, v32, torch.empty(k_cache.shape),
                         torch.empty(v_cache.shape))
        assert torch.equal(_bits(q), _bits(q32.to(kv_dtype))) and torch.equal(_bits(k), _bits(k32.to(kv_dtype)))
    assert torch.equal(_bits(v), _bits(ref_v.to(kv_dtype))), "v is not a copy"

    # the caches: k and v at each row's slot, bit for bit; every other slot still NaN
    for cache, out in ((k_cache, k), (v_cache, v)):
        flat = cache.view(-1, kv_heads, d)
        assert torch.equal(_bits(flat[slots]), _bits(out))
        untouched = torch.ones(flat.shape[0], dtype=torch.bool)
        untouched[slots] = False
        assert flat[untouched].isnan().all(), "wrote a slot no row owns"


def test_rope_split_position_zero_is_the_identity(fused):
    """cos 1, sin 0 at position 0: q and k come out as they went in (float32)."""
    heads, kv_heads, d = 4, 4, 16
    cos, sin = cos_sin_tables(_spec(heads, kv_heads, d), 16, torch.float32)
    qkv = _randn(3, (heads + 2 * kv_heads) * d, seed=9)
    q, k, v = torch.empty(3, heads, d), torch.empty(3, kv_heads, d), torch.empty(3, kv_heads, d)
    cache = torch.empty(4, kv_heads, d)
    fused.rope_split(qkv, cos, sin, torch.zeros(3, dtype=torch.int64), torch.arange(3), q, k, v, cache, cache.clone())
    assert torch.equal(torch.cat([q, k, v], dim=1).view(3, -1), qkv)


# ---- silu_mul -----------------------------------------------------------------------------------

EXP_CLAMP = 88.0  # fused.cpp's exp_f32 clamps its argument to [-87, 88]


def _silu_tolerance(g: torch.Tensor, u: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Bound on |kernel - float64 silu(g) * u| (g, u the float32 values; u = 2^-24).

    The kernel computes g / (1 + E) * u with E = exp_f32(-g):
    * E within 2 ulp (<= 4 u relative) of exp(-g) while -g is in [-87, 88]; 1 + E rounds (u) and
      inherits at most E / (1 + E) of E's error (<= 4 u); the division and the product round (2 u):
      7 u relative, 8 u with the second-order terms;
    * g > 87: E is exp(-87) instead of exp(-g), both far below 1's half ulp: 1 + E is 1 either way;
    * g < -88: E saturates at exp(88) (no overflow to inf), so the result is g u / (1 + e^88)
      instead of about g u e^g: off by up to |g u| / (1 + e^88) (about 6e-39 |g u|), absolutely, and
      that value itself carries the 8 u above (the kernel's result is almost all of it there);
    * results under float32's normal range (|ref| < 2^-126) round absolutely: 2^-149 each, 3 roundings.
    """
    gd, ud = g.double(), u.double()
    saturated = torch.where(gd < -EXP_CLAMP, (gd * ud).abs() / (1 + math.exp(EXP_CLAMP)), torch.zeros_like(gd))
    return 8 * FP32_U * (ref.abs() + saturated) + saturated + 3 * 2.0 ** -149


def _silu_reference(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    gd = g.double()
    return gd / (1 + torch.exp(-gd)) * u.double()  # F.silu in float64, spelled out


def _silu_cases(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """gate_up [rows, 2 n]: typical gates, gates up to |100| (past exp's saturation both ways), edges, zeros."""
    generator = torch.Generator().manual_seed(seed)
    typical = 3 * torch.randn(2, n, generator=generator)
    extreme = (torch.rand(2, n, generator=generator) * 200 - 100)
    edges = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 86.9, 87.0, 87.1, 88.0, 88.5, 88.8, 89.0, 100.0,
                          -86.9, -87.0, -87.1, -88.0, -88.5, -88.8, -89.0, -100.0, 20.0, -20.0, 16.6, -16.6])
    edge_row = torch.cat([edges, 3 * torch.randn(n - len(edges), generator=generator)])[None]
    gates = torch.cat([typical, extreme, edge_row])
    ups = torch.randn(gates.shape, generator=generator) * 4
    ups[-1, :2] = 0  # silu(0) * 0
    return torch.cat([gates, ups], dim=1).to(dtype)


@pytest.mark.parametrize("x_dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("in_dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n", [64, 1000])
def test_silu_mul_matches_float64_within_bound(fused, n, in_dtype, x_dtype):
    gate_up = _silu_cases(n, in_dtype, seed=n)
    rows = gate_up.shape[0]
    g, u = gate_up.float()[:, :n], gate_up.float()[:, n:]
    ref = _silu_reference(g, u)
    x32 = torch.full((rows, n), math.nan)
    fused.silu_mul(gate_up, x32)
    tol = _silu_tolerance(g, u, ref)
    err = (x32.double() - ref).abs()
    assert torch.isfinite(x32).all()
    assert (err <= tol).all(), (f"error {err.max().item():.3g} at g = {g.flatten()[err.flatten().argmax()].item()} "
                                f"over bound {tol.flatten()[err.flatten().argmax()]:.3g}")
    mid = g.abs() < 80
    assert (tol[mid] <= 1e-6 * ref[mid].abs() + 1e-40).all()  # not vacuous
    if x_dtype == torch.bfloat16:
        x = torch.full((rows, n), math.nan, dtype=x_dtype)
        fused.silu_mul(gate_up, x)
        assert torch.equal(_bits(x), _bits(x32.to(torch.bfloat16)))
        eager = (F.silu(g) * u).to(torch.bfloat16)  # the eager forward, rounded into a bfloat16 matmul input
        _assert_within_one_bf16_ulp(x[mid], eager[mid], "silu * up")


def test_silu_mul_is_batch_invariant(fused):
    n = 1000
    gate_up = _silu_cases(n, torch.float32, seed=3)
    together = torch.empty(gate_up.shape[0] * 3, n)
    stacked = gate_up.repeat(3, 1)  # 15 rows: the parallel path
    fused.silu_mul(stacked, together)
    for r in range(stacked.shape[0]):
        alone = torch.empty(1, n)
        fused.silu_mul(stacked[r:r + 1].contiguous(), alone)
        assert torch.equal(_bits(together[r]), _bits(alone[0])), f"row {r}"


# ---- the model and the engine -------------------------------------------------------------------

@pytest.fixture(scope="module")
def fused_engine(fused, demo_checkpoint):
    engine = make_engine(demo_checkpoint, dtype="float32", max_model_len=1024, enable_prefix_caching=False)
    yield engine
    engine.shutdown()


def _forward_both(model, kv_heads: int, d: int, layers: int, lengths: list[int]):
    """Prefill of two sequences, then one decode of each over the cache, with the fused ops and with
    the eager ones (model.fused = None), each into its own NaN-filled cache: (hidden, caches) per mode."""
    block_size, blocks = 16, 64
    vocab = model.spec.vocab_size
    ids = prompts(11, lengths, vocab)
    tables, next_block = [], 0
    for n in lengths:
        count = -(-(n + 1) // block_size)
        tables.append(list(range(next_block + count - 1, next_block - 1, -1)))  # blocks in reverse: scattered
        next_block += count

    def slot(s: int, p: int) -> int:
        return tables[s][p // block_size] * block_size + p % block_size

    prefill_sequences, row = [], 0
    for s, n in enumerate(lengths):
        prefill_sequences.append(SequenceAttention(row, row + n, n, None, None, True, None))
        row += n
    prefill = (torch.tensor([t for p in ids for t in p]), torch.tensor([p for n in lengths for p in range(n)]),
               AttentionMetadata(torch.tensor([slot(s, p) for s, n in enumerate(lengths) for p in range(n)]),
                                 prefill_sequences, 0))
    decode = (torch.tensor([p[-1] for p in ids]), torch.tensor(lengths),
              AttentionMetadata(torch.tensor([slot(s, n) for s, n in enumerate(lengths)]),
                                [SequenceAttention(s, s + 1, n + 1, None, torch.tensor(tables[s]), False, None)
                                 for s, n in enumerate(lengths)], 0))
    kept = model.fused
    out = {}
    try:
        for mode in ("fused", "eager"):
            model.fused = kept if mode == "fused" else None
            cache = KVCache(layers, blocks, block_size, kv_heads, d, torch.float32)
            cache.k.fill_(math.nan)
            cache.v.fill_(math.nan)
            hidden = [model.forward(*step, cache).clone() for step in (prefill, decode)]
            out[mode] = (hidden, cache)
    finally:
        model.fused = kept
    return out


def test_model_forward_fused_and_eager_agree(fused_engine):
    """float32: the same hidden states (prefill and a decode over the cache the fused RoPE wrote) and the
    same caches, up to float32 reassociation (the norms' sums, a contracted RoPE multiply-add), which the
    layers carry along: within 1e-4 of the states' scale, about 1700 u; a wrong row, slot or head misses by O(1)."""
    model = fused_engine.model
    spec = model.spec
    assert model.fused is not None
    out = _forward_both(model, spec.num_kv_heads, spec.head_dim, spec.num_layers, [5, 37])
    (fused_hidden, fused_cache), (eager_hidden, eager_cache) = out["fused"], out["eager"]
    for step, (a, b) in enumerate(zip(fused_hidden, eager_hidden)):
        scale = b.abs().amax(dim=-1, keepdim=True)
        err = ((a - b).abs() / scale).max().item()
        assert torch.isfinite(a).all() and err <= 1e-4, f"step {step}: relative difference {err:.3g}"
    for name in ("k", "v"):
        a, b = getattr(fused_cache, name), getattr(eager_cache, name)
        assert torch.equal(a.isnan(), b.isnan()), f"{name} cache: written at different slots"
        written = ~a.isnan()
        assert written.any()
        err = (a[written] - b[written]).abs().max().item()
        assert err <= 1e-4 * b[written].abs().max().item(), f"{name} cache differs by {err:.3g}"


def test_engine_reports_fused_row_ops(fused_engine):
    kernels = fused_engine.stats()["kernels"]
    assert kernels["fused_row_ops"] is True
    assert kernels["fused_row_ops_reason"] == "native kernels built for this CPU"


def test_trillm_native_0_runs_the_eager_ops(demo_checkpoint, monkeypatch, fresh_load):
    monkeypatch.setenv("TRILLM_NATIVE", "0")
    engine = make_engine(demo_checkpoint, dtype="float32", max_model_len=1024, enable_prefix_caching=False)
    try:
        kernels = engine.stats()["kernels"]
        assert kernels["fused_row_ops"] is False
        assert kernels["fused_row_ops_reason"] == "disabled by TRILLM_NATIVE=0"
        assert kernels["decode_attention"] == "sdpa-loop"
        assert engine.model.fused is None
        results = run(engine, requests(prompts(12, [9, 40], engine.vocab_size), greedy(6)))
        assert all(len(r.tokens) == 6 and r.finished for r in results.values())
    finally:
        engine.shutdown()
