"""The native decode-attention kernel (csrc/paged_decode.cpp): exact enough, batch-invariant, and the engine's choice.

Kernel tests call it through ``attention._native_decode`` (the engine's wrapper)
on caches filled with NaN wherever no key was written, so a read past a
sequence's length or outside its block table shows up as NaN in its output.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from engine_helpers import (Collector, assert_matches_reference, build_generic, greedy, hf_greedy, load_hf,
                            make_engine, prompts, requests, run, torch_threads)
from trillm.engine import native
from trillm.engine.attention import DecodeBatch, _native_decode

pytestmark = pytest.mark.engine

# (heads, kv_heads, head_dim): d 64 and 128 take the AVX-512 path where the CPU has AVX-512F, with 3,
# 4, 2 and 1 query heads of a KV head taken together for the first four; 80 (5 x 16 lanes) and 40
# (2 x 16 lanes + a remainder of 8) take the generic path everywhere.
SHAPES = [(9, 3, 64), (8, 2, 64), (8, 2, 128), (6, 2, 128), (4, 4, 80), (6, 2, 40)]
DTYPES = [torch.float32, torch.bfloat16]
FP32_U = 2.0 ** -24  # unit roundoff of float32 (24-bit significand)
BF16_U = 2.0 ** -8  # and of bfloat16 (8-bit significand)
SENTINEL = 7.0  # what the kernel must leave alone: output padding


@pytest.fixture(scope="module")
def kernel() -> native.PagedDecode:
    found, why = native.load()
    if found is None:
        pytest.skip(f"native decode kernel unavailable here ({why}); the engine uses the SDPA loop")
    return found


@pytest.fixture(scope="module")
def generic_kernel(kernel, tmp_path_factory) -> native.PagedDecode:
    """The decode kernel built without AVX-512 (its generic path for every head_dim), as on a CPU without it."""
    path = build_generic("paged_decode.cpp", tmp_path_factory.mktemp("generic"))
    return native.PagedDecode(path)


@pytest.fixture(scope="module", params=["as-built", "generic"])
def any_kernel(request, kernel) -> native.PagedDecode:
    """The kernel as the engine builds it (AVX-512 paths for d 64 and 128 where the CPU has AVX-512F),
    and its generic path."""
    return kernel if request.param == "as-built" else request.getfixturevalue("generic_kernel")


def _paged_case(lengths: list[int], kv_heads: int, d: int, block_size: int, dtype: torch.dtype, seed: int):
    """Caches [blocks, block_size, kv_heads, d] holding each sequence's keys in randomly scattered blocks
    (NaN everywhere else, the tail of each last block included) and the tables [n, max_blocks] (padded with 0)."""
    generator = torch.Generator().manual_seed(seed)
    needed = [-(-n // block_size) for n in lengths]
    num_blocks = sum(needed) + 3  # a few blocks nobody owns
    k_cache = torch.full((num_blocks, block_size, kv_heads, d), math.nan, dtype=dtype)
    v_cache = torch.full_like(k_cache, math.nan)
    order = torch.randperm(num_blocks, generator=generator).tolist()
    tables = torch.zeros(len(lengths), max(needed), dtype=torch.int32)
    keys, values = [], []
    for s, (length, count) in enumerate(zip(lengths, needed)):
        blocks, order = order[:count], order[count:]
        tables[s, :count] = torch.tensor(blocks, dtype=torch.int32)
        # scores of about 2 sigma: softmaxes neither flat nor one-hot
        k = (2 * torch.randn(length, kv_heads, d, generator=generator)).to(dtype)
        v = torch.randn(length, kv_heads, d, generator=generator).to(dtype)
        for i, block in enumerate(blocks):
            part = slice(i * block_size, min((i + 1) * block_size, length))
            k_cache[block, :part.stop - part.start] = k[part]
            v_cache[block, :part.stop - part.start] = v[part]
        keys.append(k)
        values.append(v)
    return k_cache, v_cache, tables, keys, values


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """float64 SDPA of one query row q [heads, d] over k, v [len, kv_heads, d]: [heads, d]."""
    heads = q.shape[0]
    o = F.scaled_dot_product_attention(q.double()[None, :, None], k.double().transpose(0, 1)[None],
                                       v.double().transpose(0, 1)[None], enable_gqa=heads != k.shape[1])
    return o[0, :, 0]


def _tolerance(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Elementwise bound on |kernel - float64 reference| for one sequence: [heads, d].

    The inputs are the same bits for both (bfloat16 values are exact in
    float32), so only the kernel's float32 arithmetic and its output rounding
    count. First-order worst-case bounds (u = 2^-24), per query head with
    S = scale * max_t sum_i |q_i k_ti| (bounds |score|) and V = max |v| of its KV head:
    * a score is a rounded q * scale dotted with k: error <= (d + 1) u S;
      exp(s - max) adds 2 u S (the subtraction) and 4 u (2 ulp): each weight
      is off by at most a factor 1 + (d + 3) u S + 4 u, and perturbing
      weights by relative e moves a convex combination of V by <= 2 e V;
    * the sum of L weights, its reciprocal and the final product: (L + 1) u V;
      the L-term weighted sum of V: (L + 1) u V.
    Total: V u (2 (d + 4) S + 2 L + 8). A bfloat16 output then rounds to
    8 significant bits: 2^-8 (|ref| + that). Typical errors are far smaller
    (about sqrt(L) u V), but a wrong key, head or block misses by O(V / L).
    """
    heads, d = q.shape
    group = heads // k.shape[1]
    length = k.shape[0]
    qd = q.double().abs()
    kd = k.double().abs().repeat_interleave(group, dim=1)  # [len, heads, d]
    s = torch.einsum("hd,thd->ht", qd, kd).amax(1) / math.sqrt(d)  # [heads]
    big_v = v.double().abs().amax(dim=(0, 2)).repeat_interleave(group)  # [heads]
    bound = (big_v * FP32_U * (2 * (d + 4) * s + 2 * length + 8))[:, None].expand(heads, d)
    if dtype == torch.bfloat16:
        bound = bound + BF16_U * (ref.abs() + bound)
    return bound


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).removeprefix("torch."))
@pytest.mark.parametrize("block_size", [16, 8])
@pytest.mark.parametrize("heads,kv_heads,d", SHAPES, ids=lambda x: str(x))
def test_kernel_matches_float64_reference(any_kernel, heads, kv_heads, d, block_size, dtype):
    lengths = [1, 2, block_size, block_size + 1, 37, 128, 255, 300]
    k_cache, v_cache, tables, keys, values = _paged_case(lengths, kv_heads, d, block_size, dtype, seed=d + block_size)
    q = torch.randn(len(lengths), heads, d, generator=torch.Generator().manual_seed(1)).to(dtype)
    out = torch.full((len(lengths), heads * d), SENTINEL, dtype=dtype)
    batch = DecodeBatch(any_kernel, torch.arange(len(lengths), dtype=torch.int32), tables,
                        torch.tensor(lengths, dtype=torch.int32))
    _native_decode(q, k_cache, v_cache, batch, out)
    for s, length in enumerate(lengths):
        ref = _reference(q[s], keys[s], values[s])
        got = out[s].view(heads, d).double()
        tol = _tolerance(q[s], keys[s], values[s], ref, dtype)
        err = (got - ref).abs()
        assert torch.isfinite(got).all(), f"sequence {s} (len {length}) read a key it does not own"
        assert (err <= tol).all(), (f"sequence {s} (len {length}): error {err.max().item():.3g} "
                                    f"over bound {tol.flatten()[err.flatten().argmax()].item():.3g}")
        # the bound is not vacuous: far below the outputs' own size
        assert tol.max() < 0.05 * ref.abs().max()


