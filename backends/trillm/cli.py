"""The ``trillm`` command: build-demo-model, serve, render, build-engine."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from trillm.serve import ServeConfig, env_port, prepare, serve
from trillm.trtllm import build as trtllm_build


def _serve_args(parser: argparse.ArgumentParser) -> None:
    d = ServeConfig(checkpoint_dir=Path("."))
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="local Hugging Face Llama-style checkpoint dir (default: the demo model, built if missing)")
    parser.add_argument("--tokenizer", type=Path, default=None, help="tokenizer dir (default: the checkpoint)")
    parser.add_argument("--model-repository", type=Path, default=d.model_repository)
    parser.add_argument("--work-dir", type=Path, default=d.work_dir, help="where the rendered repository and log go")
    parser.add_argument("--engine", dest="engine_kind", choices=["torch", "tensorrt_llm"], default=d.engine_kind)
    parser.add_argument("--engine-dir", default=d.engine_dir, help="TensorRT-LLM engine dir (engine tensorrt_llm)")
    parser.add_argument("--host", default=d.host, help="address to bind (default loopback only)")
    parser.add_argument("--http-port", type=int, default=env_port("HTTP_PORT", d.http_port))
    parser.add_argument("--grpc-port", type=int, default=env_port("GRPC_PORT", d.grpc_port))
    parser.add_argument("--metrics-port", type=int, default=env_port("METRICS_PORT", d.metrics_port))
    for name in ("dtype", "max_batch_size", "max_model_len", "max_input_len", "max_num_seqs",
                 "max_num_batched_tokens", "kv_cache_blocks", "block_size", "num_threads"):
        default = getattr(d, name)
        parser.add_argument("--" + name.replace("_", "-"), type=type(default), default=default)
    parser.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false")
    parser.add_argument("--triton-arg", dest="extra_args", action="append", default=[], metavar="ARG",
                        help="pass ARG on to tritonserver (repeatable), e.g. --triton-arg=--log-verbose=1")
    parser.add_argument("--echo-prompt", dest="default_exclude_input_in_output", action="store_false",
                        help="return the prompt before the generated text when a request does not say")


def _config(args: argparse.Namespace) -> ServeConfig:
    from trillm.demo_model import DEFAULT_DEMO_DIR, build_demo_model

    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint = build_demo_model(Path(DEFAULT_DEMO_DIR))
    fields = {f.name for f in dataclasses.fields(ServeConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    return ServeConfig(checkpoint_dir=Path(checkpoint), tokenizer_dir=args.tokenizer, **values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trillm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("build-demo-model", help="build the small deterministic demo Llama + tokenizer")
    demo.add_argument("--out", type=Path, default=None)
    demo.add_argument("--force", action="store_true")
    serve_p = sub.add_parser("serve", help="render the model repository and run tritonserver on it")
    _serve_args(serve_p)
    serve_p.add_argument("--ready-timeout", type=float, default=600.0)
    render_p = sub.add_parser("render", help="only render the model repository (e.g. for NVIDIA's container)")
    _serve_args(render_p)
    engine_p = sub.add_parser("build-engine", help="build a TensorRT-LLM engine from a local HF checkpoint (GPU host)")
    trtllm_build.add_arguments(engine_p)
    args = parser.parse_args(argv)

    if args.command == "build-engine":
        return trtllm_build.run(args)

    if args.command == "build-demo-model":
        from trillm.demo_model import DEFAULT_DEMO_DIR, build_demo_model

        print(build_demo_model(Path(args.out or DEFAULT_DEMO_DIR), force=args.force))
        return 0
    config = _config(args)
    if args.command == "render":
        options = prepare(config)
        print(options.model_repository)
        return 0
    return serve(config, ready_timeout=args.ready_timeout)


if __name__ == "__main__":
    sys.exit(main())
