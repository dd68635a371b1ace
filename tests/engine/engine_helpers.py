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


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> tuple[list[int], list[float]]:
    """transformers' greedy tokens, and their log-probabilities under the model's softmax."""
    with torch.no_grad(), torch_threads(1):
        out = model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new_tokens, do_sample=False, output_logits=True, return_dict_in_generate=True,
        )
    tokens = out.sequences[0, len(prompt):].tolist()
    log_probs = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.logits, tokens)]
    return tokens, log_probs


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.005) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