@pytest.mark.parametrize("heads,kv_heads,d", SHAPES, ids=lambda x: str(x))
def test_bfloat16_is_float32_arithmetic_rounded_as_torch_rounds(any_kernel, heads, kv_heads, d):
    """bfloat16 inputs are exact in float32 and the arithmetic is float32 either way: the bfloat16 output is
    the bits of the float32 kernel's output on the same values, rounded to bfloat16 by torch."""
    lengths = [1, 17, 300]
    k16, v16, tables, _, _ = _paged_case(lengths, kv_heads, d, 16, torch.bfloat16, seed=6)
    q16 = torch.randn(len(lengths), heads, d, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    outs = {}
    for name, (q, k_cache, v_cache) in {"bf16": (q16, k16, v16), "fp32": (q16.float(), k16.float(), v16.float())}.items():
        outs[name] = torch.empty(len(lengths), heads * d, dtype=q.dtype)
        _native_decode(q, k_cache, v_cache, DecodeBatch(any_kernel, torch.arange(len(lengths), dtype=torch.int32),
                                                        tables, torch.tensor(lengths, dtype=torch.int32)), outs[name])
    assert torch.equal(outs["bf16"].view(torch.int16), outs["fp32"].to(torch.bfloat16).view(torch.int16))


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_kernel_is_batch_invariant(any_kernel, data):
    """A sequence's output bits are the same alone, among others in any order, at any row, on 1 or 2 threads."""
    heads, kv_heads, d = data.draw(st.sampled_from(SHAPES[:3]), label="shape")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    block_size = data.draw(st.sampled_from([8, 16]), label="block_size")
    lengths = data.draw(st.lists(st.integers(1, 300), min_size=2, max_size=6), label="lengths")
    order = data.draw(st.permutations(range(len(lengths))), label="order")
    n = len(lengths)
    k_cache, v_cache, tables, _, _ = _paged_case(lengths, kv_heads, d, block_size, dtype, seed=n)
    q = torch.randn(n, heads, d, generator=torch.Generator().manual_seed(2)).to(dtype)
    lens = torch.tensor(lengths, dtype=torch.int32)

    def attend(sequences: list[int], rows: list[int]) -> torch.Tensor:
        """Output rows (the kernel writes row rows[j] for sequence sequences[j], reading q at the same row)."""
        at = torch.tensor(sequences)
        q_rows = torch.zeros(max(rows) + 1, heads, d, dtype=dtype)
        q_rows[rows] = q[at]
        out = torch.full((max(rows) + 1, heads * d), SENTINEL, dtype=dtype)
        _native_decode(q_rows, k_cache, v_cache,
                       DecodeBatch(any_kernel, torch.tensor(rows, dtype=torch.int32), tables[at], lens[at]), out)
        return out[rows]

    bits = torch.int32 if dtype == torch.float32 else torch.int16
    alone = torch.cat([attend([s], [0]) for s in range(n)]).view(bits)
    together = attend(list(order), [2 * j + 1 for j in range(n)]).view(bits)  # rows 1, 3, 5, ...
    with torch_threads(1):
        one_thread = attend(list(order), list(range(n))).view(bits)
    for j, s in enumerate(order):
        assert torch.equal(together[j], alone[s]), f"sequence {s} (len {lengths[s]}) at position {j}"
        assert torch.equal(one_thread[j], alone[s]), f"sequence {s} (len {lengths[s]}) on one thread"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).removeprefix("torch."))
