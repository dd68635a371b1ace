"""``trillm-client``: a thin command line over :class:`trillm_client.Client`.

Commands: ``generate``, ``chat``, ``models``, ``health``, ``ab``. Exit codes: 0 ok,
2 usage or invalid input, 3 server unavailable or model not ready, 4 model
(or version) not found, 1 any other error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from trillm_client.ab import TrafficSplit, parse_split
from trillm_client.chat import Conversation
from trillm_client.client import DEFAULT_URLS, PROTOCOLS, Client
from trillm_client.errors import (
    InvalidInputError,
    ModelNotFoundError,
    ModelNotReadyError,
    TrillmError,
    UnavailableError,
)

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_NOT_FOUND, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130


def exit_code(exc: BaseException) -> int:
    """The exit code for an error that ended a command."""
    if isinstance(exc, (InvalidInputError, ValueError)):
        return EXIT_USAGE
    if isinstance(exc, (UnavailableError, ModelNotReadyError)):
        return EXIT_UNAVAILABLE
    if isinstance(exc, ModelNotFoundError):
        return EXIT_NOT_FOUND
    return EXIT_ERROR


def server_parser(model: str = "ensemble", pin: bool = True) -> argparse.ArgumentParser:
    """The server options (a parent parser; each command gets its own, so defaults stay its own)."""
    server = argparse.ArgumentParser(add_help=False)
    group = server.add_argument_group("server")
    group.add_argument(
        "--url", help=f"host:port (default {DEFAULT_URLS['grpc']} for grpc, {DEFAULT_URLS['http']} for http)"
    )
    group.add_argument("--protocol", choices=PROTOCOLS, default="grpc", help="default: grpc")
    group.add_argument("--model", default=model, help=f"default: {model}")
    if pin:
        group.add_argument("--version", help="pin a model version (default: the server's choice)")
    group.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each response (default 60)")
    return server


def build_parser() -> argparse.ArgumentParser:
    server = server_parser()

    sampling = argparse.ArgumentParser(add_help=False)
    group = sampling.add_argument_group("generation")
    group.add_argument("--max-tokens", type=int, default=64, help="tokens to generate (default 64)")
    group.add_argument("--temperature", type=float, help="0 = greedy (the server's default)")
    group.add_argument("--top-k", type=int)
    group.add_argument("--top-p", type=float)
    group.add_argument("--seed", type=int)
    group.add_argument("--stop", action="append", default=[], metavar="WORD", help="stop word (repeatable)")

    parser = argparse.ArgumentParser(
        prog="trillm-client",
        description="Talk to a trillm (TensorRT-LLM backend compatible) Triton server.",
        epilog="exit codes: 0 ok, 1 error, 2 usage or invalid input, 3 server unavailable "
        "or model not ready, 4 model not found",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    generate = commands.add_parser("generate", parents=[server, sampling], help="complete one prompt")
    generate.add_argument("prompt", help="the prompt ('-' reads it from stdin)")
    generate.add_argument("--stream", action="store_true", help="print the text as it is generated")
    generate.add_argument("--json", action="store_true", help="print the whole completion as one JSON object")

    chat = commands.add_parser(
        "chat",
        parents=[server, sampling],
        help="interactive chat (the model's own chat template, on the server)",
        description="Keeps the conversation and sends it whole each turn as the messages input, which the "
        "server renders with the model's chat template (see trillm_client.chat). Commands: /reset, /exit. "
        "Ctrl-C stops a reply; Ctrl-D exits.",
    )
    chat.add_argument("--system", default="", help="system message")

    models = commands.add_parser("models", parents=[server], help="list the server's models and their state")
    models.add_argument("--json", action="store_true")
    health = commands.add_parser("health", parents=[server], help="is the server live and the model ready (exit 0/3)")
    health.add_argument("--json", action="store_true")

    ab = commands.add_parser(
        "ab", parents=[server_parser("tensorrt_llm_bls", pin=False), sampling],
        help="split requests between versions by weight; per-version latency, errors",
        description="Sends --requests requests of PROMPT, each pinned to a version drawn by weight, and prints "
        "every version's requests, errors and latency. Both versions must be loaded: tensorrt_llm_bls can serve "
        "versions side by side, ensemble cannot (docs/versions.md).",
    )
    ab.add_argument("prompt", help="the prompt ('-' reads it from stdin)")
    ab.add_argument("--split", type=parse_split, required=True, metavar="V=W,...", help="weights, e.g. 1=90,2=10")
    ab.add_argument("--requests", type=int, default=20, help="requests to send (default 20)")
    ab.add_argument("--concurrency", type=int, default=4, help="requests at a time (default 4)")
    ab.add_argument("--split-seed", type=int, help="seed of the version draws (default: random)")
    ab.add_argument("--json", action="store_true")
    return parser


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling parameters the user set (unset ones are not sent)."""
    values = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed}
    if args.stop:
        values["stop_words"] = list(args.stop)
    return {name: value for name, value in values.items() if value is not None}


