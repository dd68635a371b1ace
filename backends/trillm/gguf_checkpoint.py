"""GGUF checkpoints: a llama.cpp ``.gguf`` file converted once into a Hugging Face directory.

The engine, ``transformers`` (the reference tests) and vLLM (benchmarks) all
read Hugging Face directories, so a GGUF file is converted into one
(``config.json``, ``model.safetensors``, ``tokenizer.json``,
``tokenizer_config.json``, ``generation_config.json``) and everything reads
that. :func:`convert_gguf` writes it; :func:`resolve_gguf` finds or makes the
cached conversion of a file, keyed by the file's sha256, which is what
``--checkpoint model.gguf`` goes through (trillm.engine.checkpoint).

What the conversion undoes or rebuilds, in llama.cpp's own terms:

- **Weights** are dequantised with the ``gguf`` package's dequantisers (every
  type it can dequantise: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the
  K-quants), into float32 by default, which holds every value they produce
  exactly as ``gguf`` computes it.
- **Q and K projections** are stored permuted: llama.cpp's RoPE rotates
  adjacent pairs (x0, x1), Hugging Face's rotates the two halves of each head
  (x0, x64), and convert_hf_to_gguf.py reorders each head's rows to match
  (:func:`llama_cpp_permute`). :func:`llama_cpp_unpermute` is its inverse.
- **Tokenizer**: ``tokenizer.ggml.*`` holds the vocabulary, merges (BPE) or
  scores (SentencePiece), token types and special ids, but not the pipeline
  around them, which llama.cpp keys by name: ``tokenizer.ggml.pre`` for the
  "gpt2" (byte-level BPE) kind, ``tokenizer.ggml.add_space_prefix`` for the
  "llama" (SentencePiece) kind. :func:`build_tokenizer` rebuilds the
  ``tokenizers`` pipeline the model's own ``tokenizer.json`` has.
- **Chat template, BOS/EOS**: from ``tokenizer.chat_template`` and the
  ``tokenizer.ggml.*_token_id`` keys; the end-of-turn ids (``eot``/``eom``)
  join EOS in ``generation_config.json``, since generation stops at either.

The quantised origin stays known: ``gguf_tensors.json`` in the output names,
for each Hugging Face tensor, the GGUF tensor and quantisation type it came
from and whether its rows were un-permuted, and :meth:`GGUFFile.raw_tensor` gives
a tensor's quantised blocks with the rows in Hugging Face order, so a
quantised engine can pack them without a dequantise-requantise loss.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

SOURCE_MANIFEST = "gguf_tensors.json"
DEFAULT_CACHE_DIR = Path(os.environ.get("TRILLM_HOME") or Path.cwd()) / "build" / "gguf"
WEIGHT_DTYPES = ("float32", "bfloat16", "float16")  # torch dtype names; torch is imported only to convert

# llama.cpp's token types (gguf.TokenType).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# GGUF tensor name (per block: ``blk.N.`` + key) -> Hugging Face name.
GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
BLOCK_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate.bias": "mlp.gate_proj.bias",
    "ffn_up.bias": "mlp.up_proj.bias",
    "ffn_down.bias": "mlp.down_proj.bias",
}
# Rows stored permuted for llama.cpp's RoPE, and which head count groups them.
PERMUTED = {"attn_q": "head_count", "attn_k": "head_count_kv"}

# The "gpt2" kind's pre-tokenizer, by tokenizer.ggml.pre (llama.cpp's llama-vocab.cpp
# regexes, written as the tokenizers pipeline the models' tokenizer.json files have).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GPT2_PRE_TOKENIZERS = {
    # GPT-2's regex, inside ByteLevel.
    "default": "gpt2",
    "gpt2": "gpt2",
    # Every digit its own piece first (tokenizer.json: Digits(individual_digits) then ByteLevel).
    "smollm": "digits",
    "starcoder": "digits",
    "refact": "digits",
    # Llama 3's split, then ByteLevel without its own regex.
    "llama-bpe": "llama3",
    "llama3": "llama3",
    "llama-v3": "llama3",
}


class GGUFError(ValueError):
    """A GGUF file this converter cannot serve; the message names the key or tensor."""


# -- the Q/K permutation ----------------------------------------------------------

def llama_cpp_permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's ``LlamaModel.permute``: within each head, rows
    (0, 1, ..., d/2-1, d/2, ..., d-1) become (0, d/2, 1, d/2+1, ...), so
    llama.cpp's adjacent-pair RoPE rotates what Hugging Face's half-split
    RoPE rotates. Works on weights (out, in), biases (out,) and quantised
    block rows (out, bytes): only the first axis moves."""
    return rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def llama_cpp_unpermute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of :func:`llama_cpp_permute`."""
    return rows.reshape(n_head, rows.shape[0] // n_head // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


# -- reading ----------------------------------------------------------------------

@dataclass
class TensorSource:
    """Where one Hugging Face tensor comes from in the GGUF file."""

    gguf_name: str
    ggml_type: str  # gguf.GGMLQuantizationType name: F32, Q4_1, ...
    shape: tuple[int, ...]  # Hugging Face order (out, in)
    permute_heads: int  # head count whose rows were permuted, 0 if none


class GGUFFile:
    """A Llama-architecture GGUF file: metadata, tensors and tokenizer.

    Reading is lazy (the ``gguf`` package memory-maps the file); nothing is
    dequantised until :meth:`tensors` is called.
    """

    def __init__(self, path: str | Path) -> None:
        import gguf

        self.path = Path(path)
        try:
            self.reader = gguf.GGUFReader(self.path)
        except (OSError, ValueError) as exc:
            raise GGUFError(f"{self.path}: not a readable GGUF file: {exc}") from exc
        self.architecture = self.get("general.architecture")
        if self.architecture != "llama":
            raise GGUFError(
                f"{self.path}: general.architecture is {self.architecture!r}; only 'llama' is supported"
            )

    def get(self, key: str, default=None):
        """A metadata value (str, number, bool or list), or ``default`` when absent."""
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def require(self, key: str):
        value = self.get(key)
        if value is None:
            raise GGUFError(f"{self.path}: metadata key {key!r} is missing")
        return value

    def arch(self, key: str, default=None):
        return self.get(f"{self.architecture}.{key}", default)

    @cached_property
    def sha256(self) -> str:
        return file_sha256(self.path)

    # -- config -------------------------------------------------------------------

    def config(self) -> dict:
        """config.json of the model, from ``llama.*`` metadata (and which tensors exist)."""
        hidden = int(self._arch_required("embedding_length"))
        heads = int(self._arch_required("attention.head_count"))
        kv_heads = int(self.arch("attention.head_count_kv", heads))
        head_dim = int(self.arch("attention.key_length", 0) or self.arch("rope.dimension_count", 0) or hidden // heads)
        if self.arch("rope.dimension_count", head_dim) != head_dim:
            raise GGUFError(f"{self.path}: {self.architecture}.rope.dimension_count != head dim (partial RoPE)")
        names = {t.name for t in self.reader.tensors}
        if "rope_freqs.weight" in names:
            raise GGUFError(f"{self.path}: tensor rope_freqs.weight (llama3 RoPE scaling factors) is not supported")
        vocab = int(self.arch("vocab_size", 0) or len(self.require("tokenizer.ggml.tokens")))
        tokens = self.tokenizer_metadata()
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": int(self._arch_required("feed_forward_length")),
            "num_hidden_layers": int(self._arch_required("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": int(self.arch("context_length", 2048)),
            "rms_norm_eps": _float32(self.arch("attention.layer_norm_rms_epsilon", 1e-5)),
            "rope_theta": _float32(self.arch("rope.freq_base", 10000.0)),
            "rope_scaling": self._rope_scaling(),
            "attention_bias": "blk.0.attn_q.bias" in names,
            "mlp_bias": "blk.0.ffn_gate.bias" in names,
            "tie_word_embeddings": "output.weight" not in names,
            "bos_token_id": tokens.bos_id,
            "eos_token_id": tokens.eos_id,
            **({"pad_token_id": tokens.pad_id} if tokens.pad_id is not None else {}),
            "torch_dtype": "float32",
        }

    def _arch_required(self, key: str):
        return self.require(f"{self.architecture}.{key}")

    def _rope_scaling(self) -> dict | None:
        kind = self.arch("rope.scaling.type") or "none"
        if kind == "none":
            return None
        if kind == "linear":
            return {"rope_type": "linear", "factor": _float32(self.arch("rope.scaling.factor", 1.0))}
        raise GGUFError(f"{self.path}: {self.architecture}.rope.scaling.type {kind!r} is not supported (none, linear)")

    # -- tensors ------------------------------------------------------------------

    @cached_property
    def tensor_sources(self) -> dict[str, TensorSource]:
        """Every tensor of the file by its Hugging Face name; an unknown one is an error."""
        heads = {key: int(self.arch(f"attention.{key}", 0) or self.arch("attention.head_count")) for key in
                 PERMUTED.values()}
        sources = {}
        for tensor in self.reader.tensors:
            name = tensor.name
            block = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
            if block and block.group(2) in BLOCK_TENSORS:
                hf_name = f"model.layers.{block.group(1)}.{BLOCK_TENSORS[block.group(2)]}"
                permuted = PERMUTED.get(block.group(2).split(".")[0])
            elif name in GLOBAL_TENSORS:
                hf_name, permuted = GLOBAL_TENSORS[name], None
            else:
                raise GGUFError(f"{self.path}: tensor {name!r} has no Llama counterpart")
            sources[hf_name] = TensorSource(
                gguf_name=name,
                ggml_type=tensor.tensor_type.name,
                shape=tuple(int(d) for d in reversed(tensor.shape.tolist())),
                permute_heads=heads[permuted] if permuted else 0,
            )
        return sources

    def _reader_tensor(self, gguf_name: str):
        for tensor in self.reader.tensors:
            if tensor.name == gguf_name:
                return tensor
        raise KeyError(gguf_name)

    def tensor(self, hf_name: str) -> np.ndarray:
        """One tensor, dequantised to float32, in Hugging Face layout (Q/K rows un-permuted)."""
        from gguf import quants

        source = self.tensor_sources[hf_name]
        raw = self._reader_tensor(source.gguf_name)
        try:
            values = quants.dequantize(raw.data, raw.tensor_type)
        except NotImplementedError as exc:
            raise GGUFError(
                f"{self.path}: tensor {source.gguf_name!r} has type {source.ggml_type}, which the gguf package "
                f"cannot dequantise ({exc})"
            ) from exc
        # A copy: F32 tensors dequantise to a read-only view of the memory-mapped file.
        values = np.array(values, dtype=np.float32).reshape(source.shape)
        if source.permute_heads:
            values = llama_cpp_unpermute(values, source.permute_heads)
        return values

    def tensors(self, dtype: str = "float32") -> dict:
        """Every tensor, dequantised, as torch tensors of ``dtype`` (sorted by name)."""
        import torch

        return {name: torch.from_numpy(self.tensor(name)).to(getattr(torch, dtype))
                for name in sorted(self.tensor_sources)}

    def raw_tensor(self, hf_name: str) -> tuple[str, np.ndarray]:
        """(quantisation type, the tensor's stored rows): for quantised types a
        uint8 array (out, bytes per row) of GGUF blocks, with Q/K rows in
        Hugging Face order, so it dequantises to exactly :meth:`tensor`."""
        source = self.tensor_sources[hf_name]
        rows = np.asarray(self._reader_tensor(source.gguf_name).data)
        if source.permute_heads:
            rows = llama_cpp_unpermute(rows, source.permute_heads)
        return source.ggml_type, rows

    # -- tokenizer ----------------------------------------------------------------

    def tokenizer_metadata(self) -> TokenizerMetadata:
        return TokenizerMetadata.from_gguf(self)


def _float32(value) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.99999974e-06)."""
    return float(repr(np.float32(value)))


# -- tokenizer --------------------------------------------------------------------

@dataclass
class TokenizerMetadata:
    """The ``tokenizer.*`` metadata of a GGUF file."""

    kind: str  # tokenizer.ggml.model: "gpt2" or "llama"
    pre: str | None
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None
    merges: list[str] | None
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    end_of_turn_ids: list[int]
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    chat_template: str | None
    context_length: int | None

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> TokenizerMetadata:
        kind = f.require("tokenizer.ggml.model")
        if kind not in ("gpt2", "llama"):
            raise GGUFError(
                f"{f.path}: tokenizer.ggml.model {kind!r} is not supported: 'gpt2' (byte-level BPE) or "
                "'llama' (SentencePiece)"
            )
        tokens = list(f.require("tokenizer.ggml.tokens"))
        types = list(f.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))

        def token_id(key: str) -> int | None:
            value = f.get(f"tokenizer.ggml.{key}_token_id")
            if value is None:
                return None
            if not 0 <= int(value) < len(tokens):
                raise GGUFError(f"{f.path}: tokenizer.ggml.{key}_token_id {value} is outside the vocabulary")
            return int(value)

        return cls(
            kind=kind,
            pre=f.get("tokenizer.ggml.pre"),
            tokens=tokens,
            token_types=[int(t) for t in types],
            scores=f.get("tokenizer.ggml.scores"),
            merges=f.get("tokenizer.ggml.merges"),
            bos_id=token_id("bos"),
            eos_id=token_id("eos"),
            unk_id=token_id("unknown"),
            pad_id=token_id("padding"),
            end_of_turn_ids=[i for i in (token_id("eot"), token_id("eom")) if i is not None],
            # llama.cpp's defaults when a file does not say: BOS for SentencePiece, not for BPE.
            add_bos=bool(f.get("tokenizer.ggml.add_bos_token", kind == "llama")),
            add_eos=bool(f.get("tokenizer.ggml.add_eos_token", False)),
            add_space_prefix=bool(f.get("tokenizer.ggml.add_space_prefix", kind == "llama")),
            chat_template=f.get("tokenizer.chat_template"),
            context_length=f.arch("context_length"),
        )

    def token(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.tokens[token_id]

    @property
    def eos_ids(self) -> list[int]:
        """EOS, then the end-of-turn ids: any of them ends generation."""
        return list(dict.fromkeys(i for i in (self.eos_id, *self.end_of_turn_ids) if i is not None))


def build_tokenizer(meta: TokenizerMetadata):
    """The ``tokenizers.Tokenizer`` the metadata describes (see the module docstring)."""
    from tokenizers import AddedToken, Tokenizer

    tokenizer = Tokenizer(_bpe_model(meta))
    if meta.kind == "gpt2":
        _byte_level_pipeline(tokenizer, meta)
    else:
        _sentencepiece_pipeline(tokenizer, meta)
    # Control and unknown tokens are special (skipped when decoding), user-defined ones
    # are matched whole but decoded: transformers' GGUF conversion and llama.cpp agree.
    added = [
        AddedToken(token, special=kind != USER_DEFINED, normalized=False)
        for token, kind in zip(meta.tokens, meta.token_types)
        if kind in (CONTROL, USER_DEFINED, UNKNOWN)
    ]
    tokenizer.add_special_tokens([t for t in added if t.special])
    tokenizer.add_tokens([t for t in added if not t.special])
    _post_processor(tokenizer, meta)
    return tokenizer


def _bpe_model(meta: TokenizerMetadata):
    from tokenizers import models

    vocab = {token: index for index, token in enumerate(meta.tokens)}
    if len(vocab) != len(meta.tokens):
        raise GGUFError("tokenizer.ggml.tokens has duplicate tokens")
    if meta.kind == "gpt2":
        if not meta.merges:
            raise GGUFError("tokenizer.ggml.merges is missing: a 'gpt2' tokenizer needs its merges")
        merges = []
        for merge in meta.merges:
            pair = tuple(merge.split(" "))
            if len(pair) != 2:
                raise GGUFError(f"tokenizer.ggml.merges: {merge!r} is not two tokens separated by one space")
            merges.append(pair)
        return models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False)
    if meta.scores is None:
        raise GGUFError("tokenizer.ggml.scores is missing: a 'llama' tokenizer needs its scores")
    return models.BPE(vocab, sentencepiece_merges(meta), unk_token=meta.token(meta.unk_id),
                      fuse_unk=True, byte_fallback=True)


