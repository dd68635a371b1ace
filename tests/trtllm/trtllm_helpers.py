"""Shared values and helpers of the TensorRT-LLM contract tests."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

from trillm.engine.types import StepOutput

VOCAB_SIZE = 100
ENGINE_MAX_SEQ_LEN = 256


def host_params(engine_dir: Path | str = "", **overrides) -> SimpleNamespace:
    """The fields of trillm.triton.engine_host.EngineHostParams that the engine reads, with their defaults."""
    values = dict(engine_dir=str(engine_dir), max_num_seqs=0, max_model_len=0, max_num_batched_tokens=0,
                  kv_cache_blocks=0, block_size=16, enable_prefix_caching=True)
    values.update(overrides)
    return SimpleNamespace(**values)


class Collector:
    """on_output for one request: records every StepOutput, signals the final one."""

    def __init__(self) -> None:
        self.outputs: list[StepOutput] = []
        self.finished = threading.Event()
        self.first = threading.Event()

    def __call__(self, out: StepOutput) -> None:
        self.outputs.append(out)
        self.first.set()
        if out.finished:
            self.finished.set()

    def wait(self, timeout: float = 10.0) -> StepOutput:
        assert self.finished.wait(timeout), f"no final output; got {self.outputs}"
        return self.outputs[-1]

    @property
    def tokens(self) -> list[int]:
        return [t for out in self.outputs for t in out.token_ids]

    @property
    def log_probs(self) -> list[float]:
        return [v for out in self.outputs for v in (out.log_probs or [])]
