"""The tokenizer of a Hugging Face checkpoint directory, without transformers.

A thin layer over ``tokenizers.Tokenizer`` (the Rust library behind
transformers' fast tokenizers) reading ``tokenizer.json`` plus the few facts
that live in the JSON files around it: special tokens and their ids, whether
BOS/EOS are added, the chat template and the context length. Works for any
Llama-style checkpoint saved with a fast tokenizer: byte-level BPE (Llama 3,
our demo model) and sentencepiece-converted ones with a Metaspace/"▁" decoder
(Llama 2, TinyLlama, Mistral).

Where a fact is stated in several files, the first of these wins:

- BOS / PAD: ``tokenizer_config.json`` token, ``special_tokens_map.json``
  token, ``generation_config.json`` id, ``config.json`` id; PAD falls back to
  the end id.
- EOS: every id of ``generation_config.json`` (it may be a list), then
  ``config.json``, then the tokenizer's eos token, then the chat template's
  end-of-turn token (trillm.chat_template); ``eos_id`` is the first,
  ``eos_ids`` all of them (any of them ends generation).
- BOS/EOS insertion: an explicit ``add_bos_token`` / ``add_eos_token`` in
  ``tokenizer_config.json`` rebuilds the post-processor, as transformers does;
  otherwise ``tokenizer.json``'s post-processor decides.

``decode`` is the tokenizer's own decoding, without transformers'
``clean_up_tokenization_spaces`` (which rewrites " ." to "." and so breaks
exact round trips; transformers 5 no longer applies it to BPE either).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import processors

from trillm.chat_template import end_of_turn_id

# transformers' placeholder for "no limit" (int(1e30)); anything this large is no limit.
_NO_LIMIT = 10**9


class Tokenizer:
    """Encode/decode and the special ids of one checkpoint (see :func:`load_tokenizer`).

    Attributes: ``bos_id``; ``eos_id`` (the end id) and ``eos_ids`` (every id
    that ends generation); ``pad_id`` (the end id when there is no pad token);
    ``vocab_size`` (highest id + 1, added tokens included); ``add_bos``
    (whether ``encode`` prepends BOS by default); ``chat_template``;
    ``model_max_length`` (or None); ``backend`` (the ``tokenizers.Tokenizer``).
    """

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        bos_id: int | None = None,
        eos_ids: Sequence[int] = (),
        pad_id: int | None = None,
        chat_template: str | None = None,
        model_max_length: int | None = None,
    ) -> None:
        self.backend = backend
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self.bos_id = bos_id
        self.eos_ids: tuple[int, ...] = tuple(eos_ids)
        self.eos_id: int | None = self.eos_ids[0] if self.eos_ids else None
        self.pad_id: int | None = self.eos_id if pad_id is None else pad_id
        self.chat_template = chat_template
        self.model_max_length = model_max_length
        self.vocab_size: int = max(backend.get_vocab(with_added_tokens=True).values()) + 1
        probe = backend.encode("a", add_special_tokens=True).ids
        self.add_bos: bool = bos_id is not None and probe[:1] == [bos_id]
        # A chat turn ends with the template's end-of-turn token (ChatML's <|im_end|>),
        # which the EOS ids do not always list: it ends generation too.
        turn_end = end_of_turn_id(self)
        if turn_end is not None and turn_end not in self.eos_ids:
            self.eos_ids += (turn_end,)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True, **variables) -> str:
        """Render ``messages`` ([{"role": ..., "content": ...}]) as transformers does
        (sandboxed Jinja, same globals); extra keyword arguments become template
        variables. The result is text: encode it as any prompt."""
        return self._compiled_template.render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            pad_token=self.pad_token or "",
            unk_token=self.unk_token or "",
            **variables,
        )

    @cached_property
    def _compiled_template(self) -> jinja2.Template:
        if not self.chat_template:
            raise ValueError(
                "this tokenizer has no chat template (no 'chat_template' in tokenizer_config.json "
                "and no chat_template.jinja); send plain text prompts instead"
            )
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
        )
        env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = _raise_template_error
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        return env.from_string(self.chat_template)


def _raise_template_error(message: str):
    raise jinja2.exceptions.TemplateError(message)


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    """The tokenizer of the checkpoint in ``model_dir`` (needs ``tokenizer.json``), or of
    a ``.gguf`` file (its converted directory, trillm.gguf_checkpoint)."""
    model_dir = Path(model_dir)
    if model_dir.suffix.lower() == ".gguf":
        from trillm.gguf_checkpoint import resolve_gguf

        model_dir = resolve_gguf(model_dir)
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: trillm needs the checkpoint's fast-tokenizer file tokenizer.json. "
            "If the checkpoint has only a sentencepiece tokenizer.model, convert it once, offline, with "
            "transformers: python -c \"from transformers import AutoTokenizer as T; "
            f"T.from_pretrained('{model_dir}').save_pretrained('{model_dir}')\""
        )
    backend = BackendTokenizer.from_file(str(path))
    # Some tokenizer.json files carry training-time truncation/padding;
    # transformers ignores them unless asked, and so do we.
    backend.no_truncation()
    backend.no_padding()
    tok_config = _read_json(model_dir / "tokenizer_config.json")
    special_map = _read_json(model_dir / "special_tokens_map.json")
    gen_config = _read_json(model_dir / "generation_config.json")
    model_config = _read_json(model_dir / "config.json")

    def token(name: str) -> str | None:
        return _token_str(tok_config.get(name)) or _token_str(special_map.get(name))

    def token_id(name: str) -> int | None:
        text = token(name)
        return backend.token_to_id(text) if text is not None else None

    def config_ids(key: str) -> list[int]:
        ids: list[int] = []
        for config in (gen_config, model_config):
            value = config.get(key)
            ids.extend(value if isinstance(value, list) else [] if value is None else [value])
        return ids

    bos_id = _first(token_id("bos_token"), *config_ids("bos_token_id"))
    eos_ids = list(dict.fromkeys(i for i in (*config_ids("eos_token_id"), token_id("eos_token")) if i is not None))
    pad_id = _first(token_id("pad_token"), *config_ids("pad_token_id"))

    if "add_bos_token" in tok_config or "add_eos_token" in tok_config:
        _set_post_processor(
            backend,
            token("bos_token") if tok_config.get("add_bos_token") else None,
            token("eos_token") if tok_config.get("add_eos_token") else None,
        )

    max_length = tok_config.get("model_max_length")
    if not isinstance(max_length, int) or max_length >= _NO_LIMIT:
        max_length = model_config.get("max_position_embeddings")

    return Tokenizer(
        backend,
        bos_token=token("bos_token"),
        eos_token=token("eos_token"),
        pad_token=token("pad_token"),
        unk_token=token("unk_token"),
        bos_id=bos_id,
        eos_ids=eos_ids,
        pad_id=pad_id,
        chat_template=_chat_template(model_dir, tok_config),
        model_max_length=max_length,
    )


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    return value if isinstance(value, dict) else {}


def _token_str(value) -> str | None:
    """A special token as written in tokenizer_config.json: a string, or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _first(*values: int | None) -> int | None:
    return next((v for v in values if v is not None), None)


def _set_post_processor(backend: BackendTokenizer, bos: str | None, eos: str | None) -> None:
    """What transformers' update_post_processor builds: [bos] $A [eos]."""
    single = " ".join([*([f"{bos}:0"] if bos else []), "$A:0", *([f"{eos}:0"] if eos else [])])
    pair = " ".join([single, *([f"{bos}:1"] if bos else []), "$B:1", *([f"{eos}:1"] if eos else [])])
    specials = [(t, backend.token_to_id(t)) for t in (bos, eos) if t and backend.token_to_id(t) is not None]
    if len(specials) < len([t for t in (bos, eos) if t]):
        raise ValueError(f"add_bos_token/add_eos_token name a token missing from the vocabulary: {bos!r}, {eos!r}")
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def _chat_template(model_dir: Path, tok_config: dict) -> str | None:
    """chat_template.jinja (newer checkpoints) or tokenizer_config.json's chat_template,
    which may be a list of named templates: the one named "default"."""
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = tok_config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None
