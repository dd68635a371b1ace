"""dtype "auto": what it picks on this CPU is measured, shown in stats(), and what the engine runs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine_helpers import greedy, make_engine, prompts, requests, run, run_alone
from trillm.engine.checkpoint import LlamaSpec, read_config
from trillm.engine.config import EngineConfig
from trillm.engine.cpu import cpu_info
from trillm.engine.precision import MATMULS, resolve_precision

pytestmark = pytest.mark.engine

VOCAB = 8192


@pytest.fixture(scope="module")
def spec(demo_checkpoint):
    return LlamaSpec.from_config(read_config(demo_checkpoint))


def test_auto_is_the_default():
    assert EngineConfig(checkpoint_dir="x").dtype == "auto"


def test_auto_without_native_bf16_is_float32_unmeasured(spec):
    avx2_only = dataclasses.replace(cpu_info(), flags=("avx2", "fma"))
    precision = resolve_precision("auto", spec, avx2_only)
    assert precision.compute == precision.kv_cache == torch.float32
    assert set(precision.linears.values()) == {"float32"} and not precision.timings_ms
    assert "AVX512-BF16" in precision.reason


def test_explicit_dtype_is_used_everywhere(spec):
    precision = resolve_precision("bfloat16", spec, cpu_info())
    assert precision.compute == precision.kv_cache == torch.bfloat16
    assert set(precision.linears.values()) == {"bfloat16"} and precision.reason == "requested"


@pytest.mark.skipif(not cpu_info().native_bf16, reason="auto measures only where bfloat16 is native")
def test_auto_picks_per_matmul_from_its_measurements(spec):
    """Each matmul's dtype is, by its own timings, never the slower one at both row counts,
    and the KV cache's is the faster one for a decode's attention."""
    precision = resolve_precision("auto", spec, cpu_info())
    assert set(precision.linears) == set(MATMULS)
    for kind, chosen in precision.linears.items():
        t = precision.timings_ms[kind]
        other = "float32" if chosen == "bfloat16" else "bfloat16"
        assert any(t[chosen][i] <= t[other][i] for i in (0, 1)), (kind, t)
    attention = precision.timings_ms["decode_attention"]
    kv = str(precision.kv_cache).removeprefix("torch.")
    assert attention[kv] == min(attention["float32"], attention["bfloat16"])


def test_auto_engine_runs_what_it_reports_and_keeps_its_batch_claim(demo_checkpoint):
    """The engine's matmuls and KV cache have the dtypes stats() shows. Where it claims
    batch invariance, requests together get the tokens and log-probs they get alone, bit
    for bit; where it does not (bfloat16 kernels that round by row count), the probe must
    have found a matmul no padding fixes, and only lengths are compared: a near tie may
    then go either way (seen on an AMX Xeon: one of four requests parted)."""
    engine = make_engine(demo_checkpoint, max_model_len=512, enable_prefix_caching=False)
    try:
        stats = engine.stats()
        shown = stats["precision"]
        layer = engine.model.layers[0]
        assert str(engine.kv_cache.k.dtype) == f"torch.{shown['kv_cache']}"
        for kind, linear in (("qkv", layer.qkv), ("o", layer.o), ("gate_up", layer.gate_up),
                             ("down", layer.down), ("lm_head", engine.model.lm_head)):
            assert str(linear.dtype) == f"torch.{shown['linears'][kind]}", kind
        reqs = requests(prompts(11, [5, 70, 140, 20], VOCAB), greedy(12))
        alone = run_alone(engine, reqs)
        together = run(engine, reqs)
    finally:
        engine.shutdown()
    if not stats["batch_invariant"]:
        assert None in engine.kernels["row_multiples"].values()
    for request in reqs:
        rid = request.request_id
        assert len(together[rid].tokens) == len(alone[rid].tokens) == 12, rid
        if stats["batch_invariant"]:
            assert together[rid].tokens == alone[rid].tokens, rid
            assert together[rid].log_probs == alone[rid].log_probs, rid
