"""preprocessing / postprocessing model code in-process, on the FAKE
triton_python_backend_utils of tests/fake_pb_utils.py (no server)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import fake_pb_utils as pb
from trillm.tokenizer import load_tokenizer
from trillm.triton import postprocessing, preprocessing

pytestmark = pytest.mark.unit


def _args(name: str, **params) -> dict:
    config = {"name": name, "parameters": {k: {"string_value": str(v)} for k, v in params.items()}}
    return {"model_config": json.dumps(config), "model_name": name, "model_version": "1"}


@pytest.fixture(scope="module")
def pre(demo_model_dir):
    model = preprocessing.TritonPythonModel()
    model.initialize(_args("preprocessing", tokenizer_dir=demo_model_dir, max_model_len=64, max_input_len=32))
    return model


@pytest.fixture(scope="module")
def post(demo_model_dir):
    model = postprocessing.TritonPythonModel()
    model.initialize(_args("postprocessing", tokenizer_dir=demo_model_dir))
    return model


def _strings(*values) -> np.ndarray:
    return np.array([[v if isinstance(v, bytes) else v.encode() for v in values]], dtype=object)


def _outputs(response) -> dict:
    assert not response.has_error(), response.error().message()
    return {t.name(): t.as_numpy() for t in response.output_tensors()}


def test_preprocessing_tokenises_and_packs_word_lists(pre, demo_model_dir):
    tok = load_tokenizer(demo_model_dir)
    request = pb.InferenceRequest({
        "QUERY": _strings("Hello world"),
        "REQUEST_OUTPUT_LEN": np.array([[5]], dtype=np.int32),
        "STOP_WORDS_DICT": _strings("world", "!"),
        "BAD_WORDS_DICT": _strings("foo"),
    })
    out = _outputs(pre.execute([request])[0])
    ids = tok.encode("Hello world")
    assert out["INPUT_ID"][0].tolist() == ids
    assert out["REQUEST_INPUT_LEN"].tolist() == [[len(ids)]]
    assert out["OUT_END_ID"].tolist() == [[tok.eos_id]]
    stop = out["STOP_WORDS_IDS"][0]
    assert stop.shape[0] == 2 and stop[1, 1] == len(tok.encode("world", add_special_tokens=False)) + len(
        tok.encode("!", add_special_tokens=False))
    bad = out["BAD_WORDS_IDS"][0]
    assert (bad[1] >= 0).sum() == 2, "bad word banned with and without a leading space"


@pytest.mark.parametrize(
    "inputs,name,rule",
    [
        ({"QUERY": _strings(""), "REQUEST_OUTPUT_LEN": np.array([[4]], np.int32)}, "text_input", "empty"),
        ({"QUERY": _strings(b"\xff"), "REQUEST_OUTPUT_LEN": np.array([[4]], np.int32)}, "text_input", "UTF-8"),
        ({"QUERY": _strings("hi"), "REQUEST_OUTPUT_LEN": np.array([[0]], np.int32)}, "max_tokens", "> 0"),
        ({"QUERY": _strings("hi"), "REQUEST_OUTPUT_LEN": np.array([[90]], np.int32)}, "max_tokens", "context window"),
        ({"QUERY": _strings("word " * 100), "REQUEST_OUTPUT_LEN": np.array([[4]], np.int32)}, "text_input", "maximum input length"),
        ({"QUERY": _strings("hi"), "REQUEST_OUTPUT_LEN": np.array([[4]], np.int32), "END_ID": np.array([[10**6]], np.int32)}, "end_id", "token id"),
        ({"REQUEST_OUTPUT_LEN": np.array([[4]], np.int32)}, "text_input", "required"),
    ],
)
def test_preprocessing_names_the_bad_input(pre, inputs, name, rule):
    response = pre.execute([pb.InferenceRequest(inputs)])[0]
    assert response.has_error()
    message = response.error().message()
    assert f"'{name}'" in message and rule in message


def test_a_bad_request_does_not_fail_its_neighbours(pre):
    good = pb.InferenceRequest({"QUERY": _strings("ok"), "REQUEST_OUTPUT_LEN": np.array([[4]], np.int32)})
    bad = pb.InferenceRequest({"QUERY": _strings(""), "REQUEST_OUTPUT_LEN": np.array([[4]], np.int32)})
    responses = pre.execute([bad, good])
    assert responses[0].has_error() and not responses[1].has_error()


def test_postprocessing_renders_windows_exactly(post, demo_model_dir):
    tok = load_tokenizer(demo_model_dir)
    text = "naïve 東京 🙂 done"
    ids = tok.encode(text, add_special_tokens=False)
    # Render in two pieces: the window of the second carries the first as prefix.
    cut = len(tok.encode("naïve", add_special_tokens=False))  # a word boundary
    assert ids[:cut] == tok.encode("naïve", add_special_tokens=False)
    first = post.render(np.array([[ids[:cut]]]), np.array([[cut]]), None, None)[0, 0].decode()
    second = post.render(np.array([[ids]]), np.array([[len(ids)]]), np.array([[cut]]), None)[0, 0].decode()
    assert first == "naïve" and first + second == text
    limited = post.render(np.array([[ids]]), np.array([[len(ids)]]), None, np.array([[5]]))[0, 0].decode()
    assert limited == text[:5]


def test_postprocessing_passes_extra_outputs_through(post):
    request = pb.InferenceRequest({
        "TOKENS_BATCH": np.array([[[5, 6]]], np.int32),
        "SEQUENCE_LENGTH": np.array([[2]], np.int32),
        "CUM_LOG_PROBS": np.array([[-1.5]], np.float32),
        "FINISH_REASON": np.array([[b"stop"]], dtype=object),
    })
    out = _outputs(post.execute([request])[0])
    assert out["OUT_CUM_LOG_PROBS"].tolist() == [[-1.5]]
    assert out["OUT_FINISH_REASON"].tolist() == [[b"stop"]]
    assert out["OUTPUT"].shape == (1, 1)
