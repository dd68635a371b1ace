"""The tokenizer rebuilt from a GGUF file's tokenizer.ggml.* metadata encodes like the model's own.

References, each independent of trillm.gguf_checkpoint:

- "gpt2" kind (SmolLM2): a plain-Python byte-level BPE (:func:`reference_bpe`)
  following llama.cpp's tokenizer for ``tokenizer.ggml.pre = smollm`` (each
  digit its own piece, then GPT-2's regex, then the merges by rank), which is
  what SmolLM2's tokenizer.json (Digits(individual_digits) + ByteLevel) does;
  and transformers' own GGUF tokenizer conversion.
- "llama" kind (SentencePiece): transformers' GGUF conversion of a small
  SentencePiece-style vocabulary written the way convert_hf_to_gguf.py does.
"""

from __future__ import annotations

import pytest
import regex

from gguf_files import Vocab, write_llama_gguf
from trillm.gguf_checkpoint import GGUFFile, convert_gguf
from trillm.tokenizer import load_tokenizer

pytestmark = pytest.mark.unit

MULTILINGUAL = (
    "Héllo wörld! Ça va, naïve façade? Zażółć gęślą jaźń. Привет, мир: съешь же ещё этих булок. "
    "你好，世界！我们今天去公园。日本語のテキスト、カタカナ。안녕하세요. مرحبا بالعالم. "
    "Emoji 😀👍🏽 👩‍💻 🇫🇷 ❤️ ✅\n"
    "def f(x: int) -> int:\n    return x ** 2  # square\n\n\tTabs,  double  spaces,   and trailing   \n"
    "Price: 1,234.56 € in 2024; ratio 3/4 = 0.75; id=0x1F; I'm sure they'll say it's fine."
)
CHAT = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"

