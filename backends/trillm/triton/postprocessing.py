"""``postprocessing``: token ids in, text out (INTERFACE.md).

Stateless, so it can batch any responses together. Exact streaming comes
from the engine host: each streamed response carries a window of ids whose
first PREFIX_LENGTH ids were already rendered, so the new text is
``decode(window) - decode(window[:PREFIX_LENGTH])`` (trillm.detokenizer),
which keeps spaces and multi-token characters intact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import triton_python_backend_utils as pb_utils

from trillm.detokenizer import decode_delta
from trillm.tokenizer import load_tokenizer
from trillm.triton import io
from trillm.triton.lifecycle import watch_parent
from trillm.triton import tensors as T
from trillm.triton.errors import InputError
from trillm.triton.params import model_parameters
from trillm.triton.stop import StopOnce


@dataclass
class PostprocessingParams:
    tokenizer_dir: str
    skip_special_tokens: bool = True


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        watch_parent()
        self.params = model_parameters(args, PostprocessingParams)
        self.tokenizer = load_tokenizer(self.params.tokenizer_dir)
        # Pipelines are never mixed: the engine of this call is our own version.
        self.stop = StopOnce(int(args.get("model_version", -1)))

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            if request.is_cancelled():
                responses.append(self._cancelled(request))
                continue
            try:
                responses.append(self._execute_one(request))
            except InputError as exc:
                responses.append(io.error_response(exc))
        return responses

    def _cancelled(self, request):
        """The client cancelled: stop the engine's call too (see trillm.triton.stop)."""
        key = io.optional_input(request, T.POST_REQUEST_KEY)
        if key is not None:
            try:
                self.stop(str(int(np.asarray(key).reshape(-1)[0])))
            except Exception:  # the call may be gone already; nothing to stop
                pass
        code = getattr(pb_utils.TritonError, "CANCELLED", None)
        error = pb_utils.TritonError("request cancelled", code) if code is not None else pb_utils.TritonError("request cancelled")
        return pb_utils.InferenceResponse(output_tensors=[], error=error)

    def render(self, tokens: np.ndarray, seq_len: np.ndarray, prefix: np.ndarray | None, limit: np.ndarray | None):
        """Text of every (batch row, beam): tokens [B, beams, L], seq_len [B, beams]."""
        batch, beams = seq_len.shape[0], seq_len.reshape(seq_len.shape[0], -1).shape[1]
        tokens = tokens.reshape(batch, beams, -1)
        seq_len = seq_len.reshape(batch, beams)
        out = np.empty((batch, beams), dtype=object)
        for b in range(batch):
            prefix_len = int(io.row_scalar(prefix, b, T.POST_PREFIX_LEN, 0))
            text_len = int(io.row_scalar(limit, b, T.POST_TEXT_LEN, -1))
            for k in range(beams):
                n = int(seq_len[b, k])
                if not 0 <= prefix_len <= n <= tokens.shape[2]:
                    raise InputError(T.POST_SEQ_LEN, f"sequence length {n} / prefix {prefix_len} out of range")
                text = decode_delta(
                    self.tokenizer, tokens[b, k, :n].tolist(), prefix_len, self.params.skip_special_tokens
                )
                if text_len >= 0:
                    text = text[:text_len]
                out[b, k] = text.encode("utf-8")
        return out

    def _execute_one(self, request):
        tokens = io.required_input(request, T.POST_TOKENS)
        seq_len = io.required_input(request, T.POST_SEQ_LEN)
        text = self.render(
            tokens,
            seq_len,
            io.optional_input(request, T.POST_PREFIX_LEN),
            io.optional_input(request, T.POST_TEXT_LEN),
        )
        outputs = [pb_utils.Tensor(T.POST_OUTPUT, text)]
        for name, out_name in T.POST_PASSTHROUGH.items():
            value = pb_utils.get_input_tensor_by_name(request, name)
            if value is not None:
                outputs.append(pb_utils.Tensor(out_name, value.as_numpy()))
        return pb_utils.InferenceResponse(output_tensors=outputs)
