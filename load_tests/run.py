"""``make load``, ``make load-sweep`` and ``make load-ui``: bounded Locust runs
against a trillm server that this starts (on free loopback ports, always
stopped: terminate, then kill) or one given by URL.

    python -m load_tests.run run   -u 4 -r 4 -t 30s [--transport grpc-stream,http-sse] [--url H:P --grpc-url H:P]
    python -m load_tests.run sweep --sweep-users 1,2,4,8,16 --step-duration 30s
    python -m load_tests.run ui    --web-port 8089

(docs/load-tests.md has the whole story.)

Each writes into ``load_tests/reports/<timestamp>/``: Locust's CSV
(``locust_stats.csv``...) and HTML report, ``requests.jsonl`` (one line per
request), ``summary.json``, the PNG plots, and ``server/tritonserver.log``
when it started the server. The exit code is non-zero when a threshold was
crossed (or a sweep step crossed one). Locust runs in its own process (it
monkey-patches the standard library with gevent); this one only manages it.
Every run is bounded: Locust ends the test after ``-t`` plus the time for
requests in flight to finish, and is stopped (SIGINT, then SIGTERM, then
SIGKILL) if it overruns that.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trillm.launcher import LaunchError, TritonServer, free_port
from trillm.openai.process import OpenAIOptions, OpenAIProcess
from trillm_client import Client, TrillmError

from load_tests.metrics import read_records
from load_tests.options import TRANSPORTS, add_options, check_options, forward, host_port, is_loopback

ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = "load_tests/locustfile.py"
REPORTS = ROOT / "load_tests" / "reports"
DEMO_MODEL = ROOT / "build" / "demo-model"
# Locust's start-up and shutdown, on top of a run's own bound.
SLACK_S = 60.0
GRACE_S = 20.0
DEFAULT_RUN_TIME_S = 30.0
INTERRUPTED = 130  # the exit code of a run ended by Ctrl-C / SIGTERM
_DURATION = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s?)?$")


def parse_duration(text: str) -> float:
    """Seconds of ``"90"``, ``"30s"``, ``"2m"``, ``"1m30s"``, ``"1h"``."""
    match = _DURATION.match(str(text).strip())
    if not match or not any(match.groups()):
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: use e.g. 30s, 2m, 1m30s")
    hours, minutes, seconds = match.groups()
    total = int(hours or 0) * 3600 + int(minutes or 0) * 60 + float(seconds or 0)
    if total <= 0:
        raise argparse.ArgumentTypeError(f"duration {text!r} must be > 0")
    return total


def timespan(seconds: float) -> str:
    """Seconds as Locust's -t takes them (whole seconds, rounded up)."""
    return f"{math.ceil(seconds)}s"


def parse_users_list(text: str) -> list[int]:
    """``"1,2,4,8"`` as given, or ``"16"``: the powers of two up to 16 (and 16)."""
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid user counts {text!r}: use e.g. 16 or 1,2,4,8") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"user counts must be >= 1, got {text!r}")
    if len(values) > 1:
        return values
    top, steps = values[0], []
    n = 1
    while n < top:
        steps.append(n)
        n *= 2
    return [*steps, top]


def parse_transports(text: str) -> list[str]:
    names = [t.strip() for t in str(text).split(",") if t.strip()]
    unknown = [t for t in names if t not in TRANSPORTS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"transport must be a comma list of {', '.join(TRANSPORTS)}; got {text!r}")
    return names


def new_report_dir(root: Path, suffix: str = "") -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S") + suffix
    out, n = root / stamp, 1
    while out.exists():
        n += 1
        out = root / f"{stamp}-{n}"
    out.mkdir(parents=True)
    return out


@dataclass
class Target:
    """The server under test."""

    http_url: str
    grpc_url: str
    info: dict[str, Any]


@contextmanager
def server_target(args: argparse.Namespace, out: Path) -> Iterator[Target]:
    """The server given by --url/--grpc-url, or one started here for the duration."""
    if args.url or args.grpc_url:
        http_url, grpc_url = host_port(args.url or ""), host_port(args.grpc_url or "")
        yield Target(http_url, grpc_url, {"started_here": False, "http_url": http_url, "grpc_url": grpc_url})
        return
    from trillm.demo_model import build_demo_model  # imports torch (seconds): only when serving here
    from trillm.serve import ServeConfig, prepare

    checkpoint = Path(args.checkpoint) if args.checkpoint else Path(build_demo_model(DEMO_MODEL))
    config = ServeConfig(
        checkpoint_dir=checkpoint,
        model_repository=ROOT / "model_repository",
        work_dir=out / "server",
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
    )
    options = prepare(config)
    options.exit_timeout = 5
    server = TritonServer(options)
    print(f"load: starting tritonserver for {checkpoint} (log: {server.log_path})", flush=True)
    server.start()
    openai = None
    try:
        server.wait_ready(timeout=args.ready_timeout)
        if "openai-sse" in args.transport:
            openai = OpenAIProcess(OpenAIOptions(server.grpc_url, port=free_port(), model=args.model,
                                                 log_file=out / "server" / "openai.log")).start()
            openai.wait_ready(args.ready_timeout)
            args.openai_url = f"{openai.url}/v1"
        yield Target(server.http_url, server.grpc_url, {
            "started_here": True, "checkpoint": str(checkpoint), "http_url": server.http_url,
            "grpc_url": server.grpc_url, "metrics_url": server.metrics_url, "log": str(server.log_path),
        })
    finally:
        if openai is not None:
            openai.stop()
        print("load: stopping tritonserver", flush=True)
        server.stop(grace=GRACE_S)


