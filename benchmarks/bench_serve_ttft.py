"""Time to first token with 20 concurrent streaming clients, one request at a time vs batched, in one run.

    python benchmarks/bench_serve_ttft.py                  # the demo model, --max-batch 1 / 8 / 20 (~3 min)

Each configuration is a fresh `streamer serve` (the embedded demo model, default flags but --max-batch):
first a lone streaming request (median of 5) gives the lone time to first token, then 20 clients start
at once, each asking for 24 tokens (EOS ignored) with a different short prompt, streaming. Recorded: TTFT
p50 / p90 over the 20, the wall time of the whole set, and p90 ÷ the lone TTFT (the goal: ≤ 3).
"--max-batch 1" is how serve ran before continuous batching (one request at a time, in arrival order).
Appends to benchmarks/results.tsv.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results, load_note, row  # noqa: E402

WORDS = "fox river stone apple cloud seven quantum purple engine basket violin tiger ocean".split()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ttft(url: str, content: str, tokens: int) -> tuple[float, float]:
    """(seconds to the first content delta, seconds to the end) of one streaming chat request."""
    body = {
        "messages": [{"role": "user", "content": content}],
        "max_tokens": tokens,
        "stream": True,
        "temperature": 0,
        "ignore_eos": True,
    }
    req = urllib.request.Request(
        url + "/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    start, first = time.perf_counter(), None
    with urllib.request.urlopen(req, timeout=600) as resp:
        for line in resp:
            if first is None and line.startswith(b"data: {"):
                delta = json.loads(line[6:])["choices"][0]["delta"]
                if delta.get("content"):
                    first = time.perf_counter() - start
    return (first if first is not None else float("nan")), time.perf_counter() - start


def measure(max_batch: int, clients: int, tokens: int) -> dict:
    port = _free_port()
    cmd = [sys.executable, "-c", "from streamer.cli.main import main; main()", "serve", "--port", str(port)]
    server = subprocess.Popen([*cmd, "--max-batch", str(max_batch)], stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(url + "/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        _ttft(url, "warm up", 4)
        lone = statistics.median(_ttft(url, WORDS[i], tokens)[0] for i in range(5))
        results: dict[int, tuple[float, float]] = {}

        def one(i: int) -> None:
            content = " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(i % 9 + 1))
            results[i] = _ttft(url, content, tokens)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
    finally:
        server.terminate()
        server.wait(30)
    firsts = sorted(f for f, _ in results.values())
    p90 = firsts[min(len(firsts) - 1, int(round(0.9 * (len(firsts) - 1))))]
    return {"lone": lone, "p50": statistics.median(firsts), "p90": p90, "wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1,8,20")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=24)
    args = parser.parse_args()
    note0 = load_note()
    results = {int(b): measure(int(b), args.clients, args.tokens) for b in args.batches.split(",")}
    note = f"demo model, default flags, {args.clients} streaming clients x {args.tokens} tokens; {note0} -> {load_note()}"
    base = results[min(results)]
    rows = []
    for b, r in sorted(results.items()):
        config = f"serve --max-batch {b}" + (" (one request at a time, as before batching)" if b == 1 else "")
        rows.append(
            row(
                config,
                "P7 TTFT p90 s, 20 concurrent clients (ratio: ÷ lone request's TTFT; goal <= 3)",
                r["p90"],
                r["p90"] / r["lone"],
                f"p50 {r['p50']:.3f} s, lone {r['lone']:.3f} s, whole set {r['wall']:.2f} s "
                f"(÷ --max-batch {min(results)}: {r['wall'] / base['wall']:.2f}); {note}",
            )
        )
    append_results(rows)
    for r in rows:
        print("\t".join(r[3:]))


if __name__ == "__main__":
    main()
