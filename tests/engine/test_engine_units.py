"""The engine's parts on their own: config, checkpoint parsing, rope, block manager, scheduler."""

from __future__ import annotations

import json

import pytest
import torch

from trillm.engine import EngineConfig, GenerationRequest, SamplingParams
from trillm.engine.block_manager import BlockManager
from trillm.engine.checkpoint import LlamaSpec
from trillm.engine.config import DEFAULT_PREFILL_CHUNKS_PER_STEP, EngineLimits, resolve_limits
from trillm.engine.rope import inverse_frequencies
from trillm.engine.scheduler import Scheduler
from trillm.engine.sequence import Sequence, SequenceStatus

pytestmark = pytest.mark.engine

LLAMA = {"model_type": "llama", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "max_position_embeddings": 8192}


# ---- config ---------------------------------------------------------------------------------


@pytest.fixture
def checkpoint_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    return str(tmp_path)


@pytest.mark.parametrize(("changes", "field"), [
    ({"dtype": "int8"}, "dtype"),
    ({"max_num_seqs": -1}, "max_num_seqs"),
    ({"num_threads": 1.5}, "num_threads"),
    ({"block_size": 0}, "block_size"),
    ({"max_num_seqs": 64, "max_num_batched_tokens": 32}, "max_num_batched_tokens"),
    ({"kv_cache_blocks": 4, "max_model_len": 100}, "kv_cache_blocks"),
    ({"enable_prefix_caching": "yes"}, "enable_prefix_caching"),
])
def test_config_validate_names_the_field(checkpoint_dir, changes, field):
    with pytest.raises(ValueError, match=f"^{field}: "):
        EngineConfig(checkpoint_dir=checkpoint_dir, **changes).validate()


def test_config_validate_needs_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="^checkpoint_dir: no config.json"):
        EngineConfig(checkpoint_dir=str(tmp_path)).validate()


def test_resolve_limits_derives_every_zero(checkpoint_dir):
    limits = resolve_limits(EngineConfig(checkpoint_dir=checkpoint_dir), 8192, kv_bytes_per_token=1024)
    assert limits.max_model_len == 4096
    assert limits.max_num_seqs > 0 and limits.kv_cache_blocks >= 4096 // 16
    assert limits.max_num_batched_tokens == DEFAULT_PREFILL_CHUNKS_PER_STEP * limits.prefill_chunk + limits.max_num_seqs
    short = resolve_limits(EngineConfig(checkpoint_dir=checkpoint_dir), 512, kv_bytes_per_token=1024)
    assert short.max_model_len == 512
    small_cache = resolve_limits(EngineConfig(checkpoint_dir=checkpoint_dir, kv_cache_blocks=10), 8192, 1024)
    assert small_cache.max_model_len == 160  # a derived length shrinks to what the cache holds
    with pytest.raises(ValueError, match="^max_model_len: "):
        resolve_limits(EngineConfig(checkpoint_dir=checkpoint_dir, max_model_len=9000), 8192, 1024)
    explicit = resolve_limits(EngineConfig(checkpoint_dir=checkpoint_dir, max_num_seqs=4,
                                           max_num_batched_tokens=68), 8192, 1024)
    assert explicit.prefill_chunk == 64


# ---- checkpoint config ----------------------------------------------------------------------


def test_spec_reads_both_rope_layouts():
    old = LlamaSpec.from_config({**LLAMA, "rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 4.0}})
    new = LlamaSpec.from_config({**LLAMA, "rope_parameters": {"rope_type": "linear", "factor": 4.0,
                                                              "rope_theta": 5e5}})
    assert old == new and old.rope_type == "linear" and old.rope_theta == 5e5
    plain = LlamaSpec.from_config(LLAMA)
    assert plain.rope_type == "default" and plain.rope_theta == 10000.0
    assert plain.head_dim == 16 and plain.num_kv_heads == 2
    assert LlamaSpec.from_config({**LLAMA, "head_dim": 32}).head_dim == 32


@pytest.mark.parametrize(("changes", "message"), [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling type 'yarn' is not supported"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "rope scaling type 'dynamic'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "needs 'low_freq_factor'"),
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, "model_type must be 'llama'"),
    ({"num_key_value_heads": 3}, "must be a multiple of num_key_value_heads"),
    ({"hidden_act": "gelu"}, "hidden_act must be 'silu'"),
])
def test_spec_refuses_what_it_cannot_compute(changes, message):
    with pytest.raises(ValueError, match=message):
        LlamaSpec.from_config({**LLAMA, **changes})


@pytest.mark.parametrize("rope", [
    None,
    {"rope_type": "linear", "factor": 2.5},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 256},
])
def test_rope_frequencies_equal_transformers(rope):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = {**LLAMA, "rope_theta": 50000.0, "rope_scaling": rope}
    hf_config = LlamaConfig(**{k: v for k, v in config.items() if k != "model_type"})
    expected = LlamaRotaryEmbedding(hf_config).inv_freq
    assert torch.equal(inverse_frequencies(LlamaSpec.from_config(config)), expected)