GPT2_SPLIT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte (openai/gpt-2 encoder.py)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def reference_bpe(text: str, tokens: list[str], token_types: list[int], merges: list[str]) -> list[int]:
    """llama.cpp's "smollm" BPE tokenisation, written out plainly."""
    ids = {t: i for i, t in enumerate(tokens)}
    ranks = {tuple(m.split(" ")): r for r, m in enumerate(merges)}
    specials = sorted((t for t, kind in zip(tokens, token_types) if kind == 3), key=len, reverse=True)
    spelling = bytes_to_unicode()
    out: list[int] = []
    for segment in regex.split("(" + "|".join(map(regex.escape, specials)) + ")", text):
        if segment in ids and segment in specials:
            out.append(ids[segment])
            continue
        for piece in regex.findall(r"\p{N}|[^\p{N}]+", segment):
            for word in GPT2_SPLIT.findall(piece):
                parts = [spelling[b] for b in word.encode("utf-8")]
                while len(parts) > 1:
                    pairs = [(ranks.get((a, b), float("inf")), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
                    rank, _ = min(pairs)
                    if rank == float("inf"):
                        break
                    best = min(p for p in pairs if p[0] == rank)[1]
                    first, second = parts[best], parts[best + 1]
                    merged, i = [], 0
                    while i < len(parts):
                        if i + 1 < len(parts) and parts[i] == first and parts[i + 1] == second:
                            merged.append(first + second)
                            i += 2
                        else:
                            merged.append(parts[i])
                            i += 1
                    parts = merged
                out.extend(ids[p] for p in parts)
    return out


@pytest.fixture(scope="module")
def smollm2_meta(smollm2_gguf):
    return GGUFFile(smollm2_gguf).tokenizer_metadata()


@pytest.mark.parametrize("text", [MULTILINGUAL, CHAT, " leading space", "1234567890", ""],
                         ids=["multilingual", "chat", "leading-space", "digits", "empty"])
def test_smollm2_tokenizer_encodes_like_the_reference_bpe(smollm2, smollm2_meta, text):
    ours = load_tokenizer(smollm2[1])
    expected = reference_bpe(text, smollm2_meta.tokens, smollm2_meta.token_types, smollm2_meta.merges)
    assert ours.encode(text) == expected  # SmolLM2 adds no BOS
    assert ours.decode(expected, skip_special_tokens=False) == text


def test_smollm2_tokenizer_encodes_like_transformers_gguf_conversion(smollm2, smollm2_gguf):
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    ours = load_tokenizer(smollm2[1])
    for text in (MULTILINGUAL, CHAT):
        assert ours.encode(text) == theirs(text)["input_ids"]
    # And transformers reading our converted directory agrees (tokenizer_config.json is consistent).
    assert AutoTokenizer.from_pretrained(smollm2[1])(MULTILINGUAL + CHAT)["input_ids"] == ours.encode(MULTILINGUAL + CHAT)


def test_smollm2_special_tokens_and_chat_template_come_from_the_metadata(smollm2):
    tok = load_tokenizer(smollm2[1])
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert tok.eos_id == tok.backend.token_to_id("<|im_end|>") and not tok.add_bos
    rendered = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert rendered.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(tok.encode(rendered)) == rendered.replace("<|im_start|>", "").replace("<|im_end|>", "")


# -- the SentencePiece ("llama") kind -------------------------------------------------

SPM_CORPUS = [
    "The quick brown fox jumps over the lazy dog. Le cœur a ses raisons que la raison ne connaît point.",
    "Über den Wolken muss die Freiheit wohl grenzenlos sein. Съешь же ещё этих мягких французских булок.",
    "def main():\n    print('hello world')  # greet\n", "你好，世界！今天天气很好。", "1234 5678 90",
] * 20


def sentencepiece_vocab() -> Vocab:
    """A Llama-2-shaped SentencePiece BPE vocabulary, as convert_hf_to_gguf.py writes one from
    tokenizer.model: <unk> <s> </s>, the 256 byte tokens <0x00>..<0xFF>, then pieces in merge
    order with descending scores (SentencePiece BPE scores a piece by when it was merged)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer_tok.train_from_iterator(SPM_CORPUS, trainers.BpeTrainer(vocab_size=500, show_progress=False))
    learned = sorted(trainer_tok.get_vocab().items(), key=lambda item: item[1])
    pieces = [p for p, _ in learned]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces]
    types = [2, 3, 3, *[6] * 256, *[1] * len(pieces)]
    scores = [0.0, 0.0, 0.0, *[0.0] * 256, *(-float(i) for i in range(len(pieces)))]
    return Vocab(model="llama", tokens=tokens, token_types=types, scores=scores, bos_id=1, eos_id=2, unk_id=0,
                 add_bos=True, add_space_prefix=True)


@pytest.fixture(scope="module")
def sentencepiece_gguf(tmp_path_factory):
    import numpy as np

    vocab = sentencepiece_vocab()
    config = {"vocab_size": len(vocab.tokens), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 64,
              "rms_norm_eps": 1e-6, "rope_theta": 10000.0}
    rng = np.random.default_rng(0)
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], 32), "model.norm.weight": (32,),
              "lm_head.weight": (config["vocab_size"], 32)}
    for name, shape in (("input_layernorm", (32,)), ("self_attn.q_proj", (32, 32)), ("self_attn.k_proj", (32, 32)),
                        ("self_attn.v_proj", (32, 32)), ("self_attn.o_proj", (32, 32)),
                        ("post_attention_layernorm", (32,)), ("mlp.gate_proj", (64, 32)), ("mlp.up_proj", (64, 32)),
                        ("mlp.down_proj", (32, 64))):
        shapes[f"model.layers.0.{name}.weight"] = shape
    weights = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    root = tmp_path_factory.mktemp("spm")
    return write_llama_gguf(root / "spm.gguf", config, weights, vocab)


SPM_TEXTS = [
    "The quick brown fox, naïvely: Le cœur a ses raisons. Über Größe; Съешь ещё булок!",
    "inner  double  spaces and a trailing one ", "def f():\n\treturn 'x'  # tab\n",
    "你好，世界！未见过的字：龘 and emoji 🦜 fall back to bytes", "1234 5678",
]


@pytest.mark.parametrize("text", SPM_TEXTS, ids=range(len(SPM_TEXTS)))
def test_sentencepiece_tokenizer_encodes_like_transformers_gguf_conversion(sentencepiece_gguf, tmp_path, text):
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(sentencepiece_gguf.parent, gguf_file=sentencepiece_gguf.name)
    ours = load_tokenizer(convert_gguf(sentencepiece_gguf, tmp_path / "hf"))
    assert ours.add_bos and ours.bos_id == 1
    assert ours.encode(text) == theirs(text)["input_ids"]
    assert ours.decode(ours.encode(text)) == text
    if any(ord(c) > 0x3000 for c in text):  # unseen characters went through <0xNN> byte tokens
        assert any(3 <= i < 259 for i in ours.encode(text))


def test_sentencepiece_prefix_space_is_added_even_before_a_space(sentencepiece_gguf, tmp_path):
    """llama.cpp (and SentencePiece's add_dummy_prefix, and Llama 2's tokenizer.json normalizer)
    always prepend one space: "  hi" is "▁▁▁hi". transformers' GGUF conversion uses Metaspace,
    which does not prepend to text already starting with a space ("▁▁hi"), so this case is
    checked on its own, against the rule."""
    ours = load_tokenizer(convert_gguf(sentencepiece_gguf, tmp_path / "hf"))
    assert ours.backend.normalizer.normalize_str("  hi there") == "▁▁▁hi▁there"
    assert ours.decode(ours.encode("  hi there")) == "  hi there"
