"""Reading a Hugging Face Llama checkpoint: ``config.json`` and safetensors weights.

A checkpoint is a directory, or a llama.cpp ``.gguf`` file, which
:func:`resolve_checkpoint` turns into its converted directory
(trillm.gguf_checkpoint, cached under the file's sha256).

No ``transformers`` import: the config keys are read directly, in both the
older layout (``rope_theta`` + ``rope_scaling``) and the transformers 5 one
(``rope_parameters``). Anything this engine would compute wrongly is refused
with a message naming the config key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class LlamaSpec:
    """The shape and numerics of a Llama checkpoint, as this engine needs them."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_type: str  # one of SUPPORTED_ROPE_TYPES
    rope_params: dict  # the scaling parameters of rope_type (factor, ...)
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool

    @classmethod
    def from_config(cls, config: dict) -> LlamaSpec:
        model_type = config.get("model_type")
        architectures = config.get("architectures") or []
        if model_type != "llama" and "LlamaForCausalLM" not in architectures:
            raise ValueError(f"config.json: model_type must be 'llama' (LlamaForCausalLM), got {model_type!r}")
        if config.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json: hidden_act must be 'silu', got {config.get('hidden_act')!r}")
        if config.get("pretraining_tp", 1) not in (1, None):
            raise ValueError("config.json: pretraining_tp must be 1")
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        if heads % kv_heads:
            raise ValueError(
                f"config.json: num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})"
            )
        head_dim = int(config.get("head_dim") or hidden // heads)
        rope_theta, rope_type, rope_params = _rope(config)
        return cls(
            vocab_size=int(config["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]),
            num_layers=int(config["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_type=rope_type,
            rope_params=rope_params,
            max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=bool(config.get("attention_bias", False)),
            mlp_bias=bool(config.get("mlp_bias", False)),
        )

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * torch.empty(0, dtype=dtype).element_size()


def _rope(config: dict) -> tuple[float, str, dict]:
    """(theta, type, scaling parameters) from either config layout."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    if any(isinstance(v, dict) for v in params.values()):
        raise ValueError("config.json: per-layer rope_parameters are not supported for Llama")
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    theta = float(params.pop("rope_theta", None) or config.get("rope_theta") or 10000.0)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"config.json: rope scaling type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}"
        )
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("config.json: partial_rotary_factor != 1 is not supported")
    if rope_type in ("linear", "llama3") and "factor" not in params:
        raise ValueError(f"config.json: rope scaling type {rope_type!r} needs 'factor'")
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor"):
            if key not in params:
                raise ValueError(f"config.json: rope scaling type 'llama3' needs {key!r}")
        params.setdefault("original_max_position_embeddings", config.get("max_position_embeddings", 2048))
    return theta, rope_type, params


def resolve_checkpoint(checkpoint: str | Path) -> Path:
    """The Hugging Face directory of a checkpoint: ``checkpoint`` itself, or for a
    ``.gguf`` file its conversion (made on first use, then cached)."""
    path = Path(checkpoint)
    if path.suffix.lower() == ".gguf":
        from trillm.gguf_checkpoint import resolve_gguf

        return resolve_gguf(path)
    return path


def read_config(checkpoint_dir: str | Path) -> dict:
    path = resolve_checkpoint(checkpoint_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"checkpoint_dir: cannot read {path}: {e}") from e


def safetensors_files(checkpoint_dir: str | Path) -> list[Path]:
    """The weight files: those of model.safetensors.index.json, else every *.safetensors."""
    root = resolve_checkpoint(checkpoint_dir)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [root / name for name in sorted(set(weight_map.values()))]
    else:
        files = sorted(root.glob("*.safetensors"))
    if not files:
        raise ValueError(f"checkpoint_dir: no *.safetensors weights in {root}")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ValueError(f"checkpoint_dir: weight shards listed in the index are missing: {missing}")
    return files


def load_tensors(checkpoint_dir: str | Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, converted to ``dtype``."""
    tensors: dict[str, torch.Tensor] = {}
    for path in safetensors_files(checkpoint_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name).to(dtype)
    return tensors
