"""trillm.tokenizer matches transformers, round-trips any UTF-8, and reads
the special ids the way Llama-style checkpoints state them."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from trillm.tokenizer import load_tokenizer

pytestmark = pytest.mark.unit

SAMPLES = [
    "Hello, world! The quick brown fox.",
    "  leading spaces, trailing spaces  ",
    "tabs\tand\nnew lines\r\n",
    "Accents: café, naïve, Ñandú, Größe, Zażółć gęślą jaźń",
    "CJK: 你好，世界。こんにちは、世界。안녕하세요",
    "Emoji: 😀 🚀 👩‍💻 🇫🇷 🦜🦩 ❤️",
    "<|user|>\nspecial tokens in text</s>",
    "",
]


@pytest.fixture(scope="module", params=["demo", "metaspace"])
def tokenizer_dir(request, demo_model_dir, metaspace_dir):
    return demo_model_dir if request.param == "demo" else metaspace_dir


def test_matches_transformers(tokenizer_dir):
    from transformers import AutoTokenizer

    ours = load_tokenizer(tokenizer_dir)
    theirs = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    assert (ours.bos_id, ours.eos_id, ours.vocab_size) == (theirs.bos_token_id, theirs.eos_token_id, len(theirs))
    for text in SAMPLES:
        for special in (True, False):
            ids = ours.encode(text, add_special_tokens=special)
            assert ids == theirs.encode(text, add_special_tokens=special), (text, special)
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)


def test_demo_tokenizer_ids_and_template(demo_model_dir):
    from transformers import AutoTokenizer

    tok = load_tokenizer(demo_model_dir)
    assert (tok.bos_id, tok.eos_id, tok.eos_ids, tok.pad_id) == (1, 2, (2,), 0)
    assert tok.add_bos and tok.encode("hi")[0] == tok.bos_id and tok.encode("hi", False)[0] != tok.bos_id
    assert tok.vocab_size == 8192 and tok.model_max_length == 2048
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Bonjour 😀"}]
    theirs = AutoTokenizer.from_pretrained(demo_model_dir, local_files_only=True)
    for prompt in (True, False):
        rendered = tok.apply_chat_template(messages, add_generation_prompt=prompt)
        assert rendered == theirs.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=False)
    assert rendered.startswith("<|system|>\nBe brief.</s>\n<|user|>\n")
    with pytest.raises(Exception, match="roles must be"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


@settings(max_examples=300, deadline=None)
@given(text=st.text())
def test_byte_level_round_trips_any_utf8(demo_tok, text):
    ids = demo_tok.encode(text, add_special_tokens=False)
    assert demo_tok.decode(ids, skip_special_tokens=False) == text


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=st.characters(blacklist_categories=("Cs", "Zs", "Cc")), min_size=1))
def test_metaspace_round_trips_text_without_spaces(metaspace_tok, text):
    # Sentencepiece-style decoding maps U+2581 to a space and drops a leading
    # space, so spaces and "▁" are left out here.
    text = text.replace("▁", "_")
    assert metaspace_tok.decode(metaspace_tok.encode(text)) == text


def test_missing_tokenizer_json_says_how_to_make_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json.*save_pretrained"):
        load_tokenizer(tmp_path)


def test_special_ids_from_the_files_around_tokenizer_json(tmp_path, demo_model_dir):
    backend = Tokenizer.from_file(str(demo_model_dir / "tokenizer.json"))
    backend.enable_truncation(max_length=3)  # a leftover from training, not for serving
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<s>", "__type": "AddedToken"},
        "eos_token": "</s>",
        "add_bos_token": False,
        "model_max_length": int(1e30),
        "chat_template": [{"name": "other", "template": "x"}, {"name": "default", "template": "{{ bos_token }}!"}],
    }))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 2]}))
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 321, "pad_token_id": None}))
    tok = load_tokenizer(tmp_path)
    assert tok.eos_id == 5 and tok.eos_ids == (5, 2)
    assert tok.pad_id == 5  # no pad token anywhere: the end id
    assert not tok.add_bos and tok.encode("hi")[0] != tok.bos_id
    assert tok.model_max_length == 321
    assert tok.apply_chat_template([]) == "<s>!"
    assert len(tok.encode("a prompt longer than three tokens")) > 3


def test_no_chat_template_is_a_clear_error(metaspace_dir):
    with pytest.raises(ValueError, match="no chat template"):
        load_tokenizer(metaspace_dir).apply_chat_template([{"role": "user", "content": "hi"}])