def make_client(args: argparse.Namespace) -> Client:
    return Client(url=args.url, protocol=args.protocol, model=args.model, version=args.version, timeout=args.timeout)


def run_generate(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    sampling = sampling_kwargs(args)
    if args.stream:
        with client.stream(prompt, args.max_tokens, **sampling) as stream:
            for delta in stream:
                if not args.json:
                    out.write(delta)
                    out.flush()
        completion = stream.completion
        extra = {"ttft": stream.ttft, "itl": stream.itl}
    else:
        completion = client.generate(prompt, args.max_tokens, **sampling)
        extra = {}
        if not args.json:
            out.write(completion.text)
    assert completion is not None
    if args.json:
        out.write(json.dumps({**dataclasses.asdict(completion), **extra}, ensure_ascii=False))
    out.write("\n")
    return EXIT_OK


def run_chat(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    conversation = Conversation(system=args.system)
    sampling = sampling_kwargs(args)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            out.write("\n")
            return EXIT_OK
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return EXIT_OK
        if line == "/reset":
            conversation.reset()
            out.write("(conversation cleared)\n")
            continue
        conversation.add("user", line)
        out.write("assistant> ")
        out.flush()
        try:
            with client.stream(conversation.messages(), args.max_tokens, **sampling) as stream:
                for delta in stream:
                    out.write(delta)
                    out.flush()
            reply = stream.completion.text if stream.completion else ""
        except KeyboardInterrupt:  # stop this reply (the stream was cancelled), keep chatting
            reply = ""
            out.write(" [stopped]")
        except InvalidInputError as exc:
            conversation.turns.pop()
            out.write("\n")
            print(f"error: {exc.message}", file=sys.stderr)
            continue
        out.write("\n")
        conversation.add("assistant", reply.strip())


def run_models(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    infos = client.models()
    if args.json:
        out.write(json.dumps([dataclasses.asdict(i) for i in infos], ensure_ascii=False) + "\n")
        return EXIT_OK
    rows = [("MODEL", "VERSION", "STATE", "REASON")] + [
        (i.name, i.version, i.state, i.reason.splitlines()[0] if i.reason else "") for i in infos
    ]
    widths = [max(len(row[c]) for row in rows) for c in range(3)]
    for name, version, state, reason in rows:
        cells = [name.ljust(widths[0]), version.ljust(widths[1]), state.ljust(widths[2]), reason]
        out.write("  ".join(cells).rstrip() + "\n")
    return EXIT_OK


def run_health(client: Client, args: argparse.Namespace, out: TextIO) -> int:
    health = client.health()
    if args.json:
        out.write(json.dumps(health) + "\n")
    else:
        out.write(
            f"live: {str(health['live']).lower()}\nready: {str(health['ready']).lower()}\n"
            f"model {health['model']} ready: {str(health['model_ready']).lower()}\n"
        )
    return EXIT_OK if health["live"] and health["model_ready"] else EXIT_UNAVAILABLE


def run_ab(args: argparse.Namespace, out: TextIO) -> int:
    if args.requests < 1:
        raise ValueError(f"--requests must be >= 1, got {args.requests}")
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    with TrafficSplit(args.split, url=args.url, protocol=args.protocol, model=args.model, seed=args.split_seed,
                      timeout=args.timeout) as split:
        split.generate_many([prompt] * args.requests, args.max_tokens, concurrency=args.concurrency,
                            **sampling_kwargs(args))
        stats = split.stats()
        if args.json:
            out.write(json.dumps({v: {"requests": s.requests, "errors": dict(s.errors), "mean_s": s.mean,
                                      "p50_s": s.quantile(0.5), "p95_s": s.quantile(0.95)}
                                  for v, s in stats.items()}) + "\n")
        else:
            out.write(split.report() + "\n")
    return EXIT_OK if not any(s.error_count for s in stats.values()) else EXIT_ERROR


COMMANDS = {"generate": run_generate, "chat": run_chat, "models": run_models, "health": run_health}


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Runs one command; returns its exit code (argparse exits 2 itself on bad usage)."""
    args = build_parser().parse_args(argv)
    out = out or sys.stdout
    try:
        if args.command == "ab":
            return run_ab(args, out)
        with make_client(args) as client:
            return COMMANDS[args.command](client, args, out)
    except KeyboardInterrupt:
        out.write("\n")
        return EXIT_INTERRUPTED
    except (TrillmError, ValueError) as exc:
        out.flush()
        message = exc.message if isinstance(exc, TrillmError) else str(exc)
        print(f"trillm-client: error: {message}", file=sys.stderr)
        return exit_code(exc)


if __name__ == "__main__":
    sys.exit(main())
