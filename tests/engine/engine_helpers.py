"""Helpers shared by the engine tests: running requests to completion, references from transformers."""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trillm.engine import EngineConfig, FinishReason, GenerationRequest, SamplingParams, StepOutput, TorchEngine

TIMEOUT_S = 120


@dataclass
class Result:
    outputs: list[StepOutput] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # time.monotonic() of each output

    @property
    def tokens(self) -> list[int]:
        return [t for o in self.outputs for t in o.token_ids]

    @property
    def log_probs(self) -> list[float]:
        return [p for o in self.outputs for p in (o.log_probs or [])]

    @property
    def final(self) -> StepOutput:
        return self.outputs[-1]

    @property
    def finished(self) -> bool:
        return bool(self.outputs) and self.outputs[-1].finished

    @property
    def reason(self) -> FinishReason | None:
        return self.final.finish_reason if self.finished else None


class Collector:
    """An on_output callback that records every StepOutput by request id."""

    def __init__(self) -> None:
        self.results: dict[str, Result] = {}
        self._cond = threading.Condition()

    def __call__(self, output: StepOutput) -> None:
        with self._cond:
            result = self.results.setdefault(output.request_id, Result())
            assert not result.finished, f"{output.request_id}: output after the final one"
            result.outputs.append(output)
            result.times.append(time.monotonic())
            self._cond.notify_all()

    def wait(self, request_ids, timeout: float = TIMEOUT_S) -> dict[str, Result]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not all(rid in self.results and self.results[rid].finished for rid in request_ids):
                left = deadline - time.monotonic()
                assert left > 0, f"timed out waiting for {request_ids}"
                self._cond.wait(left)
            return {rid: self.results[rid] for rid in request_ids}

    def wait_for_tokens(self, request_id: str, count: int, timeout: float = TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while request_id not in self.results or len(self.results[request_id].tokens) < count:
                left = deadline - time.monotonic()
                assert left > 0, f"timed out waiting for {count} tokens of {request_id}"
                self._cond.wait(left)


def make_engine(checkpoint: Path, **overrides) -> TorchEngine:
    return TorchEngine(EngineConfig(checkpoint_dir=str(checkpoint), **overrides))


def run(engine: TorchEngine, requests: list[GenerationRequest], gap_s: float = 0.0) -> dict[str, Result]:
    """Submit ``requests`` (``gap_s`` apart) and wait until all have finished."""
    collector = Collector()
    for request in requests:
        engine.submit(request, collector)
        if gap_s:
            time.sleep(gap_s)
    return collector.wait([r.request_id for r in requests])


def run_alone(engine: TorchEngine, requests: list[GenerationRequest]) -> dict[str, Result]:
    """Each request on its own: the next is submitted when the previous has finished."""
    results = {}
    for request in requests:
        results.update(run(engine, [request]))
    return results


def greedy(max_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, return_log_probs=True, **kwargs)


def prompts(seed: int, lengths: list[int], vocab_size: int, low: int = 6) -> list[list[int]]:
    """Random prompts (ids from ``low`` up, clear of the demo model's special tokens)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(low, vocab_size, (n,), generator=generator).tolist() for n in lengths]


def requests(prompt_list: list[list[int]], params: list[SamplingParams] | SamplingParams,
             prefix: str = "r") -> list[GenerationRequest]:
    if isinstance(params, SamplingParams):
        params = [params] * len(prompt_list)
    return [GenerationRequest(f"{prefix}{i}", p, sp) for i, (p, sp) in enumerate(zip(prompt_list, params))]


def make_random_llama(out_dir: Path, dtype: str = "float32", max_shard_size: str | None = None,
                      init_std: float = 0.4, seed: int = 0, **config) -> Path:
    """A random LlamaForCausalLM saved with transformers (the only place tests build models).

    Weights are drawn wider than transformers' default so that greedy choices
    are decided by clear margins, not by float rounding.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(initializer_range=init_std, **config))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.1)
    model = model.to(getattr(torch, dtype))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **kwargs)
    return Path(out_dir)