def check_urls(args: argparse.Namespace) -> None:
    """A server given by URL: one URL per transport used, on loopback unless --allow-remote."""
    needs_grpc = "grpc-stream" in args.transport
    needs_http = any(t.startswith("http") for t in args.transport)
    if needs_grpc and not args.grpc_url:
        raise ValueError("--transport grpc-stream needs --grpc-url (or neither URL, to start a server)")
    if needs_http and not args.url:
        raise ValueError("the http transports need --url (or neither URL, to start a server)")
    urls = (args.url, args.grpc_url, args.openai_url if "openai-sse" in args.transport else None)
    for url in filter(None, urls):
        if not args.allow_remote and not is_loopback(url):
            raise ValueError(f"{url} is not a loopback address; pass --allow-remote to load another machine")


def warm_up(args: argparse.Namespace, target: Target) -> None:
    """Waits for the model and sends a few short requests, so that one-off start-up costs stay out of the figures."""
    protocol, url = ("grpc", target.grpc_url) if target.grpc_url else ("http", target.http_url)
    print(f"load: waiting up to {args.ready_timeout:g}s for model {args.model} at {url}", flush=True)
    with Client(url, protocol=protocol, model=args.model, timeout=args.request_timeout) as client:
        client.wait_ready(timeout=args.ready_timeout)
        for _ in range(args.warmup_requests):
            client.generate("warm up", max_tokens=4)


def locust_command(
    args: argparse.Namespace, target: Target, out: Path, users: int, spawn_rate: float, duration: float | None
) -> list[str]:
    suite = argparse.Namespace(**vars(args))
    suite.grpc_url = target.grpc_url or "127.0.0.1:8001"
    suite.report_dir = str(out)
    return [
        sys.executable, "-m", "locust", "-f", LOCUSTFILE,
        "--host", f"http://{target.http_url or '127.0.0.1:8000'}",
        "-u", str(users), "-r", f"{spawn_rate:g}", *(["-t", timespan(duration)] if duration else []),
        # Requests in flight when the time is up finish and are counted.
        "--stop-timeout", f"{math.ceil(args.request_timeout)}",
        "--csv", str(out / "locust"), "--csv-full-history", "--html", str(out / "report.html"),
        *forward(suite),
    ]


def run_bounded(command: list[str], limit_s: float) -> int:
    """Runs ``command``; stops it after ``limit_s`` or on Ctrl-C / SIGTERM.

    Locust runs in its own session, so that a Ctrl-C in the terminal reaches
    only this process, which then stops Locust exactly once: SIGINT (Locust
    stops the test and writes every report), then SIGTERM, then SIGKILL.
    """
    process = subprocess.Popen(command, cwd=ROOT, start_new_session=True)
    try:
        return process.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
        print(f"load: locust still running after {limit_s:.0f}s; stopping it", file=sys.stderr, flush=True)
        _stop(process)
        return 124
    except KeyboardInterrupt:
        _stop(process)
        raise


def _stop(process: subprocess.Popen) -> None:
    for send in (lambda: process.send_signal(signal.SIGINT), process.terminate):
        send()
        try:
            process.wait(timeout=GRACE_S)
            return
        except subprocess.TimeoutExpired:
            pass
    process.kill()
    process.wait()


def finish_run(out: Path, locust_rc: int, target: Target) -> tuple[dict[str, Any] | None, int]:
    """Adds the server to summary.json and draws the plots; returns (summary, exit code)."""
    summary_path = out / "summary.json"
    if not summary_path.exists():
        print(f"load: locust exited with {locust_rc} and wrote no summary (see the output above)", file=sys.stderr)
        return None, locust_rc or 1
    summary = json.loads(summary_path.read_text())
    summary["server"] = target.info
    summary["locust_exit_code"] = locust_rc
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    from load_tests.plots import run_plots

    run_plots(read_records(out / "requests.jsonl"), out)
    return summary, locust_rc if locust_rc else (0 if summary["thresholds"]["passed"] else 1)


