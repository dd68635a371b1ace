"""Streamed text is exact: deltas concatenate to the whole decode, byte for
byte, for byte-level BPE and sentencepiece-style tokenizers; every delta is
reproducible from its (window, prefix_len); stop strings cut the text exactly
and are never streamed."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trillm.detokenizer import IncrementalDetokenizer, StopStringMatcher, TextStream, decode_delta

pytestmark = pytest.mark.unit

TEXTS = [
    "Hello world, how are you?",
    "café naïve Größe — «quotes» … done",
    "你好，世界。こんにちは 안녕하세요",
    "emoji 🦜🦩 🧑‍🚀 🇯🇵 🫠 split across byte tokens",
    "  two  spaces\tand tab\nnew line ",
]


@pytest.fixture(scope="module", params=["byte_level", "metaspace"])
def tok(request, demo_tok, metaspace_tok):
    return demo_tok if request.param == "byte_level" else metaspace_tok


def expected_text(tok, prompt_ids, generated):
    """The generated part of the whole decode, the streaming invariant."""
    return tok.decode(prompt_ids + generated)[len(tok.decode(prompt_ids)):]


def stream(tok, prompt_ids, generated, chunks=None, stop_strings=()):
    """Feed ``generated`` to a TextStream in ``chunks`` (sizes; default 1 by 1)."""
    text = TextStream(tok, prompt_ids, stop_strings)
    deltas, i = [], 0
    for size in chunks or [1] * len(generated):
        if i >= len(generated):
            break
        deltas.append(text.add(generated[i:i + size]))
        i += size
    if i < len(generated):
        deltas.append(text.add(generated[i:]))
    deltas.append(text.finish())
    deltas = [d for d in deltas if d is not None]
    for d in deltas:
        rendered = decode_delta(tok, d.window_ids, d.prefix_len)
        assert rendered.startswith(d.text) and (rendered == d.text or d is deltas[-1]), d
    return text, deltas


@pytest.mark.parametrize("sample", TEXTS)
def test_token_by_token_deltas_concatenate_to_the_whole_decode(tok, sample):
    prompt = tok.encode("Prompt:")
    generated = tok.encode(" " + sample, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, prompt)
    deltas = [detok.add([t]) for t in generated] + [detok.finish()]
    pieces = [d.text for d in deltas if d is not None]
    assert "".join(pieces) == detok.text == expected_text(tok, prompt, generated)
    assert "\ufffd" not in detok.text
    for d in deltas:
        if d is not None:
            assert decode_delta(tok, d.window_ids, d.prefix_len) == d.text


def test_the_emoji_sample_really_splits_characters(demo_tok, metaspace_tok):
    for tok in (demo_tok, metaspace_tok):
        ids = tok.encode(TEXTS[3], add_special_tokens=False)
        assert any("\ufffd" in tok.decode([i]) for i in ids)


def test_byte_level_deltas_equal_the_decode_of_the_generated_ids(demo_tok):
    for sample in TEXTS:
        generated = demo_tok.encode(sample, add_special_tokens=False)
        _, deltas = stream(demo_tok, demo_tok.encode("x"), generated)
        assert "".join(d.text for d in deltas) == demo_tok.decode(generated) == sample


def test_first_generated_word_keeps_its_space(metaspace_tok):
    prompt = metaspace_tok.encode("Hello")
    generated = metaspace_tok.encode("world", add_special_tokens=False)  # "▁world"
    assert metaspace_tok.decode(generated) == "world"  # decoded alone, the space is lost
    _, deltas = stream(metaspace_tok, prompt, generated)
    assert "".join(d.text for d in deltas) == " world"


@settings(max_examples=150, deadline=None)
@given(data=st.data(), text=st.text(min_size=1, max_size=40))
def test_any_text_any_chunking(tok, data, text):
    prompt = tok.encode(data.draw(st.sampled_from(["", "a", "Hi 😀", "你好"])))
    generated = tok.encode(text, add_special_tokens=False)
    chunks = data.draw(st.lists(st.integers(1, 4), max_size=len(generated)))
    result, deltas = stream(tok, prompt, generated, chunks)
    assert "".join(d.text for d in deltas) == result.text == expected_text(tok, prompt, generated)


@settings(max_examples=150, deadline=None)
@given(ids=st.lists(st.integers(0, 8191), max_size=30), chunks=st.lists(st.integers(1, 3)))
def test_any_byte_level_ids_even_invalid_utf8(demo_tok, ids, chunks):
    result, deltas = stream(demo_tok, demo_tok.encode("Q:"), ids, chunks)
    assert "".join(d.text for d in deltas) == result.text == demo_tok.decode(ids)


# -- stop strings -----------------------------------------------------------

def test_matcher_finds_the_first_stop_to_appear_and_holds_back_prefixes():
    m = StopStringMatcher(["abcd", "bc", "", "xyz"])
    assert m.stop_strings == ("abcd", "bc", "xyz")
    assert m.find("zabcd") == 2  # "bc" is complete before "abcd"
    assert m.find("zzz") is None
    assert m.find("zzxyz", checked=4) == 2  # a match that straddles what was already searched
    assert m.holdback("hello ab") == 2 and m.holdback("hello x") == 1 and m.holdback("hello") == 0
    assert StopStringMatcher([]).find("anything") is None


def test_stop_string_spanning_several_tokens(demo_tok):
    sample = "Héllo wörld, 你好 😀🚀 and more"
    generated = demo_tok.encode(sample, add_special_tokens=False)
    stop = " wörld, 你"  # starts where the token " w" starts
    assert sum(stop in demo_tok.decode([t]) for t in generated) == 0  # spans tokens
    result, deltas = stream(demo_tok, demo_tok.encode("Q"), generated, stop_strings=[stop])
    streamed = "".join(d.text for d in deltas)
    assert result.stopped and streamed == result.text == "Héllo"
    assert demo_tok.decode(generated[: result.num_tokens_kept]) == "Héllo"


def test_stop_at_position_zero_emits_nothing(tok):
    prompt, generated = tok.encode("Q"), tok.encode("stop here please", add_special_tokens=False)
    result, deltas = stream(tok, prompt, generated, stop_strings=[expected_text(tok, prompt, generated)[:3]])
    assert result.stopped and result.text == "" and deltas == [] and result.num_tokens_kept == 0


def test_stop_inside_a_token_cuts_the_text_and_keeps_the_token(demo_tok):
    generated = demo_tok.encode("Hello world again", add_special_tokens=False)
    assert " world" in [demo_tok.decode([t]) for t in generated]
    result, deltas = stream(demo_tok, [], generated, stop_strings=["orld"])
    assert result.text == "".join(d.text for d in deltas) == "Hello w"
    kept = generated[: result.num_tokens_kept]
    assert demo_tok.decode(kept) == "Hello world"  # starts with the text; text_length cuts it
    assert decode_delta(demo_tok, result.context_ids + tuple(kept), len(result.context_ids)).startswith(result.text)


@pytest.mark.parametrize("chunks", [None, [100]], ids=["token_by_token", "all_at_once"])
def test_overlapping_stops_do_not_depend_on_chunking(demo_tok, chunks):
    generated = demo_tok.encode("Hello world, hello there", add_special_tokens=False)
    result, deltas = stream(demo_tok, [], generated, chunks, stop_strings=["llo wor", "o w", "there"])
    assert result.text == "".join(d.text for d in deltas) == "Hell"  # "o w" completes first


def test_a_stop_string_prefix_is_held_then_released(demo_tok):
    generated = demo_tok.encode("one wor two world! three", add_special_tokens=False)
    text = TextStream(demo_tok, [], ["world!!"])
    streamed, held_at_most = "", []
    for t in generated:
        delta = text.add([t])
        streamed += delta.text if delta else ""
        assert text.text.startswith(streamed)
        # whatever might still begin "world!!" has not been sent
        assert len(text.text) - len(streamed) >= StopStringMatcher(["world!!"]).holdback(text.text)
        held_at_most.append(len(text.text) - len(streamed))
    assert max(held_at_most) >= len("world!")
    tail = text.finish()
    streamed += tail.text if tail else ""
    assert not text.stopped and streamed == "one wor two world! three"


@settings(max_examples=200, deadline=None)
@given(data=st.data(), text=st.text(alphabet="ab é😀你 ", min_size=1, max_size=30))
def test_stop_strings_are_never_streamed(demo_tok, data, text):
    stops = data.draw(st.lists(st.text(alphabet="ab é😀你 ", min_size=1, max_size=4), min_size=1, max_size=3))
    generated = demo_tok.encode(text, add_special_tokens=False)
    full = demo_tok.decode(generated)
    # Reference: the first end position at which some stop string is complete.
    cut = next(
        (end - max(len(s) for s in stops if full[:end].endswith(s))
         for end in range(1, len(full) + 1) if any(full[:end].endswith(s) for s in stops)),
        len(full),
    )
    chunks = data.draw(st.lists(st.integers(1, 3)))
    result, deltas = stream(demo_tok, [], generated, chunks, stop_strings=stops)
    assert "".join(d.text for d in deltas) == result.text == full[:cut]
    assert result.stopped == (cut < len(full))
    assert demo_tok.decode(generated[: result.num_tokens_kept]).startswith(result.text)
    if result.stopped and result.num_tokens_kept:  # and no fewer tokens would do
        assert not demo_tok.decode(generated[: result.num_tokens_kept - 1]).startswith(result.text)
