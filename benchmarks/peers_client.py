"""The one client of ``make bench-peers``: its workload and the two protocols it speaks.

Every engine gets the same requests from this one asyncio client, in the
benchmark's process (apart from every server): prompts of a fixed token
count whose words are all drawn at random, so no two share a prefix (no
engine's prefix cache can help), greedy, ``max_tokens`` output tokens forced
(the end token is suppressed: ``min_tokens`` on both protocols, and vLLM's
``ignore_eos``), streamed. ``concurrency`` clients each send
``requests_per_client`` requests one after the other.

Per request: TTFT (send to the first piece of text), the gaps between pieces
of text (ITL), end-to-end time and the token counts the server reports.
Two protocols: Triton's gRPC stream to ``ensemble`` (trillm_client's
AsyncClient) and OpenAI's ``/v1/completions`` with server-sent events (vLLM,
trillm's OpenAI server).
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from tokenizers import Tokenizer

from benchmarks.bench_engine import latency_row
from benchmarks.served import RequestStats  # one record per request, as make bench's served rows

REQUEST_TIMEOUT_S = 600.0  # one request; a stalled server fails its requests instead of hanging the run


@dataclass(frozen=True)
class Workload:
    prompt_tokens: int = 110
    output_tokens: int = 128
    requests_per_client: int = 2
    seed: int = 16


class Prompts:
    """Prompts of exactly ``tokens`` tokens of the checkpoint's tokenizer, each one new.

    Words are single tokens of the vocabulary that are a space and 3-9 lower-case
    letters, so a prompt of n words is n tokens (checked, and trimmed when a pair
    of words merges). Prompt ``i`` is the same for every engine.
    """

    def __init__(self, tokenizer_json: Path, tokens: int, seed: int) -> None:
        self.tokenizer = Tokenizer.from_file(str(tokenizer_json))
        words = sorted(t[1:] for t in self.tokenizer.get_vocab() if re.fullmatch("Ġ[a-z]{3,9}", t))
        if len(words) < 1000:
            raise ValueError(f"{tokenizer_json}: only {len(words)} single-token words; the prompts need a byte-level BPE vocabulary")
        self.words, self.tokens, self.seed = words, tokens, seed

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=True).ids)

    def prompt(self, index: int) -> str:
        rng = random.Random(f"{self.seed}:{index}")
        picked = [rng.choice(self.words) for _ in range(self.tokens)]
        text = " ".join(picked).capitalize()
        while self.count(text) > self.tokens:
            picked.pop()
            text = " ".join(picked).capitalize()
        return text


# ---- the two protocols: each sends one streamed request and fills its stats ----------------------

async def stream_triton(client, prompt: str, max_tokens: int) -> RequestStats:  # client: trillm_client.AsyncClient
    stats = RequestStats()
    stream = client.stream(prompt, max_tokens, min_tokens=max_tokens, temperature=0.0)
    async with stream:
        async for _ in stream:
            pass
    done = stream.completion
    stats.ttft, stats.itls, stats.e2e = stream.ttft or 0.0, stream.itl, done.latency
    stats.output_tokens, stats.input_tokens = done.num_output_tokens or 0, done.num_input_tokens or 0
    return stats


async def stream_openai(session: aiohttp.ClientSession, url: str, model: str, prompt: str, max_tokens: int) -> RequestStats:
    stats = RequestStats()
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "min_tokens": max_tokens,
            "ignore_eos": True, "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    last, events = None, 0
    async with session.post(f"{url}/v1/completions", json=body) as response:
        if response.status != 200:
            stats.error = f"HTTP {response.status}: {(await response.text())[:300]}"
            return stats
        async for line in response.content:
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            event = json.loads(data)
            if event.get("error"):
                stats.error = str(event["error"])[:300]
                return stats
            if event.get("usage"):
                stats.output_tokens = event["usage"]["completion_tokens"]
                stats.input_tokens = event["usage"]["prompt_tokens"]
            events += bool(event.get("choices"))
            if any(choice.get("text") for choice in event.get("choices", [])):
                now = time.perf_counter()
                if last is None:
                    stats.ttft = now - started
                else:
                    stats.itls.append(now - last)
                last = now
    stats.e2e = time.perf_counter() - started
    # A server that reports no usage (llama-server without include_usage support) streams one event per token.
    stats.output_tokens = stats.output_tokens or events
    return stats


Send = Callable[[str, int], Awaitable[RequestStats]]


async def run_level(send: Send, prompts: list[str], concurrency: int, max_tokens: int) -> dict:
    """``concurrency`` clients, client k sending its share of ``prompts`` (every concurrency-th from k) one
    after the other; all start together."""
    done: list[RequestStats] = []

    async def one_client(mine: list[str]) -> None:
        for i, prompt in enumerate(mine):
            try:
                stats = await asyncio.wait_for(send(prompt, max_tokens), REQUEST_TIMEOUT_S)
            except Exception as exc:  # a failed request is counted, the run goes on
                stats = RequestStats(error=f"{type(exc).__name__}: {exc}"[:300])
            stats.first_wave = i == 0
            done.append(stats)

    started = time.perf_counter()
    await asyncio.gather(*(one_client(prompts[k::concurrency]) for k in range(concurrency)))
    wall = time.perf_counter() - started
    ok = [s for s in done if s.error is None]
    row = latency_row(concurrency, len(done), len(done) - len(ok), sum(s.output_tokens for s in ok), wall,
                      ttft=[s.ttft for s in ok], itl=[x for s in ok for x in s.itls],
                      steady_ttft=[s.ttft for s in ok if not s.first_wave])
    row["input_tokens"] = sorted({s.input_tokens for s in ok})
    row["output_tokens_per_request"] = sorted({s.output_tokens for s in ok})
    row["first_errors"] = sorted({s.error for s in done if s.error})[:3]
    return row


async def sweep(send: Send, prompts: Prompts, workload: Workload, concurrencies: list[int], warmup: int = 2) -> list[dict]:
    """Warm up (not counted), then each concurrency with its own prompts: the same prompts for every engine."""
    warm = [prompts.prompt(-1 - i) for i in range(warmup)]
    await run_level(send, warm, warmup, 8)
    rows, index = [], 0
    for concurrency in concurrencies:
        count = concurrency * workload.requests_per_client
        level = [prompts.prompt(index + i) for i in range(count)]
        index += count
        row = await run_level(send, level, concurrency, workload.output_tokens)
        print(f"    c={concurrency:<3} {row['output_tok_s']:7.1f} tok/s  TTFT p50 {row['ttft_p50_s']:.2f} s "
              f"p99 {row['ttft_p99_s']:.2f} s  ITL p50 {row['itl_p50_s'] * 1e3:.0f} ms  "
              f"errors {row['errors']}/{row['requests']}", flush=True)
        rows.append(row)
    return rows


def triton_sender(client) -> Send:
    return lambda prompt, max_tokens: stream_triton(client, prompt, max_tokens)


def openai_session() -> aiohttp.ClientSession:
    # No connection cap: every client gets its own connection, as separate users would.
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                 timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S))


def openai_sender(session: aiohttp.ClientSession, url: str, model: str) -> Send:
    return lambda prompt, max_tokens: stream_openai(session, url, model, prompt, max_tokens)