def _ms(dist: dict[str, float] | None, key: str) -> str:
    return f"{dist[key]:.0f}" if dist else "-"


def print_summary(out: Path, summary: dict[str, Any]) -> None:
    r, t, lat, c = summary["requests"], summary["throughput"], summary["latency_ms"], summary["client"]
    lines = [
        f"load: report in {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}",
        f"  requests   {r['completed']} completed, {r['failed']} failed (error ratio {r['error_ratio']:.4f})",
        f"  throughput {t['output_tokens_per_s']:.1f} output tok/s, {t['requests_per_s']:.2f} req/s "
        f"over {summary['window_s']:.1f}s",
    ]
    for name in ("ttft", "itl", "tpot", "e2e"):
        d = lat[name]
        lines.append(f"  {name.upper():<5} ms   p50 {_ms(d, 'p50'):>6}  p90 {_ms(d, 'p90'):>6}  p99 {_ms(d, 'p99'):>6}")
    lag = c.get("loop_lag_ms")
    lines.append(f"  client     {c.get('cpu_percent', 0):.0f}% CPU, event-loop lag p99 {_ms(lag, 'p99')} ms")
    verdict = summary["thresholds"]
    failed = "; ".join(verdict["violations"])
    lines.append("  thresholds passed" if verdict["passed"] else f"  thresholds FAILED: {failed}")
    print("\n".join(lines), flush=True)


def default_run_time(args: argparse.Namespace) -> float:
    """-t when not given: long enough for the step shape to reach --users and hold them one step."""
    if args.shape == "step":
        return (math.ceil(args.users / max(args.step_users, 1)) + 1) * args.step_time
    return DEFAULT_RUN_TIME_S


def run_headless(args: argparse.Namespace, target: Target, out: Path, users: int, duration: float) -> int:
    """One headless Locust run writing into ``out``; returns its exit code, INTERRUPTED
    after a Ctrl-C (Locust has then stopped the test and written its reports)."""
    command = locust_command(args, target, out, users, args.spawn_rate or users, duration)
    try:
        return run_bounded([*command, "--headless", "--only-summary", *classes(args)],
                           duration + args.request_timeout + SLACK_S)
    except KeyboardInterrupt:
        print("load: interrupted; reporting what was measured", file=sys.stderr, flush=True)
        return INTERRUPTED


def cmd_run(args: argparse.Namespace) -> int:
    out = new_report_dir(args.reports)
    run_time = args.run_time or default_run_time(args)
    with server_target(args, out) as target:
        warm_up(args, target)
        rc = run_headless(args, target, out, args.users, run_time)
    summary, rc = finish_run(out, rc, target)
    if summary:
        print_summary(out, summary)
    return rc


SWEEP_FIELDS = (
    "users", "completed", "failed", "error_ratio", "requests_per_s", "output_tokens_per_s",
    "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "tpot_p50_ms", "tpot_p99_ms",
    "e2e_p50_ms", "e2e_p99_ms", "passed",
)


