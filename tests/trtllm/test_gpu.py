"""The TensorRT-LLM engine on a real GPU (marker ``gpu``; scripts/gpu_check.sh runs these).

Skipped, with the reason in the summary, where there is no NVIDIA GPU or no
``tensorrt_llm``. The engine is built once per session from the demo
checkpoint in strict float32 (TF32 off, see ``strict_fp32``), or taken from
``TRILLM_TEST_ENGINE_DIR`` (what gpu_check.sh built the same way). Greedy
output is compared with transformers' by the engine tests' float32 rule
(tests/engine/engine_helpers.py), as the torch engine's is.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from trtllm_helpers import Collector

from trillm.engine.types import FinishReason, GenerationRequest, SamplingParams
from trillm.triton.errors import InputError

# The engine tests' comparison rule against transformers: one rule for every engine.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
from engine_helpers import assert_matches_reference, hf_greedy, load_hf  # noqa: E402

PROMPT = [1, 100, 200, 300, 400]
GREEDY_STEPS = 32


def _why_skip() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return "no NVIDIA GPU here (nvidia-smi not found)"
    if subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode != 0:
        return "nvidia-smi finds no usable NVIDIA GPU"
    if importlib.util.find_spec("tensorrt_llm") is None:
        return "tensorrt_llm is not installed (docs/gpu.md says how)"
    return None


SKIP_REASON = _why_skip()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(SKIP_REASON is not None, reason=f"GPU tests: {SKIP_REASON}")]


@pytest.fixture(scope="session")
def strict_fp32():
    """float32 maths without TF32, in the engine build and at run time.

    TensorRT and cuBLAS run float32 matrix products in TF32 unless
    NVIDIA_TF32_OVERRIDE=0: inputs rounded to 10 mantissa bits (unit roundoff
    2^-11 instead of 2^-24), which moves logits ~8000 times more than float32
    rounding does, past the margin the float32 comparison rule allows. The
    variable must be set before TensorRT-LLM (and CUDA) load in this process;
    gpu_check.sh exports it for its whole run.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NVIDIA_TF32_OVERRIDE", "0")
        yield


@pytest.fixture(scope="session")
def gpu_engine_dir(strict_fp32, demo_model_dir, tmp_path_factory) -> Path:
    prebuilt = os.environ.get("TRILLM_TEST_ENGINE_DIR")
    if prebuilt:
        return Path(prebuilt)
    from trillm.trtllm.build import BuildOptions, build_engine

    out = tmp_path_factory.mktemp("trt") / "engine"
    return build_engine(BuildOptions(checkpoint_dir=Path(demo_model_dir), out_dir=out, dtype="float32",
                                     max_batch_size=16, max_seq_len=1024, max_input_len=512, max_num_tokens=2048))


def _params(engine_kind: str, checkpoint: Path, engine_dir: Path | str = ""):
    from trillm.triton.engine_host import EngineHostParams

    return EngineHostParams(checkpoint_dir=str(checkpoint), engine_kind=engine_kind, engine_dir=str(engine_dir),
                            max_model_len=1024)


@pytest.fixture(scope="session")
def trt_engine(strict_fp32, gpu_engine_dir, demo_model_dir):
    from trillm.trtllm import create_trtllm_engine

    engine = create_trtllm_engine(_params("tensorrt_llm", demo_model_dir, gpu_engine_dir))
    yield engine
    engine.shutdown()


_ids = iter(range(10**9))


def generate(engine, prompt=PROMPT, **sampling) -> Collector:
    collector = Collector()
    engine.submit(GenerationRequest(f"gpu-{next(_ids)}", list(prompt), SamplingParams(**sampling)), collector)
    collector.wait(timeout=120)
    return collector


def test_greedy_streams_max_tokens_deterministically(trt_engine):
    first = generate(trt_engine, max_tokens=32)
    second = generate(trt_engine, max_tokens=32)
    assert first.tokens == second.tokens and len(first.tokens) == 32
    assert first.outputs[-1].finish_reason is FinishReason.LENGTH
    assert [o.finished for o in first.outputs].count(True) == 1