def load_hf(checkpoint: Path):
    """The transformers reference model, in float32, never stopping on an end token."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@contextlib.contextmanager
def torch_threads(n: int):
    """Run with ``n`` intra-op threads. transformers' many small ops slow down
    badly with 2 threads on a busy 2-core machine; one thread is steady."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class Reference:
    """transformers' greedy continuation of one prompt, with what the comparison rule needs per step."""

    tokens: list[int]
    log_probs: list[float]  # of the chosen tokens, under the model's log-softmax
    margins: list[float]  # top-1 minus top-2 logit
    max_abs_logits: list[float]


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> Reference:
    """transformers' greedy tokens, their log-probabilities, and each step's top-2 margin."""
    with torch.no_grad(), torch_threads(1):
        out = model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new_tokens, do_sample=False, output_logits=True, return_dict_in_generate=True,
        )
    tokens = out.sequences[0, len(prompt):].tolist()
    logits = [s[0].float() for s in out.logits]
    top2 = [z.topk(2).values for z in logits]
    return Reference(
        tokens=tokens,
        log_probs=[torch.log_softmax(z, -1)[t].item() for z, t in zip(logits, tokens)],
        margins=[(v[0] - v[1]).item() for v in top2],
        max_abs_logits=[z.abs().max().item() for z in logits],
    )


FP32_UNIT_ROUNDOFF = 2.0 ** -24
# How far past its typical size a rounding error may go: the errors are not
# Gaussian, and norms and softmaxes amplify them by model-dependent gains.
# Measured (AVX-512 Xeon): the demo model's worst error is 0.08 of the
# typical size, the random Llama's (weights drawn wide, large gains) 2.9.
ROUNDING_TAIL = 16.0


def fp32_logit_error(spec) -> float:
    """Relative error of a logit between two float32 evaluations of one model that differ
    only in reduction order (kernels, splits, fused matmuls).

    Each matmul's dot products of length K carry a rounding error of typical
    relative size sqrt(K) * u (u = 2^-24, errors of random sign); the path
    from the embedding to a logit crosses 4 matmuls per layer (qkv, o,
    gate_up, down) and the LM head, whose independent errors add in
    quadrature through the residual stream: sqrt(4 * layers + 1).
    """
    k = max(spec.hidden_size, spec.intermediate_size, spec.num_heads * spec.head_dim)
    return ROUNDING_TAIL * FP32_UNIT_ROUNDOFF * (k * (4 * spec.num_layers + 1)) ** 0.5


def assert_matches_reference(got_tokens: list[int], got_log_probs: list[float], ref: Reference, spec,
                             label: str) -> int:
    """Compare an engine's greedy continuation with transformers'; returns the steps compared.

    The rule: a logit z may be off by ``fp32_logit_error(spec) * max|z|``
    (its absolute error scales with the largest logit of the step), so a
    log-prob, z_t - logsumexp(z), by twice that. Where the reference's top-2
    margin exceeds twice the logit error, the token must be the same; at the
    first step whose margin is smaller (a near tie that rounding may decide
    either way) the comparison stops, since the continuations may part there.
    """
    rel = fp32_logit_error(spec)
    assert len(got_tokens) == len(ref.tokens), label
    for step, (token, log_prob) in enumerate(zip(got_tokens, got_log_probs)):
        logit_error = rel * ref.max_abs_logits[step]
        if ref.margins[step] <= 2 * logit_error:
            return step
        assert token == ref.tokens[step], f"{label}: token {step} ({ref.margins[step]:.3g} top-2 margin)"
        assert abs(log_prob - ref.log_probs[step]) <= 2 * logit_error, (
            f"{label}: log-prob {step}: {log_prob} vs {ref.log_probs[step]} (bound {2 * logit_error:.3g})")
    return len(got_tokens)


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.005) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def build_generic(source_name: str, directory: Path, without: tuple[str, ...] = ("avx512f",)) -> Path:
    """One of the native sources built without the instruction sets ``without`` (default AVX-512, so
    its portable paths), as on a CPU without them."""
    import subprocess

    from trillm.engine import native

    source = next(p for p in native.SOURCES if p.name == source_name)
    path = directory / f"lib{source.stem}_no_{'_'.join(without)}.so"
    result = subprocess.run([native.compiler(), *native.FLAGS, *native.OPENMP_FLAGS, *(f"-mno-{isa}" for isa in without),
                             "-o", str(path), str(source)], capture_output=True, text=True,
                            timeout=native.BUILD_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-500:]
    return path