@pytest.mark.parametrize("heads,kv_heads,d", SHAPES[:3], ids=lambda x: str(x))
def test_strided_q_and_scattered_output_rows(any_kernel, heads, kv_heads, d, dtype):
    """q as the query heads of a fused [rows, heads + 2 kv_heads, d] projection, out as the first heads * d
    columns of a wider buffer, decodes at rows 5, 0 and 3 of 8: only those rows' first heads * d entries are
    written, and they are the bits of the same attention from contiguous tensors."""
    lengths, rows, num_rows = [40, 1, 300], [5, 0, 3], 8
    k_cache, v_cache, tables, _, _ = _paged_case(lengths, kv_heads, d, 16, dtype, seed=3)
    qkv = torch.randn(num_rows, heads + 2 * kv_heads, d, generator=torch.Generator().manual_seed(4)).to(dtype)
    q = qkv[:, :heads]
    assert q.stride(0) == (heads + 2 * kv_heads) * d and not q.is_contiguous()
    wide = torch.full((num_rows, heads * d + 24), SENTINEL, dtype=dtype)
    out = wide[:, :heads * d]
    lens = torch.tensor(lengths, dtype=torch.int32)
    _native_decode(q, k_cache, v_cache, DecodeBatch(any_kernel, torch.tensor(rows, dtype=torch.int32), tables, lens), out)

    dense_out = torch.empty(len(rows), heads * d, dtype=dtype)
    _native_decode(q[rows].contiguous(), k_cache, v_cache,
                   DecodeBatch(any_kernel, torch.arange(len(rows), dtype=torch.int32), tables, lens), dense_out)
    assert torch.equal(out[rows], dense_out)
    untouched = torch.ones(num_rows, heads * d + 24, dtype=torch.bool)
    untouched[rows, :heads * d] = False
    assert (wide[untouched] == SENTINEL).all()


