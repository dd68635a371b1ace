"""Tensor names of the wire contract (shared/INTERFACE.md), in one table.

User-facing names (``ensemble`` / ``tensorrt_llm_bls``) map to the names the
internal models use. Extra tensors that are ours (not in NVIDIA's backend)
are optional, so any client of the reference contract still works.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Spec:
    name: str
    dtype: type  # numpy dtype of the tensor
    default: object = None  # value when the optional input is absent


# --- user-facing inputs of ensemble / tensorrt_llm_bls -------------------
TEXT_INPUT = "text_input"
# Ours: a JSON chat rendered with the checkpoint's chat template (trillm.chat_template),
# instead of text_input.
MESSAGES = "messages"
MAX_TOKENS = "max_tokens"
STREAM = "stream"
EXCLUDE_INPUT = "exclude_input_in_output"
BAD_WORDS = "bad_words"
STOP_WORDS = "stop_words"
END_ID = "end_id"
PAD_ID = "pad_id"
MIN_TOKENS = "min_tokens"
# The older name of min_tokens, which genai-perf's fixed-length mode sends.
MIN_LENGTH = "min_length"
RETURN_NUM_INPUT = "return_num_input_tokens"
RETURN_NUM_OUTPUT = "return_num_output_tokens"

# Sampling inputs: user-facing name -> (engine-host name, dtype, default).
SAMPLING_INPUTS: dict[str, Spec] = {
    "top_k": Spec("runtime_top_k", np.int32, 0),
    "top_p": Spec("runtime_top_p", np.float32, 1.0),
    "temperature": Spec("temperature", np.float32, 0.0),
    "length_penalty": Spec("len_penalty", np.float32, 1.0),
    "repetition_penalty": Spec("repetition_penalty", np.float32, 1.0),
    "presence_penalty": Spec("presence_penalty", np.float32, 0.0),
    "frequency_penalty": Spec("frequency_penalty", np.float32, 0.0),
    MIN_TOKENS: Spec("min_tokens", np.int32, 0),
    "seed": Spec("seed", np.uint64, None),
    "beam_width": Spec("beam_width", np.int32, 1),
    "num_return_sequences": Spec("num_return_sequences", np.int32, 1),
    "return_log_probs": Spec("return_log_probs", np.bool_, False),
}

# --- preprocessing -------------------------------------------------------
PRE_QUERY = "QUERY"
PRE_MESSAGES = "MESSAGES"
PRE_OUTPUT_LEN = "REQUEST_OUTPUT_LEN"
PRE_BAD_WORDS = "BAD_WORDS_DICT"
PRE_STOP_WORDS = "STOP_WORDS_DICT"
PRE_END_ID = "END_ID"
PRE_PAD_ID = "PAD_ID"
PRE_MIN_TOKENS = "MIN_TOKENS"
PRE_MIN_LENGTH = "MIN_LENGTH"
PRE_OUT_INPUT_ID = "INPUT_ID"
PRE_OUT_INPUT_LEN = "REQUEST_INPUT_LEN"
PRE_OUT_BAD_WORDS = "BAD_WORDS_IDS"
PRE_OUT_STOP_WORDS = "STOP_WORDS_IDS"
PRE_OUT_END_ID = "OUT_END_ID"
PRE_OUT_PAD_ID = "OUT_PAD_ID"
PRE_OUT_MIN_TOKENS = "OUT_MIN_TOKENS"

# Which user-facing input each preprocessing input carries. Every one is
# optional in the configs, so that a missing input reaches preprocessing and
# gets our error naming it: a Triton 2.51 ensemble whose required input is
# missing may answer with an empty final response and no error at all.
PRE_USER_NAMES = {
    PRE_QUERY: TEXT_INPUT,
    PRE_MESSAGES: MESSAGES,
    PRE_OUTPUT_LEN: MAX_TOKENS,
    PRE_BAD_WORDS: BAD_WORDS,
    PRE_STOP_WORDS: STOP_WORDS,
    PRE_END_ID: END_ID,
    PRE_PAD_ID: PAD_ID,
    # min_tokens goes through preprocessing, which reconciles it with min_length.
    PRE_MIN_TOKENS: MIN_TOKENS,
    PRE_MIN_LENGTH: MIN_LENGTH,
}
# The other user inputs also go to preprocessing, under their own names, only
# to be there: a Python model with max_batch_size > 0 refuses a request with no
# inputs ("request has 0 inputs") before our code runs, so a request carrying
# only these would not get our error naming the prompt and max_tokens it lacks.
PRE_SEEN_INPUTS = (
    STREAM, EXCLUDE_INPUT, RETURN_NUM_INPUT, RETURN_NUM_OUTPUT,
    *(name for name in SAMPLING_INPUTS if name != MIN_TOKENS),
)

# --- tensorrt_llm (engine host) ------------------------------------------
ENG_INPUT_IDS = "input_ids"
ENG_INPUT_LENGTHS = "input_lengths"
ENG_OUTPUT_LEN = "request_output_len"
ENG_END_ID = "end_id"
ENG_PAD_ID = "pad_id"
ENG_STREAMING = "streaming"
ENG_EXCLUDE_INPUT = "exclude_input_in_output"
ENG_STOP_WORDS = "stop_words_list"
ENG_BAD_WORDS = "bad_words_list"
# A request with stop=true cancels the running call named by its request id.
ENG_STOP = "stop"

ENG_OUT_IDS = "output_ids"
ENG_OUT_SEQ_LEN = "sequence_length"
ENG_OUT_CUM_LOG_PROBS = "cum_log_probs"
ENG_OUT_LOG_PROBS = "output_log_probs"
ENG_OUT_BATCH_INDEX = "batch_index"
ENG_OUT_SEQ_INDEX = "sequence_index"
# Ours: how the text of this response is rendered from output_ids (see
# trillm.detokenizer): the first `prefix_length` ids are context already
# rendered; `text_length` characters of the new text are kept (-1 = all).
ENG_OUT_PREFIX_LEN = "prefix_length"
ENG_OUT_TEXT_LEN = "text_length"
ENG_OUT_NUM_INPUT = "num_input_tokens"
ENG_OUT_NUM_OUTPUT = "num_output_tokens"
ENG_OUT_FINISH_REASON = "finish_reason"
# Names the call, so that a model downstream can send a stop request for it.
ENG_OUT_REQUEST_KEY = "request_key"

# --- postprocessing ------------------------------------------------------
POST_TOKENS = "TOKENS_BATCH"
POST_SEQ_LEN = "SEQUENCE_LENGTH"
POST_PREFIX_LEN = "PREFIX_LENGTH"
POST_TEXT_LEN = "TEXT_LENGTH"
POST_REQUEST_KEY = "REQUEST_KEY"
POST_OUTPUT = "OUTPUT"
# Pass-through tensors: postprocessing input -> its output. Routing them
# through postprocessing makes every ensemble response carry all outputs.
POST_PASSTHROUGH = {
    "CUM_LOG_PROBS": "OUT_CUM_LOG_PROBS",
    "OUTPUT_LOG_PROBS": "OUT_OUTPUT_LOG_PROBS",
    "BATCH_INDEX": "OUT_BATCH_INDEX",
    "SEQUENCE_INDEX": "OUT_SEQUENCE_INDEX",
    "NUM_INPUT_TOKENS": "OUT_NUM_INPUT_TOKENS",
    "NUM_OUTPUT_TOKENS": "OUT_NUM_OUTPUT_TOKENS",
    "FINISH_REASON": "OUT_FINISH_REASON",
}

# --- user-facing outputs -------------------------------------------------
TEXT_OUTPUT = "text_output"
# engine-host output -> (postprocessing input, user-facing output)
OUTPUT_ROUTES = {
    ENG_OUT_CUM_LOG_PROBS: ("CUM_LOG_PROBS", "cum_log_probs"),
    ENG_OUT_LOG_PROBS: ("OUTPUT_LOG_PROBS", "output_log_probs"),
    ENG_OUT_BATCH_INDEX: ("BATCH_INDEX", "batch_index"),
    ENG_OUT_SEQ_INDEX: ("SEQUENCE_INDEX", "sequence_index"),
    ENG_OUT_NUM_INPUT: ("NUM_INPUT_TOKENS", "num_input_tokens"),
    ENG_OUT_NUM_OUTPUT: ("NUM_OUTPUT_TOKENS", "num_output_tokens"),
    ENG_OUT_FINISH_REASON: ("FINISH_REASON", "finish_reason"),
}
