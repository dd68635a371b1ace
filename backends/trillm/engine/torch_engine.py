"""TorchEngine: the CPU engine. One daemon thread owns the model and the KV cache.

Other threads only call :meth:`TorchEngine.submit`, :meth:`cancel`,
:meth:`stats` and :meth:`shutdown`, which validate, enqueue and return. The
loop thread drains that inbox, asks the scheduler for a step, runs it and
samples, and hands each request its new tokens through the request's
``on_output`` callback. A failure is contained to what it concerns: a
sampling error ends that request with ERROR, a failed forward ends the
requests of that step, and the loop carries on.
"""

from __future__ import annotations

import logging
import operator
import threading
from typing import Callable

import torch

from trillm.engine.attention import choose_decode_attention
from trillm.engine.block_manager import BlockManager
from trillm.engine.checkpoint import LlamaSpec, load_tensors, read_config, safetensors_files
from trillm.engine.config import EngineConfig, EngineLimits, resolve_limits
from trillm.engine.cpu import cpu_info, release_openmp_pool
from trillm.engine.kv_cache import KVCache
from trillm.engine.llama import LlamaModel
from trillm.engine.model_runner import ModelRunner
from trillm.engine.precision import resolve_precision
from trillm.engine.quant import LinearBuilder, QuantConfig, release_freed_memory, resident_memory_bytes
from trillm.engine.sampler import sample
from trillm.engine.scheduler import Scheduler
from trillm.engine.sequence import Sequence
from trillm.engine.types import FinishReason, GenerationRequest, StepOutput

log = logging.getLogger("trillm.engine")


def _is_token(value, vocab_size: int) -> bool:
    """An integer id (Python or numpy, not bool) in [0, vocab_size)."""
    if type(value) is not int:
        if isinstance(value, bool):
            return False
        try:
            value = operator.index(value)
        except TypeError:
            return False
    return 0 <= value < vocab_size


