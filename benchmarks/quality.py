"""Quality of each precision: perplexity on a fixed text, greedy agreement with float32.

Modes: ``fp32`` (float32, unquantised), ``bf16`` (bfloat16 weights and
compute), ``int8`` and ``int4`` (weight-only, trillm.engine.quant, float32
elsewhere). Each runs through the engine's own forward pass:

- **Perplexity** of ``benchmarks/data/ppl.txt`` (public-domain English: the
  Declaration of Independence and the Gettysburg Address, ~2k tokens with
  SmolLM2's tokenizer), teacher-forced in the engine's prefill chunks of
  ``--chunk`` tokens through its paged KV cache; exp of the mean negative
  log-likelihood of every token after the first.
- **Greedy agreement** with fp32 over :data:`PROMPTS`, ``--tokens`` tokens
  each: the share of prompts whose continuation is identical, and the mean
  share of tokens generated before the first difference.

Writes ``benchmarks/results/quality-<date>.json`` and prints a Markdown table
(for docs/benchmarks.md "Quantisation"). Run:

    python -m benchmarks.quality [--checkpoint DIR] [--modes fp32 bf16 int8 int4]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CHECKPOINT = ROOT / "build" / "smollm2" / "SmolLM2-135M-Instruct"
TEXT = ROOT / "benchmarks" / "data" / "ppl.txt"
RESULTS = ROOT / "benchmarks" / "results"
MODES = {"fp32": ("float32", "none"), "bf16": ("bfloat16", "none"),
         "int8": ("float32", "int8"), "int4": ("float32", "int4")}
PROMPTS = [
    "The capital of France is",
    "Water boils at a temperature of",
    "The three primary colours are",
    "In 1969, the first people to walk on the Moon were",
    "A recipe for pancakes needs flour, eggs and",
    "The largest planet in our solar system is",
    "Photosynthesis is the process by which plants",
    "To write a function in Python, you start with the keyword",
    "The French Revolution began in the year",
    "Shakespeare wrote many plays, including",
    "The speed of light in a vacuum is about",
    "A good way to learn a new language is to",
    "The human heart has four chambers, called",
    "Once upon a time, in a small village by the sea,",
    "The main ingredients of bread are",
    "Mount Everest is located in",
]


def perplexity(engine, ids: list[int], chunk: int) -> float:
    """exp(mean NLL) of ids[1:] given their prefixes, in chunks through the engine's KV cache."""
    import torch

    from trillm.engine import GenerationRequest, SamplingParams
    from trillm.engine.scheduler import ScheduledChunk
    from trillm.engine.sequence import Sequence

    seq = Sequence.create(GenerationRequest("ppl", ids, SamplingParams(max_tokens=1)), lambda output: None)
    seq.block_table = list(range(-(-len(ids) // engine.limits.block_size)))
    nll, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(ids) - 1, chunk):
            end = min(start + chunk, len(ids) - 1)
            input_ids, positions, meta, _ = engine.runner.prepare([ScheduledChunk(seq, start, end - start)])
            hidden = engine.model.forward(input_ids, positions, meta, engine.kv_cache)[:end - start]
            log_probs = torch.log_softmax(engine.model.logits(hidden), -1)
            targets = torch.tensor(ids[start + 1:end + 1])
            nll -= log_probs.gather(1, targets[:, None]).sum().item()
            count += end - start
    return math.exp(nll / count)


def greedy(engine, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    import threading

    from trillm.engine import GenerationRequest, SamplingParams

    results: dict[str, list[int]] = {}
    done = threading.Semaphore(0)

    def on_output(output) -> None:
        results.setdefault(output.request_id, []).extend(output.token_ids)
        if output.finished:
            done.release()

    for i, prompt in enumerate(prompts):
        engine.submit(GenerationRequest(f"g{i}", prompt, SamplingParams(max_tokens=tokens)), on_output)
    for _ in prompts:
        if not done.acquire(timeout=3600):
            raise TimeoutError("greedy generation did not finish")
    return [results[f"g{i}"] for i in range(len(prompts))]


def agreement(got: list[list[int]], reference: list[list[int]]) -> dict:
    def shared(a: list[int], b: list[int]) -> int:
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

    return {"identical": sum(a == b for a, b in zip(got, reference)) / len(reference),
            "tokens_before_first_difference": sum(shared(a, b) / len(b) for a, b in zip(got, reference))
            / len(reference)}


def run_mode(mode: str, checkpoint: Path, ids: list[int], prompts: list[list[int]], args) -> dict:
    from trillm.engine import EngineConfig, TorchEngine

    dtype, quantization = MODES[mode]
    start = time.perf_counter()
    engine = TorchEngine(EngineConfig(checkpoint_dir=str(checkpoint), dtype=dtype, quantization=quantization,
                                      quant_group_size=args.group_size, max_model_len=len(ids) + 64,
                                      max_num_seqs=len(prompts), enable_prefix_caching=False))
    try:
        load_s = time.perf_counter() - start
        continuations = greedy(engine, prompts, args.tokens)
        ppl = perplexity(engine, ids, args.chunk)
        return {"mode": mode, "dtype": dtype, "quantization": quantization,
                "group_size": args.group_size if quantization == "int4" else None,
                "weight_bytes": engine.model.weight_bytes, "perplexity": ppl, "load_s": load_s,
                "kernel": engine.kernels["linear_kernel"], "continuations": continuations}
    finally:
        engine.shutdown()


def markdown(rows: list[dict], tokens: int, n_prompts: int) -> str:
    lines = ["| mode | weights read per token | perplexity | greedy identical to fp32 | tokens before first difference |",
             "|---|---|---|---|---|"]
    for row in rows:
        label = row["mode"] + (f" (group {row['group_size']})" if row["group_size"] else "")
        lines.append(f"| {label} | {row['weight_bytes'] / 1e6:.0f} MB | {row['perplexity']:.3f} | "
                     f"{100 * row['agreement']['identical']:.0f}% | "
                     f"{100 * row['agreement']['tokens_before_first_difference']:.0f}% |")
    lines.append(f"\n({n_prompts} prompts, {tokens} greedy tokens each.)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--group-size", type=int, default=32, help="int4 group size")
    parser.add_argument("--tokens", type=int, default=32, help="greedy tokens per prompt")
    parser.add_argument("--chunk", type=int, default=128, help="teacher-forced tokens per forward pass")
    parser.add_argument("--json", type=Path, default=None, help=f"default {RESULTS}/quality-<date>.json")
    args = parser.parse_args(argv)
    if "fp32" not in args.modes:
        parser.error("--modes: fp32 is the reference and must be among them")
    from trillm.engine.cpu import cpu_info
    from trillm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.checkpoint)
    ids = tokenizer.encode(TEXT.read_text(encoding="utf-8"), add_special_tokens=False)
    prompts = [tokenizer.encode(p, add_special_tokens=True) for p in PROMPTS]
    print(f"{args.checkpoint.name}: {len(ids)} tokens of {TEXT.name}; CPU {cpu_info().model_name}", flush=True)
    rows = []
    for mode in ["fp32"] + [m for m in args.modes if m != "fp32"]:
        row = run_mode(mode, args.checkpoint, ids, prompts, args)
        row["agreement"] = agreement(row["continuations"], rows[0]["continuations"] if rows else row["continuations"])
        rows.append(row)
        print(f"{mode}: perplexity {row['perplexity']:.3f}, greedy identical {100 * row['agreement']['identical']:.0f}%, "
              f"load {row['load_s']:.0f} s", flush=True)
    table = markdown(rows, args.tokens, len(prompts))
    print("\n" + table)
    result = {"checkpoint": str(args.checkpoint), "text": str(TEXT.relative_to(ROOT)), "text_tokens": len(ids),
              "cpu": cpu_info().as_dict(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "rows": rows, "markdown": table}
    path = args.json or RESULTS / f"quality-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
