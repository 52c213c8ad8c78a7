"""What bounding one pipeline message costs: a ``threading.Timer`` per message vs the link's watchdog.

Every send and receive between pipeline ranks is bounded by ``--pipeline-timeout``. It used to start a
``threading.Timer`` per message (a thread each time); ``distributed.pipeline.Link`` now arms and disarms one
watchdog thread. A decode step of a 2-rank pipeline bounds 8 messages (4 per rank, a header and the
hidden state each way; 12 when a descriptor blob goes along). This times both ways of bounding a wait that
returns at once, side by side in one process (best of 5 alternated rounds), and appends a row.

    python benchmarks/bench_pipeline_link.py
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results, load_note, row  # noqa: E402

from streamer.distributed.pipeline import _Watchdog  # noqa: E402

MESSAGES = 2000
ROUNDS = 5


def timer_per_message(n: int) -> float:
    """Seconds per message with a Timer started and cancelled around each (the old way)."""
    start = time.perf_counter()
    for _ in range(n):
        timer = threading.Timer(300.0, print, ("timed out",))
        timer.daemon = True
        timer.start()
        timer.cancel()
    return (time.perf_counter() - start) / n


def watchdog(n: int) -> float:
    """Seconds per message with the link's one watchdog armed and disarmed around each."""
    link = SimpleNamespace(timeout_s=300.0, rank=0, on_timeout=print)
    dog = _Watchdog(link)
    start = time.perf_counter()
    for _ in range(n):
        dog.arm(1, "waiting for")
        dog.disarm()
    return (time.perf_counter() - start) / n


def main() -> None:
    best = {"timer": float("inf"), "watchdog": float("inf")}
    for _ in range(ROUNDS):
        best["timer"] = min(best["timer"], timer_per_message(MESSAGES))
        best["watchdog"] = min(best["watchdog"], watchdog(MESSAGES))
    old, new = best["timer"] * 1e6, best["watchdog"] * 1e6
    print(f"bounding one message: Timer per message {old:.1f} us, watchdog {new:.2f} us ({new / old:.4f}x)")
    print(f"per 2-rank decode step (8 messages): {8 * old / 1000:.2f} ms -> {8 * new / 1000:.4f} ms")
    append_results(
        [
            row(
                "pipeline link, one process (no ranks), a wait that returns at once",
                "us to bound one message with the watchdog (ratio: ÷ a Timer per message)",
                new,
                new / old,
                f"Timer per message {old:.1f} us; {MESSAGES} messages, best of {ROUNDS} alternated rounds; "
                f"a 2-rank decode step bounds 8; {load_note()}",
            )
        ]
    )


if __name__ == "__main__":
    main()