def test_wrapper_refuses_a_layout_the_kernel_cannot_read(kernel):
    k_cache, v_cache, tables, _, _ = _paged_case([5], 2, 64, 16, torch.float32, seed=5)
    batch = DecodeBatch(kernel, torch.zeros(1, dtype=torch.int32), tables, torch.tensor([5], dtype=torch.int32))
    heads_last = torch.randn(1, 64, 4).transpose(1, 2)  # [1, 4, 64] with heads not contiguous
    with pytest.raises(ValueError, match="contiguous"):
        _native_decode(heads_last, k_cache, v_cache, batch, torch.empty(1, 4 * 64))


# ---- the engine ---------------------------------------------------------------------------------

VOCAB = 8192
LENGTHS = [1, 9, 64, 300]  # the 300-token prompt is prefilled in chunks (as test_engine_reference)
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def engines(kernel, demo_checkpoint):
    """Demo-model engines (float32: the comparison rule's dtype) forced to each decode attention."""
    made = {}
    with pytest.MonkeyPatch.context() as mp:
        try:
            for choice in ("native", "sdpa"):
                mp.setenv("TRILLM_DECODE_ATTENTION", choice)
                made[choice] = make_engine(demo_checkpoint, dtype="float32", max_model_len=1024,
                                           enable_prefix_caching=False)
            yield made
        finally:
            for engine in made.values():
                engine.shutdown()


def test_engine_reports_its_decode_attention(engines):
    assert engines["native"].stats()["kernels"]["decode_attention"] == "native-paged"
    assert engines["sdpa"].stats()["kernels"]["decode_attention"] == "sdpa-loop"
    assert "TRILLM_DECODE_ATTENTION=native" in engines["native"].stats()["kernels"]["decode_attention_reason"]


def test_native_and_sdpa_engines_agree_token_for_token(engines, demo_checkpoint):
    """Greedy continuations through either attention match transformers' under the float32 rule
    (engine_helpers.assert_matches_reference): so they agree token for token up to the first near tie."""
    prompt_list = prompts(1, LENGTHS, VOCAB)
    results = {name: run(engine, requests(prompt_list, greedy(MAX_TOKENS))) for name, engine in engines.items()}
    model = load_hf(demo_checkpoint)
    compared_total = 0
    for i, prompt in enumerate(prompt_list):
        ref = hf_greedy(model, prompt, MAX_TOKENS)
        compared = {}
        for name in engines:
            got = results[name][f"r{i}"]
            compared[name] = assert_matches_reference(got.tokens, got.log_probs, ref, engines[name].spec,
                                                      f"{name}, prompt {i} ({len(prompt)} tokens)")
        steps = min(compared.values())
        assert results["native"][f"r{i}"].tokens[:steps] == results["sdpa"][f"r{i}"].tokens[:steps]
        compared_total += steps
    assert compared_total >= 0.5 * MAX_TOKENS * len(prompt_list)  # the rule stopped early on few prompts


