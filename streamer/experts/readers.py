"""ReaderPool: worker threads that read expert blocks into slot buffers. File I/O only, no MLX.

It decides nothing: *what* to read and *when* is the runtime's (misses) and ``readahead``'s (guesses).

Reads of the same (layer, expert) already in flight are not issued twice: the second request gets
the first one's future. ``mx.eval`` releases the GIL, so reads run while the model computes.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

Key = tuple[int, int]  # (layer, expert)
ReadFn = Callable[[int, int, list], int]  # (layer, expert, buffers) -> bytes read


class ReaderPool:
    """Runs ``read(layer, expert, buffers)`` on ``threads`` workers, one future per (layer, expert)."""

    def __init__(self, read: ReadFn, threads: int):
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        self._read = read
        self._pool = ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix="expert-read", initializer=_ignore_sigint
        )
        self._inflight: dict[Key, Future] = {}
        self._lock = threading.Lock()  # futures complete on worker threads
        self.bytes_read = 0
        self.reads = 0

    def submit(self, layer: int, expert: int, buffers: list) -> Future:
        """Starts reading (layer, expert) into ``buffers`` unless that read is already in flight."""
        key = (layer, expert)
        with self._lock:
            fut = self._inflight.get(key)
            if fut is not None:
                return fut
            fut = self._pool.submit(self._run, key, buffers)
            self._inflight[key] = fut
        # Forget the read only once its result is visible, so a racing submit cannot start a second one.
        fut.add_done_callback(lambda f, key=key: self._forget(key, f))
        return fut

    def _forget(self, key: Key, fut: Future) -> None:
        with self._lock:
            if self._inflight.get(key) is fut:
                del self._inflight[key]

    def inflight(self, layer: int, expert: int) -> Future | None:
        with self._lock:
            return self._inflight.get((layer, expert))

    def _run(self, key: Key, buffers: list) -> int:
        n = self._read(key[0], key[1], buffers)
        with self._lock:
            self.bytes_read += n
            self.reads += 1
        return n

    def close(self, wait: bool = True) -> None:
        """Stops the workers; queued reads are cancelled, running ones finished (waited for if ``wait``)."""
        self._pool.shutdown(wait=wait, cancel_futures=True)

    def __enter__(self) -> ReaderPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _ignore_sigint() -> None:
    # Readers never take Ctrl-C: the kernel then delivers it to the main thread, where it belongs.
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