def test_greedy_matches_the_torch_engine(trt_engine, demo_model_dir):
    """Both engines' greedy tokens and log-probs against transformers', by one rule.

    assert_matches_reference: a token must be the reference's wherever its
    top-2 margin is clear of float32 rounding over the model's depth; the
    comparison stops at the first near tie, where either choice is right and
    the continuations may part. It holds for a strict float32 engine only.
    """
    from trillm.triton.engine_host import create_engine

    reference = hf_greedy(load_hf(demo_model_dir), PROMPT, GREEDY_STEPS)
    torch_engine = create_engine(_params("torch", demo_model_dir))
    try:
        torch_out = generate(torch_engine, max_tokens=GREEDY_STEPS, return_log_probs=True)
        spec = torch_engine.spec
    finally:
        torch_engine.shutdown()
    assert_matches_reference(torch_out.tokens, torch_out.log_probs, reference, spec, "torch engine")
    trt_out = generate(trt_engine, max_tokens=GREEDY_STEPS, return_log_probs=True)
    compared = assert_matches_reference(trt_out.tokens, trt_out.log_probs, reference, spec, "TensorRT-LLM")
    assert compared > 0, f"the first greedy step is a near tie ({reference.margins[0]:.3g}): nothing was compared"


def test_end_id_stops_without_returning_it(trt_engine):
    greedy = generate(trt_engine, max_tokens=16).tokens
    stopped = generate(trt_engine, max_tokens=16, end_id=greedy[5])
    assert stopped.tokens == greedy[: greedy.index(greedy[5])]
    assert stopped.outputs[-1].finish_reason is FinishReason.END


def test_min_tokens_and_bad_words_change_the_output(trt_engine):
    greedy = generate(trt_engine, max_tokens=8).tokens
    assert generate(trt_engine, max_tokens=8, end_id=greedy[0], min_tokens=2).tokens[0] != greedy[0]
    assert generate(trt_engine, max_tokens=8, bad_token_seqs=[[greedy[0]]]).tokens[0] != greedy[0]
    banned_pair = generate(trt_engine, max_tokens=8, bad_token_seqs=[[greedy[0], greedy[1]]]).tokens
    assert banned_pair[0] == greedy[0] and banned_pair[1] != greedy[1]


def test_min_tokens_holds_back_the_extra_end_ids_too(trt_engine):
    """The logits processor (trillm.trtllm.sampling.HoldBackEndIds) on the real runtime."""
    greedy = generate(trt_engine, max_tokens=8).tokens
    other_end = next(t for t in range(3, 1000) if t not in greedy)
    ends = generate(trt_engine, max_tokens=8, end_id=other_end, extra_end_ids=(greedy[0],))
    assert ends.tokens == [] and ends.outputs[-1].finish_reason is FinishReason.END
    held = generate(trt_engine, max_tokens=8, end_id=other_end, extra_end_ids=(greedy[0],), min_tokens=2)
    assert held.tokens[0] != greedy[0] and held.outputs[-1].finish_reason is not FinishReason.ERROR


def test_presence_penalty_reaches_the_runtime_or_is_refused_by_name(trt_engine):
    """TensorRT-LLM 1.2 takes prompt_ignore_length; before it, the request is refused naming the input."""
    from trillm.trtllm.runtime import load_api
    from trillm.trtllm.sampling import skips_prompt_in_penalties

    if skips_prompt_in_penalties(load_api().SamplingParams):
        penalised = generate(trt_engine, max_tokens=8, presence_penalty=0.5)
        assert penalised.outputs[-1].finish_reason is FinishReason.LENGTH
    else:
        with pytest.raises(InputError, match="presence_penalty"):
            generate(trt_engine, max_tokens=8, presence_penalty=0.5)


def test_seeded_sampling_repeats(trt_engine):
    a = generate(trt_engine, max_tokens=24, temperature=1.0, seed=5).tokens
    b = generate(trt_engine, max_tokens=24, temperature=1.0, seed=5).tokens
    assert a == b


def test_log_probs_come_with_every_token(trt_engine):
    streamed = generate(trt_engine, max_tokens=12, return_log_probs=True)
    assert len(streamed.log_probs) == 12 and all(v <= 0.0 for v in streamed.log_probs)
    assert all(len(out.log_probs or []) == len(out.token_ids) for out in streamed.outputs)


def test_cancel_stops_generation(trt_engine):
    collector = Collector()
    trt_engine.submit(GenerationRequest("gpu-cancel", PROMPT, SamplingParams(max_tokens=900)), collector)
    assert collector.first.wait(60)
    trt_engine.cancel("gpu-cancel")
    assert collector.wait(timeout=30).finish_reason is FinishReason.CANCELLED
    assert len(collector.tokens) < 900