def test_mixed_step_prefill_chunk_with_native_decodes(engines, monkeypatch):
    """A long prompt arriving while another request decodes is prefilled in steps that also carry that
    decode through the kernel (observed in the runner's prepared metadata); both outputs equal their
    outputs alone."""
    engine = engines["native"]
    runner = engine.runner
    mixed_steps = []
    real_prepare = runner.prepare

    def observed_prepare(chunks):
        prepared = real_prepare(chunks)
        meta = prepared[2]
        if meta.decode is not None and meta.sequences:
            mixed_steps.append((meta.decode.n, [s.num_rows for s in meta.sequences]))
        return prepared

    decoder, late = requests(prompts(9, [20, 300], VOCAB), [greedy(40), greedy(8)])
    alone = {r.request_id: run(engine, [r])[r.request_id].tokens for r in (decoder, late)}
    monkeypatch.setattr(runner, "prepare", observed_prepare)
    collector = Collector()
    engine.submit(decoder, collector)
    collector.wait_for_tokens(decoder.request_id, 3)
    engine.submit(late, collector)
    results = collector.wait([decoder.request_id, late.request_id])
    monkeypatch.undo()
    assert mixed_steps, "no step mixed a prompt chunk with native decodes"
    assert any(rows > 1 for _, chunk_rows in mixed_steps for rows in chunk_rows)
    for rid, tokens in alone.items():
        assert results[rid].tokens == tokens, rid


# ---- building and loading -----------------------------------------------------------------------

@pytest.fixture
def fresh_load():
    """native's loaders are cached per process (functools.cache): clear them around a test that changes
    what they would find, so that later tests load the real library again."""
    caches = [f for f in vars(native).values() if callable(getattr(f, "cache_clear", None))]
    for f in caches:
        f.cache_clear()
    yield native.load
    for f in caches:
        f.cache_clear()


def test_build_is_cached_by_key(tmp_path, monkeypatch):
    if native.compiler() is None:
        pytest.skip("no C++ compiler here")
    compiles = []
    real_run = native.subprocess.run

    def observed_run(args, **kwargs):
        if "-o" in args:
            compiles.append(args)
        return real_run(args, **kwargs)

    monkeypatch.setattr(native.subprocess, "run", observed_run)
    first = native.build(tmp_path)
    assert compiles and first.is_file() and first.parent.parent == tmp_path
    built = first.stat()
    compiles.clear()
    assert native.build(tmp_path) == first
    assert compiles == []
    assert first.stat().st_mtime_ns == built.st_mtime_ns and first.stat().st_ino == built.st_ino
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary file left behind


BOGUS_COMPILERS = [
    pytest.param("false", id="fails"),
    pytest.param("/nonexistent/bin/c++", id="missing"),
]


@pytest.mark.parametrize("cxx", BOGUS_COMPILERS)
def test_bogus_compiler_is_unavailable(tmp_path, monkeypatch, cxx):
    monkeypatch.setenv("CXX", cxx)
    with pytest.raises(native.NativeUnavailable):
        native.build(tmp_path)
    assert not list(tmp_path.rglob("*.so*"))


@pytest.mark.parametrize("cxx", ["false", "/nonexistent/bin/c++"], ids=["fails", "missing"])
def test_load_falls_back_without_a_working_compiler(tmp_path, monkeypatch, fresh_load, cxx):
    monkeypatch.setenv("CXX", cxx)
    monkeypatch.setenv("TRILLM_HOME", str(tmp_path))
    kernel, why = fresh_load()
    assert kernel is None and why
    assert not list(tmp_path.rglob("*.so*"))


def test_trillm_native_0_disables_the_kernel(monkeypatch, fresh_load):
    monkeypatch.setenv("TRILLM_NATIVE", "0")
    assert fresh_load() == (None, "disabled by TRILLM_NATIVE=0")
