"""trillm.chat_template: messages are checked, rendered like transformers does,
and a template's end-of-turn token joins the EOS ids that end generation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tokenizers import AddedToken, Tokenizer

from trillm.chat_template import ChatError, end_of_turn_id, parse_messages, render_prompt
from trillm.tokenizer import load_tokenizer

pytestmark = pytest.mark.unit

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
PLAIN_MARKERS = (
    "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)
ALTERNATING = (
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{{ message['content'] + eos_token }}{% endfor %}"
)
CHAT_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def checkpoint(base: Path, out: Path, template: str | None) -> Path:
    """The demo tokenizer with the chat tokens added and ``template`` as its chat template;
    EOS stays ``</s>`` (generation_config.json), as in a checkpoint that does not list the turn end."""
    out.mkdir()
    backend = Tokenizer.from_file(str(base / "tokenizer.json"))
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CHAT_SPECIALS])
    backend.save(str(out / "tokenizer.json"))
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.pop("added_tokens_decoder")
    config.pop("chat_template")
    config["additional_special_tokens"] = CHAT_SPECIALS
    if template is not None:
        config["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    for name in ("config.json", "generation_config.json"):
        shutil.copy(base / name, out / name)
    return out


@pytest.fixture(scope="module")
def make(demo_model_dir, tmp_path_factory):
    return lambda template: load_tokenizer(checkpoint(demo_model_dir, tmp_path_factory.mktemp("chat") / "c", template))


@pytest.mark.parametrize("template,turn_end", [(CHATML, "<|im_end|>"), (LLAMA3, "<|eot_id|>")])
def test_the_turn_end_joins_the_eos_ids(make, template, turn_end):
    tok = make(template)
    turn_end_id = tok.backend.token_to_id(turn_end)
    assert end_of_turn_id(tok) == turn_end_id
    assert tok.eos_id == tok.backend.token_to_id("</s>"), "the first EOS id (the default end_id) is unchanged"
    assert tok.eos_ids == (tok.eos_id, turn_end_id)


def test_the_demo_models_turn_ends_with_its_eos(demo_tok):
    assert end_of_turn_id(demo_tok) == demo_tok.eos_id
    assert demo_tok.eos_ids == (demo_tok.eos_id,)


@pytest.mark.parametrize("template", [PLAIN_MARKERS, "{{ raise_exception('never') }}", None])
def test_no_special_turn_end_leaves_the_eos_ids_alone(make, template):
    tok = make(template)
    assert end_of_turn_id(tok) is None
    assert tok.eos_ids == (tok.backend.token_to_id("</s>"),)


@pytest.mark.parametrize("template", [CHATML, LLAMA3])
def test_rendering_matches_transformers(demo_model_dir, tmp_path, template):
    from transformers import AutoTokenizer

    directory = checkpoint(demo_model_dir, tmp_path / "chat", template)
    ours, theirs = load_tokenizer(directory), AutoTokenizer.from_pretrained(directory, local_files_only=True)
    messages = parse_messages(json.dumps([
        {"role": "system", "content": "Réponds en français."},
        {"role": "user", "content": "Bonjour 😀 东京?"},
    ]))
    rendered = render_prompt(ours, messages)
    assert rendered.endswith("assistant<|end_header_id|>\n\n" if template == LLAMA3 else "<|im_start|>assistant\n")
    assert rendered == theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # What preprocessing sends the engine: the template's own special tokens, nothing added.
    assert ours.encode(rendered, add_special_tokens=False) == theirs.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False)


@pytest.mark.parametrize(
    "raw,rule",
    [
        ("not json", "not valid JSON"),
        ('{"role": "user", "content": "hi"}', "JSON list"),
        ("[]", "non-empty"),
        ('["hi"]', "message 0 must be an object"),
        ('[{"content": "hi"}]', 'message 0 has no "role"'),
        ('[{"role": "user", "content": "a"}, {"role": "user"}]', 'message 1 has no "content"'),
        ('[{"role": "user", "content": 5}]', '"content" must be a string'),
        ('[{"role": "user", "content": [{"type": "text", "text": "hi"}]}]', '"content" must be a string'),
        ('[{"role": null, "content": "hi"}]', '"role" must be a string'),
    ],
)
def test_malformed_messages_say_what_is_wrong(raw, rule):
    with pytest.raises(ChatError, match=rule):
        parse_messages(raw)


def test_extra_keys_reach_the_template():
    assert parse_messages('[{"role": "user", "content": "hi", "name": "ann"}]')[0]["name"] == "ann"


def test_a_template_that_refuses_the_messages_says_why(make):
    tok = make(ALTERNATING)
    with pytest.raises(ChatError, match="chat template failed.*roles must alternate"):
        render_prompt(tok, [{"role": "assistant", "content": "first"}])


def test_no_template_is_a_named_rule(make):
    with pytest.raises(ChatError, match="no chat template.*text_input"):
        render_prompt(make(None), [{"role": "user", "content": "hi"}])
