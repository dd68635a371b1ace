"""A small, deterministic Llama checkpoint in Hugging Face format, built offline.

The demo model is what the test suite and ``trillm serve`` run when no real
checkpoint is given. Nothing is downloaded: the tokenizer is a byte-level BPE
trained here on the docstrings of a fixed list of Python standard-library
modules (plus a short multilingual sample below), and the weights are random
from a fixed seed. The result loads with ``transformers`` offline
(``AutoTokenizer`` / ``LlamaForCausalLM.from_pretrained``) and with
:func:`trillm.tokenizer.load_tokenizer`.

The weights are scaled so that greedy decoding is numerically robust (the
network is not chaotic: float32 rounding moves the logits by ~5e-6 of their
spread, far below the usual top-1 margin) and so that text keeps changing over
hundreds of tokens instead of falling into a loop (see GAINS). Special tokens
get near-zero output rows: the demo model never *chooses* to stop, so
``max_tokens``, an explicit ``end_id`` and stop words decide its answers' length.

Builds are byte-for-byte reproducible (sorted inputs, one seeded generator). What a build depends on
(this file, the corpus sources, the Python minor version, the torch /
tokenizers / safetensors versions) is hashed into ``.trillm-demo-manifest.json``;
a later call with the same hash does nothing. The docstrings differ between
Python versions, so the tokenizer (not the weights' shapes) may differ across
Python minor versions.

``DEFAULT_DEMO_DIR`` is ``$TRILLM_HOME/build/demo-model`` when ``TRILLM_HOME``
is set, else ``build/demo-model`` under the current working directory (the
repository root, for ``make`` and the tests). It is resolved at import time.

The demo model has two versions, for the two versions of the model repository
(docs/versions.md): the same architecture and tokenizer, weights from another
seed (``DEMO_SEEDS``), so their greedy text differs. Version N > 1 lives beside
version 1, in ``demo-model-vN`` (:func:`demo_dir`).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import safetensors
import safetensors.torch
import tokenizers
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

DEFAULT_DEMO_DIR = Path(os.environ.get("TRILLM_HOME") or Path.cwd()) / "build" / "demo-model"
MANIFEST = ".trillm-demo-manifest.json"
# Weight seed of each demo version; version 1's is the original demo model's.
DEMO_SEEDS = {1: 20240607, 2: 20240608}

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, BOS, EOS, *ROLE_TOKENS)  # ids 0..5, in this order

# Zephyr/TinyLlama style, ending each turn with EOS (the end-of-turn token,
# trillm.chat_template). Like Zephyr's it writes no BOS, so a chat prompt has
# none: preprocessing, like transformers, adds no special tokens to a rendered chat.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('roles must be system, user or assistant, got ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 8192,
    "hidden_size": 640,
    "intermediate_size": 1728,
    "num_hidden_layers": 10,
    "num_attention_heads": 10,
    "num_key_value_heads": 5,
    "head_dim": 64,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
    "pretraining_tp": 1,
    "use_cache": True,
    "bos_token_id": SPECIAL_TOKENS.index(BOS),
    "eos_token_id": SPECIAL_TOKENS.index(EOS),
    "pad_token_id": SPECIAL_TOKENS.index(PAD),
    "torch_dtype": "float32",
}

# Standard deviation of each weight: gain / sqrt(fan_in), so every layer
# keeps the scale of its input. Tuned by generating a few hundred greedy tokens
# for several prompts, in float32 and float64: unit gains give varied text
# (no cycles) with float32-vs-float64 logit error ~5e-6 of the logit spread,
# while sharper attention (q/k gain 3) gives similar text but 1e-3 error, i.e.
# greedy outputs that flip under rounding. lm_head's gain sets the logit spread
# (std ~8): the top-1 margin is ~1.6 logits at the median, and sampling at
# temperature 1 still picks a non-argmax token about a third of the time.
EMBED_STD = 1.0
GAINS = {"q_proj": 1.0, "k_proj": 1.0, "v_proj": 1.0, "o_proj": 1.0,
         "gate_proj": 1.0, "up_proj": 1.0, "down_proj": 1.0, "lm_head": 8.0}
SPECIAL_ROW_SCALE = 0.01  # lm_head rows of special tokens: never the argmax

# Standard-library modules whose docstrings train the tokenizer: long-lived,
# pure-Python, shipped by every CPython build (sorted).
CORPUS_MODULES = (
    "_pydecimal", "_pyio", "argparse", "ast", "bdb", "calendar", "codecs", "configparser",
    "contextlib", "datetime", "difflib", "doctest", "enum", "fractions", "ftplib", "functools",
    "imaplib", "inspect", "ipaddress", "mailbox", "optparse", "os", "pathlib", "pdb", "pickle",
    "pickletools", "platform", "pydoc", "random", "shutil", "smtplib", "socket", "socketserver",
    "ssl", "statistics", "subprocess", "tarfile", "tempfile", "textwrap", "threading",
    "traceback", "typing", "uuid", "zipfile",
)

# So that common non-ASCII text gets merged tokens, not only raw bytes.
MULTILINGUAL_SAMPLE = """\
Le cœur a ses raisons que la raison ne connaît point. Où est la gare ? Très bien, merci, à bientôt.
El niño pequeño comió una manzana en el año pasado. ¿Dónde está la biblioteca? ¡Qué día tan bonito!
Über den Wolken muss die Freiheit wohl grenzenlos sein. Größe, Straße, schön, müde, Käse.
Ação, coração, não, pão, informação. Çà et là, naïve, façade, déjà vu, rôle, fiancée.
Zażółć gęślą jaźń. Příliš žluťoučký kůň úpěl ďábelské ódy. Þórður og Ævar sáu ðetta.
Съешь же ещё этих мягких французских булок, да выпей чаю. Привет, мир! Как дела?
Καλημέρα κόσμε. Ελληνικά γράμματα: αβγδεζηθικλμνξοπρστυφχψω.
你好，世界！我们今天去公园散步吧。中文文本的分词测试。天气很好，人们很开心。
こんにちは、世界。今日はいい天気ですね。ひらがな、カタカナ、漢字。東京で会いましょう。
안녕하세요, 세계! 오늘 날씨가 좋네요. 한국어 텍스트입니다.
مرحبا بالعالم. هذا نص عربي قصير. שלום עולם. नमस्ते दुनिया। สวัสดีชาวโลก
Emoji: 😀 😃 😄 😁 🙂 🎉 🚀 ✨ 👍 ❤️ 🔥 🌍 🐍 🤖 👩‍💻 🇫🇷 🇯🇵 ✅ ⚠️ ☕ 🍕 📦 💡
Maths: ∀x ∈ ℝ, x² ≥ 0; ∑ᵢ aᵢ ≈ π · r²; α → β ⇒ γ; ½ ¼ ¾ ° ± × ÷ € £ ¥ © ® ™ — – … «» „“ ‘’
"""
MULTILINGUAL_REPEAT = 20


def _corpus_sources() -> list[Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for name in CORPUS_MODULES:
        for path in (stdlib / f"{name}.py", stdlib / name / "__init__.py"):
            if path.is_file():
                found.append(path)
                break
    if len(found) < len(CORPUS_MODULES) // 2:
        raise RuntimeError(f"too few standard-library sources under {stdlib} to train the demo tokenizer")
    return found


def _corpus(sources: list[Path]) -> list[str]:
    texts = []
    for path in sources:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    texts.append(doc)
    texts.extend(MULTILINGUAL_SAMPLE.splitlines() * MULTILINGUAL_REPEAT)
    return texts


def _recipe(sources: list[Path], seed: int) -> dict:
    """Everything the output bytes depend on, cheap to compute (no parsing)."""
    corpus = hashlib.sha256()
    for path in sources:
        corpus.update(path.name.encode() + b"\0" + path.read_bytes())
    return {
        "seed": seed,
        "builder_sha256": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
        "corpus_sha256": corpus.hexdigest(),
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "torch": torch.__version__,
        "tokenizers": tokenizers.__version__,
        "safetensors": safetensors.__version__,
    }


def _train_tokenizer(texts: list[str]) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=CONFIG["vocab_size"],
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    if tokenizer.get_vocab_size() != CONFIG["vocab_size"]:
        raise RuntimeError(f"demo tokenizer has {tokenizer.get_vocab_size()} tokens, want {CONFIG['vocab_size']}")
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tokenizer


def _weights(seed: int) -> dict[str, torch.Tensor]:
    """Random weights from ``seed``, drawn in a fixed order."""
    c = CONFIG
    hidden, inter, vocab = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    q_out = c["num_attention_heads"] * c["head_dim"]
    kv_out = c["num_key_value_heads"] * c["head_dim"]
    generator = torch.Generator().manual_seed(seed)

    def normal(shape: tuple[int, int], std: float) -> torch.Tensor:
        return torch.randn(shape, generator=generator, dtype=torch.float32) * std

    def linear(name: str, out_features: int, in_features: int) -> torch.Tensor:
        return normal((out_features, in_features), GAINS[name] / in_features**0.5)

    weights = {"model.embed_tokens.weight": normal((vocab, hidden), EMBED_STD)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights[p + "self_attn.q_proj.weight"] = linear("q_proj", q_out, hidden)
        weights[p + "self_attn.k_proj.weight"] = linear("k_proj", kv_out, hidden)
        weights[p + "self_attn.v_proj.weight"] = linear("v_proj", kv_out, hidden)
        weights[p + "self_attn.o_proj.weight"] = linear("o_proj", hidden, q_out)
        weights[p + "mlp.gate_proj.weight"] = linear("gate_proj", inter, hidden)
        weights[p + "mlp.up_proj.weight"] = linear("up_proj", inter, hidden)
        weights[p + "mlp.down_proj.weight"] = linear("down_proj", hidden, inter)
        weights[p + "input_layernorm.weight"] = torch.ones(hidden)
        weights[p + "post_attention_layernorm.weight"] = torch.ones(hidden)
    weights["model.norm.weight"] = torch.ones(hidden)
    lm_head = linear("lm_head", vocab, hidden)
    lm_head[: len(SPECIAL_TOKENS)] *= SPECIAL_ROW_SCALE
    weights["lm_head.weight"] = lm_head
    return weights


def _tokenizer_files(tokenizer: Tokenizer) -> dict[str, str]:
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    added = {
        str(tokenizer.token_to_id(t)): {
            "content": t, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    tokenizer_config = {
        **special,
        "added_tokens_decoder": added,
        "additional_special_tokens": list(ROLE_TOKENS),
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": CONFIG["max_position_embeddings"],
        "padding_side": "left",
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    special_tokens_map = {**special, "additional_special_tokens": list(ROLE_TOKENS)}
    return {
        "tokenizer.json": tokenizer.to_str(pretty=True),
        "tokenizer_config.json": _json(tokenizer_config),
        "special_tokens_map.json": _json(special_tokens_map),
    }


def _json(value: dict) -> str:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_current(out_dir: Path, recipe_sha: str) -> bool:
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict) or manifest.get("recipe_sha256") != recipe_sha:
        return False
    files = manifest.get("files", {})
    return bool(files) and all(
        (out_dir / name).is_file() and (out_dir / name).stat().st_size == entry.get("bytes")
        for name, entry in files.items()
    )


def demo_dir(version: int = 1) -> Path:
    """Where version ``version`` of the demo model is built by default."""
    if version not in DEMO_SEEDS:
        raise ValueError(f"the demo model has versions {sorted(DEMO_SEEDS)}, not {version}")
    return DEFAULT_DEMO_DIR if version == 1 else DEFAULT_DEMO_DIR.with_name(f"{DEFAULT_DEMO_DIR.name}-v{version}")


def build_demo_models(force: bool = False) -> dict[int, Path]:
    """Every version of the demo model, each in its :func:`demo_dir`."""
    return {version: build_demo_model(demo_dir(version), force, version) for version in sorted(DEMO_SEEDS)}


def build_demo_model(out_dir: Path = DEFAULT_DEMO_DIR, force: bool = False, version: int = 1) -> Path:
    """Write version ``version`` of the demo checkpoint into ``out_dir`` (created) and return it.

    Does nothing when ``out_dir`` already holds a build of the same recipe,
    unless ``force``. Files are written to a temporary directory and moved in,
    the manifest last, so an interrupted build is never taken as current.
    """
    out_dir = Path(out_dir)
    if version not in DEMO_SEEDS:
        raise ValueError(f"the demo model has versions {sorted(DEMO_SEEDS)}, not {version}")
    sources = _corpus_sources()
    recipe = _recipe(sources, DEMO_SEEDS[version])
    recipe_sha = hashlib.sha256(_json(recipe).encode()).hexdigest()
    if not force and _is_current(out_dir, recipe_sha):
        print(f"demo model version {version} is up to date in {out_dir} (recipe {recipe_sha[:12]})", file=sys.stderr)
        return out_dir

    start = time.monotonic()
    tokenizer = _train_tokenizer(_corpus(sources))
    weights = _weights(DEMO_SEEDS[version])
    n_params = sum(t.numel() for t in weights.values())
    generation_config = {
        "bos_token_id": CONFIG["bos_token_id"],
        "eos_token_id": CONFIG["eos_token_id"],
        "pad_token_id": CONFIG["pad_token_id"],
        "do_sample": False,
    }

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".build-") as tmp:
        staging = Path(tmp)
        texts = {"config.json": _json(CONFIG), "generation_config.json": _json(generation_config),
                 **_tokenizer_files(tokenizer)}
        for name, text in texts.items():
            (staging / name).write_text(text, encoding="utf-8")
        safetensors.torch.save_file(weights, staging / "model.safetensors", metadata={"format": "pt"})
        files = {
            name: {"bytes": (staging / name).stat().st_size, "sha256": _sha256(staging / name)}
            for name in sorted(p.name for p in staging.iterdir())
        }
        manifest = {"recipe_sha256": recipe_sha, "recipe": recipe, "parameters": n_params, "files": files}
        (staging / MANIFEST).write_text(_json(manifest), encoding="utf-8")
        for name in [*files, MANIFEST]:
            os.chmod(staging / name, 0o644)  # safetensors writes 0600; the server may run as another user
            os.replace(staging / name, out_dir / name)
    print(
        f"built demo model version {version} ({n_params / 1e6:.2f}M parameters, recipe {recipe_sha[:12]}) "
        f"in {out_dir} in {time.monotonic() - start:.1f} s",
        file=sys.stderr,
    )
    return out_dir


def main(argv: list[str] | None = None) -> int:
    """``python -m trillm.demo_model [--version N] [--out DIR] [--force]``: ``trillm build-demo-model``."""
    from trillm.cli import main as trillm_main

    return trillm_main(["build-demo-model", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
