"""A/B of the model repository's two versions on one server: latency and greedy agreement.

``make serve``'s version 1 is SmolLM2-135M-Instruct in float32 and version 2 the
same checkpoint quantised to weight-only int4 (groups of 32) at load
(``model_repository/tensorrt_llm/2/parameters.json``). This starts one
tritonserver (trillm.launcher, free loopback ports, always stopped) with both
versions loaded (``--version-policy all``) and sends the same fixed prompts
(benchmarks.quality.PROMPTS), greedy, streamed over gRPC, to
``tensorrt_llm_bls`` pinned to version 1 and to version 2: one request at a
time, the two versions alternating (the first version of each pair switches
from prompt to prompt), so that drift on a shared machine hits both alike.

Per version: TTFT and ITL p50 (ITL between streamed text pieces), output
tokens per second (generated tokens over the summed request times), the
engine's resident memory (``trillm_resident_memory_bytes`` from the metrics
port), and greedy agreement with version 1: the share of prompts whose text is
identical and the mean share of version 1's tokens generated before the first
difference (benchmarks.quality.agreement; the user-facing models return text,
so each text is encoded again with the checkpoint's tokenizer).

Writes ``benchmarks/results/versions-ab-<date>.json`` and prints a Markdown
table (for docs/benchmarks.md "Versions"). Run (``make bench-versions``):

    python -m benchmarks.versions_ab [--checkpoint DIR] [--prompts 16] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import signal
import statistics
import sys
import time
import urllib.request
from pathlib import Path

from benchmarks.quality import PROMPTS, agreement
from benchmarks.run import cpu_line
from trillm.engine.cpu import cpu_info
from trillm.launcher import free_port, running
from trillm.serve import ServeConfig, prepare
from trillm.tokenizer import load_tokenizer
from trillm.versions import VersionPolicy
from trillm_client import Client

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CHECKPOINT = ROOT / "build" / "smollm2" / "SmolLM2-135M-Instruct"
RESULTS = ROOT / "benchmarks" / "results"
VERSIONS = ("1", "2")
MODEL = "tensorrt_llm_bls"  # serves several versions side by side (docs/versions.md)
RSS_METRIC = re.compile(r'^trillm_resident_memory_bytes\{([^}]*)\} (\S+)$', re.MULTILINE)


def stream(client: Client, prompt: str, max_tokens: int) -> dict:
    """One greedy streamed request: its text, token count, TTFT, ITLs and end-to-end time."""
    started = time.perf_counter()
    text_stream = client.stream(prompt, max_tokens)
    text = text_stream.text()
    done = text_stream.completion
    return {"text": text, "output_tokens": done.num_output_tokens or 0, "model_version": done.model_version,
            "ttft_s": text_stream.ttft, "itl_s": text_stream.itl, "e2e_s": time.perf_counter() - started}


def resident_memory(metrics_url: str) -> dict[str, int]:
    """{version: VmRSS bytes} of the ``tensorrt_llm`` engines, read from the metrics endpoint."""
    with urllib.request.urlopen(metrics_url, timeout=30) as response:
        body = response.read().decode()
    found = {}
    for labels, value in RSS_METRIC.findall(body):
        fields = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if fields.get("model") == "tensorrt_llm":
            found[fields["version"]] = int(float(value))
    return found


def summarise(runs: list[dict], reference: list[dict], tokenizer) -> dict:
    """One version's row: latency percentiles, throughput, agreement with ``reference`` (version 1's runs)."""
    ids = lambda rs: [tokenizer.encode(r["text"], add_special_tokens=False) for r in rs]  # noqa: E731
    tokens = sum(r["output_tokens"] for r in runs)
    return {
        "requests": len(runs),
        "output_tokens": tokens,
        "ttft_p50_s": statistics.median(r["ttft_s"] for r in runs),
        "itl_p50_s": statistics.median(x for r in runs for x in r["itl_s"]),
        "output_tok_s": tokens / sum(r["e2e_s"] for r in runs),
        "identical_text": sum(a["text"] == b["text"] for a, b in zip(runs, reference)) / len(reference),
        "agreement": agreement(ids(runs), ids(reference)),
    }


def measure(args: argparse.Namespace) -> dict:
    config = ServeConfig(
        checkpoint_dir=args.checkpoint,
        work_dir=ROOT / "build" / "bench-versions",
        http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        enable_prefix_caching=False,  # the warm-up and the pairs replay prompts
        version_policy=VersionPolicy.parse("all"),
    )
    options = prepare(config)
    options.exit_timeout = 5
    prompts = PROMPTS[:args.prompts]
    runs: dict[str, list[dict]] = {v: [] for v in VERSIONS}
    started = time.perf_counter()
    with running(options, ready_timeout=900) as server:
        print(f"server ready in {time.perf_counter() - started:.0f} s (both versions loaded)", flush=True)
        clients = {v: Client(server.grpc_url, model=MODEL, version=v, timeout=600) for v in VERSIONS}
        try:
            for version, client in clients.items():
                stream(client, "warm up", 4)
            for i, prompt in enumerate(prompts):
                order = VERSIONS if i % 2 == 0 else VERSIONS[::-1]
                for version in order:
                    run = stream(clients[version], prompt, args.max_tokens)
                    if run["model_version"] != version:
                        raise RuntimeError(f"pinned to version {version}, answered by {run['model_version']!r}")
                    runs[version].append(run)
            memory = resident_memory(server.metrics_url)
        finally:
            for client in clients.values():
                client.close()
    tokenizer = load_tokenizer(args.checkpoint)
    rows = {v: {**summarise(runs[v], runs["1"], tokenizer), "resident_memory_bytes": memory.get(v)} for v in VERSIONS}
    return {"rows": rows, "runs": runs, "prompt_texts": prompts, "run_s": time.perf_counter() - started}


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        f"Written by `make bench-versions` (`python -m benchmarks.versions_ab`) on {results['date']}: "
        f"`{results['checkpoint']}`, version 1 as is and version 2 int4 (group 32), engine dtype "
        f"`{results['dtype']}`; {results['prompts']} prompts of benchmarks.quality, {results['max_tokens']} greedy "
        "tokens each, streamed over gRPC to `tensorrt_llm_bls` pinned to each version, one request at a time, "
        "the versions alternating.",
        f"CPU: {cpu_line(m)}; {m['cpus']} CPUs. **Shared machine**: other jobs ran beside it (load average "
        f"{m['loadavg_start'][0]:.1f} at the start, {m['loadavg_end'][0]:.1f} at the end).",
        "",
        "| version | TTFT p50 | ITL p50 | output tok/s | engine RSS | identical text | tokens before first difference |",
        "|---|---|---|---|---|---|---|",
    ]
    names = {"1": "1 (float32)", "2": "2 (int4 g32)"}
    for version, row in results["rows"].items():
        rss = f"{row['resident_memory_bytes'] / 2**20:.0f} MiB" if row["resident_memory_bytes"] else "n/a"
        lines.append(
            f"| {names[version]} | {row['ttft_p50_s'] * 1e3:.1f} ms | {row['itl_p50_s'] * 1e3:.1f} ms | "
            f"{row['output_tok_s']:.1f} | {rss} | {100 * row['identical_text']:.0f}% | "
            f"{100 * row['agreement']['tokens_before_first_difference']:.0f}% |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT,
                        help="what both versions serve (trillm build-smollm2 makes the default one)")
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help=f"how many of the {len(PROMPTS)} prompts")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32",
                        help="the engines' dtype (default float32: version 1 is then the checkpoint as stored; "
                        "`make serve` runs auto)")
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--out", type=Path, default=None, help=f"default {RESULTS}/versions-ab-<date>.json")
    args = parser.parse_args(argv)
    if not (args.checkpoint / "config.json").is_file():
        parser.error(f"--checkpoint: no config.json in {args.checkpoint} (trillm build-smollm2 makes the default one)")
    if not 1 <= args.prompts <= len(PROMPTS):
        parser.error(f"--prompts: 1 to {len(PROMPTS)}")
    # SIGTERM unwinds like Ctrl-C, so the server started here is always stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    now = datetime.datetime.now(datetime.timezone.utc)
    machine = {"cpu": cpu_info().as_dict(), "processor": cpu_info().model_name, "cpus": os.cpu_count(),
               "python": platform.python_version(), "shared_machine": True, "loadavg_start": os.getloadavg()}
    measured = measure(args)
    machine["loadavg_end"] = os.getloadavg()
    checkpoint = args.checkpoint.resolve()
    results = {
        "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "checkpoint": str(checkpoint.relative_to(ROOT) if checkpoint.is_relative_to(ROOT) else checkpoint),
        "dtype": args.dtype, "max_tokens": args.max_tokens, "prompts": args.prompts, "machine": machine, **measured,
    }
    results["markdown"] = markdown(results)
    out = args.out or RESULTS / f"versions-ab-{now:%Y-%m-%d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print("\n" + results["markdown"] + f"\n\nfigures: {out}; took {results['run_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