def sentencepiece_merges(meta: TokenizerMetadata) -> list[tuple[str, str]]:
    """SentencePiece BPE merges the pair whose merged piece scores highest; as
    ``tokenizers`` merges (what transformers' LlamaConverter writes into
    tokenizer.json): every split of every normal token into two tokens of the
    vocabulary, best merged score first, ties by the pieces' ids."""
    vocab = {token: index for index, token in enumerate(meta.tokens)}
    ranked = []
    for token, kind, score in zip(meta.tokens, meta.token_types, meta.scores):
        if kind != NORMAL:
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((-score, vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _byte_level_pipeline(tokenizer, meta: TokenizerMetadata) -> None:
    from tokenizers import Regex, decoders, pre_tokenizers

    pre = meta.pre or "default"
    if pre not in GPT2_PRE_TOKENIZERS:
        raise GGUFError(
            f"tokenizer.ggml.pre {pre!r} is not supported for a 'gpt2' tokenizer; supported: "
            f"{', '.join(sorted(GPT2_PRE_TOKENIZERS))}"
        )
    style = GPT2_PRE_TOKENIZERS[pre]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=style != "llama3")
    if style == "digits":
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif style == "llama3":
        split = pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated", invert=False)
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    else:
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()


def _sentencepiece_pipeline(tokenizer, meta: TokenizerMetadata) -> None:
    """Llama 2's tokenizer.json: spaces become "▁" (and one is prepended) in the
    normalizer, bytes missing from the vocabulary fall back to <0xNN> tokens."""
    from tokenizers import decoders, normalizers

    steps = [normalizers.Replace(" ", "▁")]
    if meta.add_space_prefix:
        steps.insert(0, normalizers.Prepend("▁"))
    tokenizer.normalizer = normalizers.Sequence(steps)
    decode = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if meta.add_space_prefix:
        decode.append(decoders.Strip(" ", 1, 0))
    tokenizer.decoder = decoders.Sequence(decode)


def _post_processor(tokenizer, meta: TokenizerMetadata) -> None:
    from tokenizers import processors

    bos = meta.token(meta.bos_id) if meta.add_bos else None
    eos = meta.token(meta.eos_id) if meta.add_eos else None
    if (meta.add_bos and bos is None) or (meta.add_eos and eos is None):
        raise GGUFError("tokenizer.ggml.add_bos_token/add_eos_token is set but the token id is missing")
    single = " ".join([*([f"{bos}:0"] if bos else []), "$A:0", *([f"{eos}:0"] if eos else [])])
    pair = " ".join([single, *([f"{bos}:1"] if bos else []), "$B:1", *([f"{eos}:1"] if eos else [])])
    specials = [(t, meta.tokens.index(t)) for t in dict.fromkeys(t for t in (bos, eos) if t)]
    tokenizer.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def tokenizer_files(meta: TokenizerMetadata) -> dict[str, str]:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json as text."""
    tokenizer = build_tokenizer(meta)
    special = {
        name: meta.token(token_id)
        for name, token_id in (("bos_token", meta.bos_id), ("eos_token", meta.eos_id),
                               ("unk_token", meta.unk_id), ("pad_token", meta.pad_id))
        if token_id is not None
    }
    added = {
        str(index): {"content": token, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": kind != USER_DEFINED}
        for index, (token, kind) in enumerate(zip(meta.tokens, meta.token_types))
        if kind in (CONTROL, USER_DEFINED, UNKNOWN)
    }
    extra = [meta.tokens[int(i)] for i, entry in added.items()
             if entry["special"] and entry["content"] not in special.values()]
    config = {
        **special,
        "add_bos_token": meta.add_bos,
        "add_eos_token": meta.add_eos,
        "added_tokens_decoder": added,
        "additional_special_tokens": extra,
        "clean_up_tokenization_spaces": False,
        "model_max_length": meta.context_length or 2048,
        "tokenizer_class": "PreTrainedTokenizerFast",
        **({"chat_template": meta.chat_template} if meta.chat_template else {}),
    }
    return {
        "tokenizer.json": tokenizer.to_str(pretty=True),
        "tokenizer_config.json": _json(config),
        "special_tokens_map.json": _json({**special, "additional_special_tokens": extra}),
    }


# -- conversion -------------------------------------------------------------------

def _json(value: dict) -> str:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _recipe(gguf_sha256: str, weights_dtype: str) -> dict:
    import safetensors
    import tokenizers

    return {
        "converter_sha256": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
        "gguf_sha256": gguf_sha256,
        "weights_dtype": weights_dtype,
        "tokenizers": tokenizers.__version__,
        "safetensors": safetensors.__version__,
    }


def is_converted(out_dir: Path, gguf_sha256: str, weights_dtype: str = "float32") -> bool:
    """Whether ``out_dir`` holds a complete conversion of that file by this converter."""
    try:
        manifest = json.loads((Path(out_dir) / SOURCE_MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    files = manifest.get("files") if isinstance(manifest, dict) else None
    return (
        manifest.get("recipe") == _recipe(gguf_sha256, weights_dtype)
        and bool(files)
        and all((Path(out_dir) / name).is_file() and (Path(out_dir) / name).stat().st_size == size
                for name, size in files.items())
    )


def convert_gguf(gguf: str | Path | GGUFFile, out_dir: str | Path, weights_dtype: str = "float32",
                 force: bool = False) -> Path:
    """Write the Hugging Face directory of the GGUF file ``gguf`` into ``out_dir`` and return it.

    Does nothing when ``out_dir`` already holds this file's conversion (same
    sha256, same converter), unless ``force``. The files are written into a
    temporary directory beside ``out_dir``, which then replaces it in one
    rename, so a reader never sees half a conversion and two converters
    racing on one file both end with a complete one. Byte-for-byte
    reproducible.
    """
    if weights_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weights_dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {weights_dtype!r}")
    out_dir = Path(out_dir)
    # Hashing is fast; parsing the metadata (every token and merge) takes seconds: hash first.
    sha256 = gguf.sha256 if isinstance(gguf, GGUFFile) else file_sha256(Path(gguf))
    if not force and is_converted(out_dir, sha256, weights_dtype):
        return out_dir
    f = gguf if isinstance(gguf, GGUFFile) else GGUFFile(gguf)
    f.sha256 = sha256

    import safetensors.torch

    start = time.monotonic()
    config = f.config()
    config["torch_dtype"] = weights_dtype
    meta = f.tokenizer_metadata()
    tensors = f.tensors(weights_dtype)
    generation_config = {
        "bos_token_id": meta.bos_id,
        "eos_token_id": meta.eos_ids if len(meta.eos_ids) > 1 else meta.eos_id,
        **({"pad_token_id": meta.pad_id} if meta.pad_id is not None else {}),
        "do_sample": False,
    }
    sources = {
        name: {"gguf_name": s.gguf_name, "ggml_type": s.ggml_type, "shape": list(s.shape),
               "rows_unpermuted_heads": s.permute_heads}
        for name, s in sorted(f.tensor_sources.items())
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-"))
    try:
        texts = {"config.json": _json(config), "generation_config.json": _json(generation_config),
                 **tokenizer_files(meta)}
        for name, text in texts.items():
            (staging / name).write_text(text, encoding="utf-8")
        safetensors.torch.save_file(tensors, staging / "model.safetensors", metadata={"format": "pt"})
        files = {p.name: p.stat().st_size for p in sorted(staging.iterdir())}
        manifest = {
            "recipe": _recipe(f.sha256, weights_dtype),
            "gguf_file": f.path.name,
            "general.name": f.get("general.name"),
            "tensors": sources,
            "files": files,
        }
        (staging / SOURCE_MANIFEST).write_text(_json(manifest), encoding="utf-8")
        for path in staging.iterdir():
            os.chmod(path, 0o644)  # safetensors writes 0600; the server may run as another user
        os.chmod(staging, 0o755)
        _replace_dir(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    n_params = sum(t.numel() for t in tensors.values())
    print(f"converted {f.path.name} ({n_params / 1e6:.1f}M parameters, {weights_dtype}) into {out_dir} "
          f"in {time.monotonic() - start:.1f} s", file=sys.stderr)
    return out_dir


def _replace_dir(staging: Path, out_dir: Path) -> None:
    """Move ``staging`` to ``out_dir``, putting aside what was there."""
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-old-"))
        os.replace(out_dir, old / "dir")
    try:
        os.replace(staging, out_dir)
    except OSError:
        # Another converter put the same conversion there between our two renames.
        if not (out_dir / SOURCE_MANIFEST).is_file():
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def resolve_gguf(gguf_path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The Hugging Face directory of a GGUF file, converted on first use into
    ``cache_dir`` (default ``$TRILLM_HOME/build/gguf`` or ``build/gguf``) under
    the file's sha256, so a changed file gets a new conversion."""
    path = Path(gguf_path)
    if not path.is_file():
        raise GGUFError(f"{path}: no such GGUF file")
    sha256 = file_sha256(path)
    return convert_gguf(path, Path(cache_dir or DEFAULT_CACHE_DIR) / f"{path.stem}-{sha256[:16]}")