# ---- linear layers ---------------------------------------------------------------------------


def test_linear_rows_do_not_depend_on_the_row_count():
    """The property batch invariance rests on (see linear.py): padded to the multiple the
    probe finds on this CPU, every row count gives each row the same bits, here checked on
    other inputs and row offsets than the probe used. Where the probe finds no multiple it
    must have seen a differing row count, which is checked instead."""
    from trillm.engine.linear import Linear, row_variant_counts, smallest_row_multiple

    generator = torch.Generator().manual_seed(0)
    for shape in ((1280, 640), (640, 1728)):
        weight, bias = torch.randn(*shape, generator=generator) / 25, torch.randn(shape[0], generator=generator)
        layer = Linear(weight, bias)
        x = torch.randn(300, shape[1], generator=generator)
        full = layer(x)
        assert torch.allclose(full, torch.nn.functional.linear(x, weight, bias), atol=1e-4)
        variants = row_variant_counts(layer, 200)
        m = smallest_row_multiple([variants], 200)
        if m is None:
            assert variants
            continue
        for rows in (1, 2, 3, 5, 8, 13, 64, 199):
            rows = -(-rows // m) * m
            for start in (0, 7):
                assert torch.equal(layer(x[start:start + rows]), full[start:start + rows]), (shape, rows, start)


# The probe's x[0, 0]: the first value of its input (seed 0).
_PROBE_FIRST = torch.randn(1, 40, generator=torch.Generator().manual_seed(0))[0, 0]


@pytest.mark.parametrize("which", ["every", "not-the-first"])
def test_probe_finds_a_kernel_that_rounds_lone_rows_differently(which):
    """A matmul whose lone rows take another path (as oneDNN's fp32 640x1728 does on
    AVX-512) is found by the probe, and padding to 2 rows is what it asks for; also when
    only some lone rows round differently and the probe's first row is not one of them
    (a bfloat16 result hides most of another summation order: oneDNN's bfloat16 576x1536
    on an AVX512-BF16 EPYC), since small row counts run on every window of its input."""
    from trillm.engine import linear as linear_module
    from trillm.engine.linear import Linear, row_variant_counts, smallest_row_multiple

    class LoneRowsDiffer(Linear):
        def __call__(self, x):
            y = super().__call__(x)
            differs = x.shape[0] == 1 and (which == "every" or bool(x[0, 0] * _PROBE_FIRST < 0))
            return y + 1e-3 if differs else y

    generator = torch.Generator().manual_seed(1)
    layer = LoneRowsDiffer(torch.randn(24, 40, generator=generator))
    key = (layer.shape_key, 48, torch.get_num_threads())  # the probe caches by kernel shape, not by class
    linear_module._probe_cache.pop(key, None)
    try:
        variants = row_variant_counts(layer, 48)
    finally:
        linear_module._probe_cache.pop(key, None)
    assert variants == frozenset({1})
    assert smallest_row_multiple([variants], 48) == 2


def test_probe_stops_once_no_padding_can_work():
    """A matmul whose rows differ below 33 rows (oneDNN's bfloat16 AMX kernels) needs a
    padding beyond ROW_MULTIPLES: the probe stops at the first count that rules out the
    last candidate instead of running every row count of the step."""
    from trillm.engine import linear as linear_module
    from trillm.engine.linear import ROW_MULTIPLES, Linear, row_variant_counts, smallest_row_multiple

    calls = []

    class SmallBatchesDiffer(Linear):
        def __call__(self, x):
            calls.append(x.shape[0])
            y = super().__call__(x)
            return y + 1e-3 if x.shape[0] <= 32 else y

    layer = SmallBatchesDiffer(torch.randn(24, 40, generator=torch.Generator().manual_seed(2)))
    key = (layer.shape_key, 300, torch.get_num_threads())
    linear_module._probe_cache.pop(key, None)
    try:
        variants = row_variant_counts(layer, 300)
    finally:
        linear_module._probe_cache.pop(key, None)
    assert smallest_row_multiple([variants], 300) is None
    assert len(calls) == 1 + ROW_MULTIPLES[-1]  # the reference call, then 1 .. 16 rows


def test_smallest_row_multiple_skips_variant_counts():
    from trillm.engine.linear import smallest_row_multiple

    assert smallest_row_multiple([frozenset()], 100) == 1
    assert smallest_row_multiple([frozenset({1})], 100) == 2
    assert smallest_row_multiple([frozenset({1}), frozenset({2, 6, 10})], 100) == 4
    assert smallest_row_multiple([frozenset(range(1, 128))], 100) is None


def test_segmented_decode_attention_equals_one_pass():
    """Attention merged over runs of blocks (log-sum-exp) equals attention over all keys at once."""
    from trillm.engine.attention import SEGMENTED_DECODE, _merged_segments

    if not SEGMENTED_DECODE:
        pytest.skip("this torch build has no SDPA returning log-sum-exp")
    generator = torch.Generator().manual_seed(3)
    q = torch.randn(1, 8, 1, 16, generator=generator)
    k, v = torch.randn(2, 1, 4, 70, 16, generator=generator)
    whole = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    cuts = [(0, 32), (32, 48), (48, 70)]
    merged = _merged_segments(q, [(k[:, :, a:b], v[:, :, a:b]) for a, b in cuts])
    assert torch.allclose(merged, whole, atol=1e-6)


# ---- block manager ---------------------------------------------------------------------------


def _seq(tokens, max_tokens=4, rid="s"):
    return Sequence.create(GenerationRequest(rid, list(tokens), SamplingParams(max_tokens=max_tokens)), print)


def test_block_manager_shares_cached_prefix_blocks_by_reference():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = _seq(range(10))
    bm.admit(a, bm.match_prefix(a), 14)
    bm.allocate(a, 10)
    a.num_computed_tokens = 10
    bm.register_full_blocks(a)
    assert len(a.block_hashes) == 2
    b = _seq([*range(8), 99, 98, 97])
    hit = bm.match_prefix(b)
    assert hit == a.block_table[:2]
    used = bm.num_used_blocks
    bm.admit(b, hit, 15)
    assert bm.num_used_blocks == used  # shared, not copied
    assert b.num_computed_tokens == 8 and bm.prefix_cache_hit_blocks == 2
    bm.free(a)
    assert bm.num_used_blocks == 2  # b still holds the shared blocks
    bm.free(b)
    assert bm.num_used_blocks == 0
    c = _seq([*range(8), 5])
    assert bm.match_prefix(c) == hit  # freed blocks stay reusable until handed out again


def test_block_manager_never_serves_the_last_prompt_token_from_cache():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = _seq(range(8))
    bm.admit(a, [], 12)
    bm.allocate(a, 8)
    a.num_computed_tokens = 8
    bm.register_full_blocks(a)
    assert len(bm.match_prefix(_seq(range(8)))) == 1  # block 2 holds the last token: recomputed


def test_block_manager_gives_a_sequence_consecutive_blocks_when_it_can():
    bm = BlockManager(num_blocks=32, block_size=4)
    seqs = [_seq(range(5), max_tokens=11, rid=f"s{i}") for i in range(3)]
    for s in seqs:
        bm.admit(s, [], 16)
        bm.allocate(s, 5)
    for _ in range(2):  # interleaved growth, as in decoding
        for s in seqs:
            bm.allocate(s, len(s.block_table) * 4 + 1)
    for s in seqs:
        assert s.block_table == list(range(s.block_table[0], s.block_table[0] + 4))
    bm.free(seqs[1])
    assert bm.num_free_blocks == 32 - 8


def test_block_manager_evicts_stale_cache_entries_on_reuse():
    bm = BlockManager(num_blocks=2, block_size=2, enable_prefix_caching=True)
    a = _seq([1, 2, 3])
    bm.admit(a, [], 3)
    bm.allocate(a, 3)
    a.num_computed_tokens = 3
    bm.register_full_blocks(a)
    bm.free(a)
    b = _seq([7, 8, 9, 10])
    bm.admit(b, bm.match_prefix(b), 4)
    bm.allocate(b, 4)  # takes both blocks, including a's cached one
    assert bm.match_prefix(_seq([1, 2, 3])) == []


# ---- scheduler ---------------------------------------------------------------------------------


def _limits(**kw):
    base = dict(max_num_seqs=8, max_model_len=64, max_num_batched_tokens=40, kv_cache_blocks=8,
                block_size=4, prefill_chunk=32)
    return EngineLimits(**{**base, **kw})


def test_scheduler_cuts_prompts_at_chunk_multiples():
    sched = Scheduler(_limits(), BlockManager(16, 4, enable_prefix_caching=False))
    seq = _seq(range(50), max_tokens=4)
    sched.add(seq)
    chunks = sched.schedule()
    assert [(c.start, c.num_tokens, c.samples) for c in chunks] == [(0, 32, False)]
    sched.complete(chunks)
    chunks = sched.schedule()
    assert [(c.start, c.num_tokens, c.samples) for c in chunks] == [(32, 18, True)]


def test_scheduler_preempts_the_newest_when_blocks_run_out():
    sched = Scheduler(_limits(kv_cache_blocks=5), BlockManager(5, 4, enable_prefix_caching=False))
    old, new = _seq(range(8), max_tokens=12, rid="old"), _seq(range(12), max_tokens=8, rid="new")
    sched.add(old)
    sched.add(new)
    first = sched.schedule()
    assert [(c.seq, c.num_tokens) for c in first] == [(old, 8), (new, 12)]  # all 5 blocks in use
    sched.complete(first)
    for s in (old, new):
        s.append_token(1, None)
    chunks = sched.schedule()  # old needs a third block: new, the newest, gives its blocks back
    assert [(c.seq, c.start, c.num_tokens) for c in chunks] == [(old, 8, 1)]
    assert new.status is SequenceStatus.WAITING and new.block_table == [] and sched.waiting[0] is new
    assert sched.num_preemptions == 1
    assert new.num_tokens == 13  # its output is kept, to be recomputed with the prompt