class TorchEngine:
    def __init__(self, config: EngineConfig) -> None:
        config.validate()
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        spec = LlamaSpec.from_config(read_config(config.checkpoint_dir))
        self.cpu = cpu_info()
        self.precision = resolve_precision(config.dtype, spec, self.cpu, config.quantization)
        dtype = self.precision.compute
        tensors = load_tensors(config.checkpoint_dir, dtype)
        limits = resolve_limits(config, spec.max_position_embeddings, spec.kv_bytes_per_token(self.precision.kv_cache))
        self.config = config
        self.spec = spec
        self.limits: EngineLimits = limits
        linears = LinearBuilder(QuantConfig(config.quantization, config.quant_group_size), dtype,
                                safetensors_files(config.checkpoint_dir))

        def make_linear(name: str, weight: torch.Tensor, bias: torch.Tensor | None = None):
            if config.quantization == "none":  # quantisation starts from the float weights
                linear_dtype = self.precision.linear_dtype(name)
                weight = weight.to(linear_dtype)
                bias = None if bias is None else bias.to(linear_dtype)
            return linears(name, weight, bias)

        self.model = LlamaModel(spec, tensors, dtype, max_positions=limits.max_model_len, make_linear=make_linear)
        del tensors
        linears.save()
        release_freed_memory()
        self.quantization = {"mode": config.quantization,
                             "group_size": config.quant_group_size if config.quantization == "int4" else None,
                             "from_cache": linears.loaded_from_cache,
                             "weight_bytes": self.model.weight_bytes}
        self.kernels = self.model.probe_batch_invariance(limits.max_num_batched_tokens, limits.max_num_seqs)
        self.kernels["lm_head_kernel"] = self.model.lm_head.kernel
        if linears.kernel_choices:
            self.kernels["quant_kernels"] = dict(linears.kernel_choices)
        self.decode_attention = choose_decode_attention(spec.num_heads, spec.num_kv_heads, spec.head_dim,
                                                        limits.block_size, self.precision.kv_cache)
        self.kernels["decode_attention"] = self.decode_attention.name
        self.kernels["decode_attention_reason"] = self.decode_attention.reason
        why_not_fused = self.model.use_fused(self.precision.kv_cache)
        self.kernels["fused_row_ops"] = self.model.fused is not None
        self.kernels["fused_row_ops_reason"] = why_not_fused or "native kernels built for this CPU"
        self._log_kernel_choice(config.dtype)
        self.kv_cache = KVCache(spec.num_layers, limits.kv_cache_blocks, limits.block_size,
                                spec.num_kv_heads, spec.head_dim, self.precision.kv_cache)
        self.block_manager = BlockManager(limits.kv_cache_blocks, limits.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(limits, self.block_manager)
        self.runner = ModelRunner(self.model, self.kv_cache, self.decode_attention)
        self.max_model_len = limits.max_model_len
        self.vocab_size = spec.vocab_size

        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._inbox: list[Sequence] = []
        self._cancels: set[str] = set()
        self._live: set[str] = set()  # request ids submitted and not yet finished
        self._stopping = False
        self._sequences: dict[str, Sequence] = {}  # loop thread only
        self._outbox: list[tuple[Sequence, StepOutput]] = []  # delivered after the stats are published
        self._prompt_tokens_total = 0
        self._generation_tokens_total = 0
        self._snapshot = self._make_snapshot()
        # The loop thread computes with this thread's torch thread count (OpenMP's count is per
        # thread), and this thread's OpenMP workers go (cpu.release_openmp_pool: 3x at one row).
        self._num_threads = torch.get_num_threads()
        self.kernels["openmp"] = release_openmp_pool()
        log.info("engine: %d compute threads; OpenMP: %s", self._num_threads, self.kernels["openmp"])
        self._thread = threading.Thread(target=self._loop, name="trillm-engine", daemon=True)
        self._thread.start()

    # ---- the thread-safe API -------------------------------------------------

    def submit(self, request: GenerationRequest, on_output: Callable[[StepOutput], None]) -> None:
        """Queue ``request``; raises ValueError (naming the field and rule) for a bad one."""
        self._validate(request)
        seq = Sequence.create(request, on_output)
        with self._lock:
            if self._stopping:
                raise RuntimeError("engine: shut down, no new requests")
            if request.request_id in self._live:
                raise ValueError(f"request_id: {request.request_id!r} is already in flight")
            self._live.add(request.request_id)
            self._inbox.append(seq)
            self._wakeup.notify()

    def cancel(self, request_id: str) -> None:
        """End the request with CANCELLED within one step; unknown ids are ignored."""
        with self._lock:
            if request_id in self._live:
                self._cancels.add(request_id)
                self._wakeup.notify()

    def stats(self) -> dict:
        with self._lock:
            stats = dict(self._snapshot)
            stats["waiting"] += len(self._inbox)
        stats["resident_memory_bytes"] = resident_memory_bytes()  # read here, not every step
        return stats

    def shutdown(self) -> None:
        """Stop the loop; requests in flight end with CANCELLED."""
        with self._lock:
            self._stopping = True
            self._wakeup.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def _log_kernel_choice(self, dtype: str) -> None:
        k = self.kernels
        log.info("engine: CPU %s", self.cpu.summary())
        log.info("engine: %s", self.precision.summary())
        log.info("engine: decode attention %s (%s); fused norm/RoPE/SiLU %s (%s)", k["decode_attention"],
                 k["decode_attention_reason"], "on" if k["fused_row_ops"] else "off", k["fused_row_ops_reason"])
        if k["batch_invariant"]:
            log.info("engine: %s linears (%s); steps padded to %d rows, LM head to %d: probed on this CPU, "
                     "a request's output does not depend on its batch", dtype, k["linear_kernel"],
                     k["step_row_multiple"], k["head_row_multiple"])
        else:
            log.warning("engine: %s linears (%s) are NOT batch-invariant on this CPU (row multiples probed: %s): "
                        "a request's log-probs may change in the last bits with what shares its step",
                        dtype, k["linear_kernel"], k["row_multiples"])

    # ---- validation ------------------------------------------------------------

    def _validate(self, request: GenerationRequest) -> None:
        prompt = request.prompt_ids
        max_tokens = request.params.max_tokens
        if prompt is None or len(prompt) == 0:
            raise ValueError("prompt_ids: must not be empty")
        bad = next((i for i, t in enumerate(prompt) if not _is_token(t, self.vocab_size)), None)
        if bad is not None:
            raise ValueError(
                f"prompt_ids: token {prompt[bad]!r} at index {bad} is outside the vocabulary [0, {self.vocab_size})"
            )
        if not isinstance(max_tokens, int) or max_tokens <= 0:
            raise ValueError(f"max_tokens: must be an integer > 0, got {max_tokens!r}")
        if len(prompt) + max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt_ids: {len(prompt)} prompt tokens + max_tokens {max_tokens} exceed "
                f"max_model_len {self.max_model_len}"
            )

    # ---- the loop thread -------------------------------------------------------

    def _loop(self) -> None:
        torch.set_num_threads(self._num_threads)
        with torch.inference_mode():
            while True:
                with self._lock:
                    while not (self._stopping or self._inbox or self._cancels or self.scheduler.has_work):
                        self._wakeup.wait()
                    if self._stopping:
                        break
                    inbox, self._inbox = self._inbox, []
                    cancels, self._cancels = self._cancels, set()
                try:
                    for seq in inbox:
                        self._sequences[seq.request_id] = seq
                        self.scheduler.add(seq)
                    for request_id in cancels:
                        seq = self._sequences.get(request_id)
                        if seq is not None:
                            self._finish(seq, FinishReason.CANCELLED)
                    if self.scheduler.has_work:
                        self._step()
                except Exception as e:  # noqa: BLE001 - a bug must not take the engine down
                    log.exception("engine step failed; ending the requests in flight")
                    for seq in list(self._sequences.values()):
                        self._finish(seq, FinishReason.ERROR, f"engine error: {e}")
                self._flush()
            with self._lock:
                inbox, self._inbox = self._inbox, []
            for seq in inbox:
                self._sequences[seq.request_id] = seq
                self.scheduler.add(seq)
            for seq in list(self._sequences.values()):
                self._finish(seq, FinishReason.CANCELLED)
            self._flush()

    def _step(self) -> None:
        chunks = self.scheduler.schedule()
        if not chunks:
            with self._lock:  # nothing runnable (should not happen): do not spin
                self._wakeup.wait(0.01)
            return
        for chunk in chunks:
            if not chunk.seq.ever_admitted:
                chunk.seq.ever_admitted = True
                self._prompt_tokens_total += chunk.seq.num_prompt_tokens
        try:
            logits = self.runner.run(chunks)
        except Exception as e:  # noqa: BLE001 - fails this step's requests only
            log.exception("forward failed")
            for chunk in chunks:
                self._finish(chunk.seq, FinishReason.ERROR, f"forward failed: {type(e).__name__}: {e}")
            return
        self.scheduler.complete(chunks)
        sampled = [chunk.seq for chunk in chunks if chunk.samples]
        for seq, result in zip(sampled, sample(logits, sampled)):
            if isinstance(result, Exception):
                self._finish(seq, FinishReason.ERROR, f"sampling failed: {type(result).__name__}: {result}")
                continue
            token, log_prob = result
            params = seq.params
            if token in params.end_ids:
                self._finish(seq, FinishReason.END)
                continue
            seq.append_token(token, log_prob if params.return_log_probs else None)
            self._generation_tokens_total += 1
            if seq.num_output_tokens >= params.max_tokens:
                self._finish(seq, FinishReason.LENGTH)
            else:
                ids, log_probs = seq.take_output()
                self._outbox.append((seq, StepOutput(seq.request_id, ids, log_probs)))

    def _finish(self, seq: Sequence, reason: FinishReason, error: str | None = None) -> None:
        """End ``seq``: free its blocks and send its final output (with any tokens not yet sent)."""
        if self._sequences.pop(seq.request_id, None) is None:
            return
        self.scheduler.finish(seq)
        with self._lock:
            self._live.discard(seq.request_id)
        ids, log_probs = seq.take_output()
        self._outbox.append((seq, StepOutput(seq.request_id, ids, log_probs, finished=True,
                                             finish_reason=reason, error=error)))

    def _flush(self) -> None:
        """Publish the stats, then hand out the step's outputs (so a host that sees a
        request finish also sees its blocks freed)."""
        self._publish_stats()
        while self._outbox:
            outbox, self._outbox = self._outbox, []
            for seq, output in outbox:
                try:
                    seq.on_output(output)
                except Exception as e:  # noqa: BLE001 - the host's callback failed; end that request only
                    log.exception("on_output of request %r raised", seq.request_id)
                    if not output.finished:
                        self._finish(seq, FinishReason.ERROR, f"on_output raised {type(e).__name__}: {e}")
            self._publish_stats()

    def _make_snapshot(self) -> dict:
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "kv_blocks_used": self.block_manager.num_used_blocks,
            "kv_blocks_total": self.block_manager.num_blocks,
            "prefix_cache_hit_blocks": self.block_manager.prefix_cache_hit_blocks,
            "prompt_tokens_total": self._prompt_tokens_total,
            "generation_tokens_total": self._generation_tokens_total,
            "preemptions": self.scheduler.num_preemptions,
            "batch_invariant": self.kernels["batch_invariant"],
            "quantization": self.quantization,
            "kernels": self.kernels,
            "precision": self.precision.as_dict(),
            "cpu": self.cpu.as_dict(),
        }

    def _publish_stats(self) -> None:
        snapshot = self._make_snapshot()
        with self._lock:
            self._snapshot = snapshot
