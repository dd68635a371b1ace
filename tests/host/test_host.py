"""GenerationHost on the real torch engine and demo tokenizer (no server):
exact streaming, text-level stop words, echo, cancellation, errors."""

from __future__ import annotations

import threading

import pytest

from trillm.engine.types import GenerationRequest, SamplingParams
from trillm.host import GenerationHost, HostRequest, HostResponse
from trillm.tokenizer import load_tokenizer
from trillm.triton.errors import InputError

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def host(demo_model_dir):
    from trillm.engine import EngineConfig, TorchEngine

    engine = TorchEngine(EngineConfig(checkpoint_dir=str(demo_model_dir), max_model_len=512))
    h = GenerationHost(engine, load_tokenizer(demo_model_dir))
    yield h
    h.shutdown()


@pytest.fixture(scope="module")
def tok(demo_model_dir):
    return load_tokenizer(demo_model_dir)


class Collector:
    def __init__(self) -> None:
        self.responses: list[HostResponse] = []
        self.done = threading.Event()
        self.cancel = False

    def send(self, response: HostResponse) -> None:
        assert not self.done.is_set(), "a response after the final one"
        self.responses.append(response)
        if response.final:
            self.done.set()

    def wait(self) -> "Collector":
        assert self.done.wait(120), "no final response"
        return self

    @property
    def text(self) -> str:
        return "".join(r.text for r in self.responses)


def run(host, tok, prompt: str, **kw) -> Collector:
    c = Collector()
    host.start([HostRequest(input_ids=tok.encode(prompt), **kw)], c.send, lambda: c.cancel)
    return c.wait()


@pytest.mark.parametrize("prompt", ["The quick brown fox", "Grüße 東京 🙂👩‍👩‍👧"])
def test_streamed_text_equals_whole_text(host, tok, prompt):
    whole = run(host, tok, prompt, max_tokens=40)
    streamed = run(host, tok, prompt, max_tokens=40, streaming=True)
    assert len(whole.responses) == 1 and len(streamed.responses) > 3
    assert streamed.text == whole.text and whole.text
    # every response renders from its own window exactly as postprocessing will
    from trillm.detokenizer import decode_delta

    for r in streamed.responses + whole.responses:
        rendered = decode_delta(tok, r.output_ids, r.prefix_length, True)
        assert (rendered if r.text_length < 0 else rendered[: r.text_length]) == r.text


@pytest.mark.parametrize("streaming", [False, True])
def test_stop_word_cuts_text_exactly(host, tok, streaming):
    full = run(host, tok, "Once upon a time", max_tokens=48).text
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    stop_ids = tok.encode(stop, add_special_tokens=False)
    got = run(host, tok, "Once upon a time", max_tokens=48, streaming=streaming, stop_words=[stop_ids])
    assert got.text == full[: full.index(stop)]
    assert got.responses[-1].finish_reason == "stop"


def test_echo_prepends_the_prompt(host, tok):
    prompt = "Echo this please"
    plain = run(host, tok, prompt, max_tokens=8)
    echo = run(host, tok, prompt, max_tokens=8, exclude_input=False)
    assert echo.text == prompt + plain.text


def test_end_id_stops_before_that_token(host, tok):
    full = run(host, tok, "Count to ten", max_tokens=24)
    ids = tok.encode(full.text, add_special_tokens=False)
    end_id = ids[5]
    got = run(host, tok, "Count to ten", max_tokens=24, end_id=end_id)
    assert got.responses[-1].finish_reason == "end"
    assert got.responses[-1].num_output_tokens < 24


def test_any_eos_id_of_the_model_ends_generation(host, demo_model_dir, tok):
    """A model with two EOS ids (Llama 3 instruct: <|end_of_text|>, <|eot_id|>): an end_id that
    is one of them stops on either; an end_id that is not an EOS id stops on itself alone."""
    from trillm.engine import EngineConfig, TorchEngine

    generated, done = [], threading.Event()
    host.engine.submit(GenerationRequest("eos-probe", tok.encode("Count to ten"), SamplingParams(max_tokens=24)),
                       lambda out: (generated.extend(out.token_ids), out.finished and done.set()))
    assert done.wait(120)
    two_eos = load_tokenizer(demo_model_dir)
    two_eos.eos_ids = (two_eos.eos_id, generated[3])
    other = GenerationHost(TorchEngine(EngineConfig(checkpoint_dir=str(demo_model_dir), max_model_len=512)), two_eos)
    try:
        got = run(other, two_eos, "Count to ten", max_tokens=24, end_id=two_eos.eos_id)
        assert got.responses[-1].finish_reason == "end"
        assert got.responses[-1].num_output_tokens < 24
        unused = next(t for t in range(3, two_eos.vocab_size) if t not in generated and t not in two_eos.eos_ids)
        alone = run(other, two_eos, "Count to ten", max_tokens=24, end_id=unused)
        assert alone.responses[-1].finish_reason == "length"
    finally:
        other.shutdown()


def test_num_return_sequences_get_their_own_index(host, tok):
    got = run(host, tok, "Sample me", max_tokens=8, temperature=1.0, seed=7, num_return_sequences=3)
    assert sorted(r.sequence_index for r in got.responses) == [0, 1, 2]
    assert sum(r.final for r in got.responses) == 1


@pytest.mark.parametrize(
    "kw,name",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 8, "top_p": 0.0}, "top_p"),
        ({"max_tokens": 8, "temperature": -1.0}, "temperature"),
        ({"max_tokens": 8, "beam_width": 2}, "beam_width"),
        ({"max_tokens": 10_000}, "max_tokens"),
        ({"max_tokens": 8, "top_k": -1}, "top_k"),
    ],
)
def test_bad_rows_raise_before_anything_runs(host, tok, kw, name):
    with pytest.raises(InputError) as info:
        host.start([HostRequest(input_ids=tok.encode("hi"), **kw)], lambda r: None)
    assert info.value.input_name == name


def test_cancel_finishes_the_call(host, tok):
    c = Collector()
    host.start([HostRequest(input_ids=tok.encode("Long story"), max_tokens=400, streaming=True)], c.send,
               lambda: c.cancel)
    while not c.responses:
        c.done.wait(0.01)
    c.cancel = True
    c.wait()
    assert c.responses[-1].final
    assert sum(r.num_output_tokens for r in c.responses[-1:]) < 400
    # the engine is free again
    assert run(host, tok, "after", max_tokens=4).text is not None
