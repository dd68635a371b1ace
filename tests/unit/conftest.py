"""Unit-test fixtures: the demo model built once per session into a temporary
directory, and a sentencepiece-style (Metaspace, byte-fallback) tokenizer
trained here, the shape of Llama 2 / TinyLlama / Mistral's tokenizer.json, and
both loaded (``demo_tok``, ``metaspace_tok``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from trillm.tokenizer import load_tokenizer


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory) -> Path:
    """Overrides the repository-wide fixture: unit tests never touch build/."""
    from trillm.demo_model import build_demo_model

    return build_demo_model(tmp_path_factory.mktemp("demo") / "demo-model")


METASPACE_CORPUS = """\
The quick brown fox jumps over the lazy dog. Hello world, hello there!
Streaming text must keep the spaces between words, and every accent: café, naïve, Ñandú.
你好，世界。こんにちは。 Emoji stay whole: 😀 🚀.
A tokenizer splits text into pieces; a detokenizer glues them back together.
"""


@pytest.fixture(scope="session")
def metaspace_dir(tmp_path_factory) -> Path:
    """A Llama-2-style tokenizer.json: Metaspace pre-tokenizer, BPE with byte
    fallback (<0x00>..<0xFF> in the vocabulary) and the Replace/ByteFallback/
    Fuse/Strip decoder that drops the first space of whatever it decodes."""
    specials = ["<unk>", "<s>", "</s>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False)
    tokenizer.train_from_iterator(METASPACE_CORPUS.splitlines() * 5, trainer)

    # Byte tokens go right after the specials, as in Llama 2 (ids 3..258).
    spec = json.loads(tokenizer.to_str())
    learned = sorted((i, t) for t, i in spec["model"]["vocab"].items() if t not in specials)
    vocab = {t: i for i, t in enumerate(specials)}
    vocab.update({f"<0x{b:02X}>": len(specials) + b for b in range(256)})
    for _, token in learned:
        vocab.setdefault(token, len(vocab))
    spec["model"].update(vocab=vocab, byte_fallback=True, fuse_unk=True, unk_token="<unk>")
    tokenizer = Tokenizer.from_str(json.dumps(spec))
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )

    out = tmp_path_factory.mktemp("metaspace")
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1000000000000000019884624838656,
    }))
    (out / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 4096,
                                                 "bos_token_id": 1, "eos_token_id": 2}))
    return out


@pytest.fixture(scope="session")
def demo_tok(demo_model_dir):
    return load_tokenizer(demo_model_dir)


@pytest.fixture(scope="session")
def metaspace_tok(metaspace_dir):
    return load_tokenizer(metaspace_dir)
