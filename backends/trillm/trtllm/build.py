"""``trillm build-engine``: build a TensorRT-LLM engine from a local Hugging Face checkpoint.

It builds with TensorRT-LLM's LLM API (``LLM(model=CHECKPOINT,
build_config=BuildConfig(...), quant_config=...)`` then ``LLM.save``) and writes:

- ``OUT/``: the engine as ``LLM.save`` writes it (``config.json``, ``rank0.engine``);
- ``OUT/trillm-engine.json``: the manifest (source checkpoint and the sha256 of
  its config.json, build config, tensorrt_llm version, date; see manifest.py);
- with ``--model-repository DIR --version N``: ``DIR/tensorrt_llm/N/model.py``
  (the usual shim) and ``DIR/tensorrt_llm/N/engine.json`` (``{"engine_dir": OUT}``),
  so the engine is model version N; Triton serves the highest version.

Nothing is downloaded, except that FP8 / INT4-AWQ calibration uses TensorRT-LLM's
default dataset from the Hugging Face hub unless ``--calib-dataset`` names a local one.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trillm.serve import DEFAULT_MAX_MODEL_LEN_CAP
from trillm.trtllm.manifest import MANIFEST_NAME, engine_manifest, new_version_dir, write_manifest, write_version
from trillm.trtllm.runtime import TrtLlmApi, load_api

# --quantization -> tensorrt_llm.llmapi.QuantAlgo member (None: unquantised)
QUANT_ALGOS: dict[str, str | None] = {"none": None, "fp8": "FP8", "int4_awq": "W4A16_AWQ"}
DTYPES = ("auto", "float16", "bfloat16", "float32")


@dataclass
class BuildOptions:
    checkpoint_dir: Path
    out_dir: Path
    dtype: str = "auto"  # auto = the checkpoint's torch_dtype
    max_batch_size: int = 64
    max_seq_len: int = 0  # prompt + generated tokens; 0 = min(max_position_embeddings, 4096)
    max_input_len: int = 0  # longest prompt; 0 = max_seq_len - 1
    max_num_tokens: int = 8192  # tokens per engine step (in-flight batch)
    quantization: str = "none"
    calib_dataset: str = ""  # local calibration dataset for fp8 / int4_awq
    model_repository: Path | None = None
    version: int = 0
    force: bool = False

    def build_config(self) -> dict[str, int]:
        """The BuildConfig values, defaults resolved against the checkpoint."""
        config = json.loads((self.checkpoint_dir / "config.json").read_text())
        max_seq_len = self.max_seq_len or min(
            int(config.get("max_position_embeddings", DEFAULT_MAX_MODEL_LEN_CAP)), DEFAULT_MAX_MODEL_LEN_CAP
        )
        return {
            "max_batch_size": self.max_batch_size,
            "max_input_len": self.max_input_len or max_seq_len - 1,
            "max_seq_len": max_seq_len,
            "max_num_tokens": self.max_num_tokens,
        }

    def validate(self) -> None:
        if not (self.checkpoint_dir / "config.json").is_file():
            raise ValueError(f"--checkpoint {self.checkpoint_dir}: no config.json (a Hugging Face checkpoint dir)")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.quantization not in QUANT_ALGOS:
            raise ValueError(f"--quantization must be one of {tuple(QUANT_ALGOS)}, got {self.quantization!r}")
        if self.calib_dataset and QUANT_ALGOS[self.quantization] is None:
            raise ValueError("--calib-dataset only applies with --quantization fp8 or int4_awq")
        values = self.build_config()
        if min(values.values()) <= 0:
            raise ValueError(f"every build limit must be > 0, got {values}")
        if values["max_input_len"] > values["max_seq_len"]:
            raise ValueError(
                f"--max-input-len ({values['max_input_len']}) exceeds --max-seq-len ({values['max_seq_len']})"
            )
        if values["max_num_tokens"] < values["max_input_len"]:
            raise ValueError(
                f"--max-num-tokens ({values['max_num_tokens']}) must be >= --max-input-len "
                f"({values['max_input_len']}): a prompt is processed in one engine step"
            )
        if (self.model_repository is None) != (self.version == 0):
            raise ValueError("--model-repository and --version go together")
        if self.model_repository is not None:
            new_version_dir(self.model_repository, self.version)
        if self.out_dir.exists() and any(self.out_dir.iterdir()) and not self.force:
            raise ValueError(f"--out {self.out_dir} is not empty (pass --force to replace it)")


def build_engine(options: BuildOptions, api: TrtLlmApi | None = None) -> Path:
    """Build, save, write the manifest (and the model version); returns the engine dir."""
    options.validate()
    api = api or load_api()
    values = options.build_config()
    kwargs: dict[str, Any] = {
        "model": str(options.checkpoint_dir),
        "dtype": options.dtype,
        "build_config": api.BuildConfig(**values),
    }
    algo = QUANT_ALGOS[options.quantization]
    if algo is None:
        kwargs["skip_tokenizer_init"] = True  # only calibration needs the tokenizer
    else:
        kwargs["quant_config"] = api.QuantConfig(quant_algo=getattr(api.QuantAlgo, algo))
        if options.calib_dataset:
            kwargs["calib_config"] = api.CalibConfig(calib_dataset=options.calib_dataset)
    if options.out_dir.exists():
        shutil.rmtree(options.out_dir)
    llm = api.LLM(**kwargs)
    try:
        llm.save(str(options.out_dir))
    finally:
        llm.shutdown()
    build_record = {**values, "dtype": options.dtype, "quantization": options.quantization}
    write_manifest(options.out_dir, engine_manifest(options.checkpoint_dir, build_record, api.version))
    if options.model_repository is not None:
        write_version(options.model_repository, options.version, options.out_dir)
    return options.out_dir


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = BuildOptions(checkpoint_dir=Path("."), out_dir=Path("."))
    p.add_argument("--checkpoint", type=Path, required=True, help="local Hugging Face checkpoint dir")
    p.add_argument("--out", type=Path, default=Path("build/trt-engine"), help="engine dir (default build/trt-engine)")
    p.add_argument("--dtype", choices=DTYPES, default=d.dtype)
    p.add_argument("--max-batch-size", type=int, default=d.max_batch_size)
    p.add_argument("--max-seq-len", type=int, default=d.max_seq_len,
                   help="prompt + generated tokens (default min(max_position_embeddings, 4096))")
    p.add_argument("--max-input-len", type=int, default=d.max_input_len,
                   help="longest prompt (default max-seq-len - 1)")
    p.add_argument("--max-num-tokens", type=int, default=d.max_num_tokens)
    p.add_argument("--quantization", choices=tuple(QUANT_ALGOS), default=d.quantization)
    p.add_argument("--calib-dataset", default=d.calib_dataset,
                   help="local calibration dataset for fp8 / int4_awq (default: TensorRT-LLM's, from the HF hub)")
    p.add_argument("--model-repository", type=Path, default=None,
                   help="also make the engine version --version of DIR/tensorrt_llm")
    p.add_argument("--version", type=int, default=d.version)
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")


def run(args: argparse.Namespace) -> int:
    """Run ``trillm build-engine`` with arguments parsed by :func:`add_arguments`."""
    options = BuildOptions(
        checkpoint_dir=args.checkpoint,
        out_dir=args.out,
        dtype=args.dtype,
        max_batch_size=args.max_batch_size,
        max_seq_len=args.max_seq_len,
        max_input_len=args.max_input_len,
        max_num_tokens=args.max_num_tokens,
        quantization=args.quantization,
        calib_dataset=args.calib_dataset,
        model_repository=args.model_repository,
        version=args.version,
        force=args.force,
    )
    try:
        out = build_engine(options)
    except ValueError as exc:  # bad options, or TensorRT-LLM missing (TrtLlmUnavailable)
        print(f"trillm build-engine: {exc}", file=sys.stderr)
        return 2
    print(f"engine: {out}\nmanifest: {out / MANIFEST_NAME}")
    if options.model_repository is not None:
        print(f"model version: {options.model_repository / 'tensorrt_llm' / str(options.version)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="trillm build-engine", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