def sweep_row(users: int, summary: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {
        "users": users,
        "completed": summary["requests"]["completed"],
        "failed": summary["requests"]["failed"],
        "error_ratio": summary["requests"]["error_ratio"],
        "requests_per_s": summary["throughput"]["requests_per_s"],
        "output_tokens_per_s": summary["throughput"]["output_tokens_per_s"],
    }
    for metric in ("ttft", "itl", "tpot", "e2e"):
        dist = summary["latency_ms"][metric]
        for stat in ("p50", "p99"):
            row[f"{metric}_{stat}_ms"] = dist[stat] if dist else None
    row["passed"] = summary["thresholds"]["passed"]
    return row


def cmd_sweep(args: argparse.Namespace) -> int:
    out = new_report_dir(args.reports, "-sweep")
    rows: list[dict[str, Any]] = []
    rc = 0
    with server_target(args, out) as target:
        warm_up(args, target)
        for users in args.sweep_users:
            step = out / f"users-{users:03d}"
            step.mkdir()
            print(f"load: sweep step {users} users for {args.step_duration:g}s", flush=True)
            step_rc = run_headless(args, target, step, users, args.step_duration)
            summary, step_rc = finish_run(step, step_rc, target)
            rc = rc or step_rc
            if summary is None:
                break
            print_summary(step, summary)
            rows.append(sweep_row(users, summary))
            if step_rc == INTERRUPTED:
                break
            if summary["requests"]["completed"] == 0:
                print("load: no request completed; ending the sweep", file=sys.stderr)
                break
    (out / "sweep.json").write_text(json.dumps({"server": target.info, "points": rows}, indent=2) + "\n")
    with open(out / "sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SWEEP_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    if rows:
        from load_tests.plots import sweep_plot

        sweep_plot(rows, out / "sweep.png")
    print(f"load: sweep report in {out}")
    for row in rows:
        print(f"  {row['users']:>4} users  {row['output_tokens_per_s']:>8.1f} tok/s  "
              f"TTFT p50/p99 {row['ttft_p50_ms'] or 0:>7.0f}/{row['ttft_p99_ms'] or 0:<7.0f} ms  "
              f"ITL p50/p99 {row['itl_p50_ms'] or 0:>5.0f}/{row['itl_p99_ms'] or 0:<5.0f} ms  "
              f"{'ok' if row['passed'] else 'FAILED'}")
    return rc


def cmd_ui(args: argparse.Namespace) -> int:
    out = new_report_dir(args.reports, "-ui")
    with server_target(args, out) as target:
        warm_up(args, target)
        command = locust_command(args, target, out, args.users, args.spawn_rate or args.users, args.run_time)
        print(f"load: Locust web UI on http://127.0.0.1:{args.web_port} (pick user classes and the shape "
              f"TrillmShape there); closes after {args.ui_limit:g}s or Ctrl-C", flush=True)
        try:
            rc = run_bounded([*command, "--web-host", "127.0.0.1", "--web-port", str(args.web_port),
                              "--class-picker"], args.ui_limit)
        except KeyboardInterrupt:  # how an interactive session normally ends; Locust has been stopped
            rc = 0
    if (out / "summary.json").exists():
        summary, _ = finish_run(out, rc, target)
        if summary:
            print_summary(out, summary)
    return 0 if rc in (0, 124) else rc


def classes(args: argparse.Namespace) -> list[str]:
    return [TRANSPORTS[t] for t in args.transport]


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    target = common.add_argument_group("server")
    target.add_argument("--url", default=None, help="HTTP host:port of a running server (default: start one here)")
    target.add_argument("--checkpoint", default=None,
                        help="checkpoint to serve when starting a server (default: the demo model)")
    target.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for the server and model")
    target.add_argument("--warmup-requests", type=int, default=2, help="short requests sent before measuring")
    run = common.add_argument_group("run")
    run.add_argument("-u", "--users", type=int, default=4, help="concurrent users (the pool size for --shape rate)")
    run.add_argument("-r", "--spawn-rate", type=float, default=0.0,
                     help="users started per second (default: all at once)")
    run.add_argument("-t", "--run-time", type=parse_duration, default=None,
                     help="e.g. 30s, 2m (default 30s; step shape: until --users, plus one step; ui: until stopped)")
    run.add_argument("--transport", type=parse_transports, default=["grpc-stream"],
                     help=f"comma list of {', '.join(TRANSPORTS)} (users are split evenly)")
    run.add_argument("--reports", type=Path, default=REPORTS, help="where the timestamped report folders go")
    add_options(common.add_argument_group("suite (also Locust options)"), for_locust=False, exclude=("--report-dir",))
    # None = not given: start a server, and size prompts with its checkpoint's tokenizer.
    common.set_defaults(grpc_url=None, tokenizer=None)

    parser = argparse.ArgumentParser(prog="python -m load_tests.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", parents=[common], help="one headless run")
    sweep = sub.add_parser("sweep", parents=[common], help="a headless run per concurrency, and the curve")
    sweep.add_argument("--sweep-users", type=parse_users_list, default=parse_users_list("64"),
                       help="user counts, e.g. 1,2,4,8, or one number N: the powers of two up to N (default 64)")
    sweep.add_argument("--step-duration", type=parse_duration, default=parse_duration("30s"),
                       help="duration of each step (default 30s)")
    ui = sub.add_parser("ui", parents=[common], help="the Locust web UI on 127.0.0.1")
    ui.add_argument("--web-port", type=int, default=8089)
    ui.add_argument("--ui-limit", type=parse_duration, default=parse_duration("30m"),
                    help="close the UI (and the server) after this long")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.tokenizer is None:
        # The served checkpoint's; for a server given by URL, the demo model's if built
        # (summary.json's tokens.input_not_as_asked shows a mismatch).
        starts_server = not (args.url or args.grpc_url)
        if args.checkpoint:
            args.tokenizer = args.checkpoint
        else:
            args.tokenizer = str(DEMO_MODEL) if starts_server or DEMO_MODEL.is_dir() else ""
    try:
        check_options(args)
        if args.url or args.grpc_url:
            check_urls(args)
        if args.command == "sweep" and args.shape != "constant":
            raise ValueError("a sweep holds each user count constant; --shape step and rate are for `run`")
    except (ValueError, TrillmError) as exc:
        print(f"load: {exc}", file=sys.stderr)
        return 2
    # SIGTERM (CI, timeout) ends the run like Ctrl-C: Locust stopped, server stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return {"run": cmd_run, "sweep": cmd_sweep, "ui": cmd_ui}[args.command](args)
    except (TrillmError, LaunchError) as exc:  # no server, or the model never became ready
        print(f"load: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("load: interrupted", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
