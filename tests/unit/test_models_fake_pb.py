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


CHAT = json.dumps([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Bonjour 😀"}])


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
        ({"stream": np.array([[True]])}, "text_input", "required"),
        ({"QUERY": _strings("hi")}, "max_tokens", "required"),
        ({"QUERY": _strings("hi"), "MESSAGES": _strings(CHAT), "REQUEST_OUTPUT_LEN": np.array([[4]], np.int32)},
         "messages", "not both"),
        ({"MESSAGES": _strings("[{]"), "REQUEST_OUTPUT_LEN": np.array([[4]], np.int32)}, "messages", "not valid JSON"),
        ({"MESSAGES": _strings('[{"role": "user"}]'), "REQUEST_OUTPUT_LEN": np.array([[4]], np.int32)},
         "messages", 'no "content"'),
        ({"MESSAGES": _strings(b"\xff"), "REQUEST_OUTPUT_LEN": np.array([[4]], np.int32)}, "messages", "UTF-8"),
        ({"MESSAGES": _strings(json.dumps([{"role": "tool", "content": "x"}])),
          "REQUEST_OUTPUT_LEN": np.array([[4]], np.int32)}, "messages", "roles must be"),
        ({"MESSAGES": _strings(json.dumps([{"role": "user", "content": "word " * 100}])),
          "REQUEST_OUTPUT_LEN": np.array([[4]], np.int32)}, "messages", "maximum input length"),
        ({"QUERY": _strings("hi"), "REQUEST_OUTPUT_LEN": np.array([[4]], np.int32),
          "MIN_TOKENS": np.array([[3]], np.int32), "MIN_LENGTH": np.array([[4]], np.int32)}, "min_length", "older name"),
        ({"QUERY": _strings("hi"), "REQUEST_OUTPUT_LEN": np.array([[4]], np.int32),
          "MIN_LENGTH": np.array([[-1]], np.int32)}, "min_length", ">= 0"),
    ],
)
def test_preprocessing_names_the_bad_input(pre, inputs, name, rule):
    response = pre.execute([pb.InferenceRequest(inputs)])[0]
    assert response.has_error()
    message = response.error().message()
    assert f"'{name}'" in message and rule in message


def test_preprocessing_renders_messages_with_the_chat_template(pre, demo_model_dir):
    tok = load_tokenizer(demo_model_dir)
    request = pb.InferenceRequest({"MESSAGES": _strings(CHAT), "REQUEST_OUTPUT_LEN": np.array([[5]], dtype=np.int32)})
    out = _outputs(pre.execute([request])[0])
    rendered = tok.apply_chat_template(json.loads(CHAT), add_generation_prompt=True)
    assert rendered.endswith("<|assistant|>\n")
    # The template decides the special tokens (transformers' apply_chat_template(tokenize=True) does the same).
    assert out["INPUT_ID"][0].tolist() == tok.encode(rendered, add_special_tokens=False)
    assert out["OUT_END_ID"].tolist() == [[tok.eos_id]]


def test_messages_to_a_model_without_a_chat_template_are_named(metaspace_dir):
    model = preprocessing.TritonPythonModel()
    model.initialize(_args("preprocessing", tokenizer_dir=metaspace_dir, max_model_len=64))
    request = pb.InferenceRequest({"MESSAGES": _strings(CHAT), "REQUEST_OUTPUT_LEN": np.array([[5]], dtype=np.int32)})
    response = model.execute([request])[0]
    assert response.has_error()
    assert "input 'messages'" in response.error().message() and "no chat template" in response.error().message()


@pytest.mark.parametrize(
    "given,expected",
    [({}, 0), ({"MIN_TOKENS": 3}, 3), ({"MIN_LENGTH": 4}, 4), ({"MIN_TOKENS": 2, "MIN_LENGTH": 2}, 2)],
)
def test_min_length_is_min_tokens(pre, given, expected):
    request = pb.InferenceRequest({
        "QUERY": _strings("hi"), "REQUEST_OUTPUT_LEN": np.array([[5]], dtype=np.int32),
        **{name: np.array([[value]], dtype=np.int32) for name, value in given.items()},
    })
    assert _outputs(pre.execute([request])[0])["OUT_MIN_TOKENS"].tolist() == [[expected]]


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
