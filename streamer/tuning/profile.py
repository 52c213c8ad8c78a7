"""Expert profiles: how often each routed expert of a model is chosen, for ``--preload hot``.

A profile is one JSON file (``profile.json`` in the packed model by default; the format is
formats/PROFILE.md) holding, per layer, named per-expert arrays; version 1 has ``routed``: how many
token positions routed to each expert. It is built by running the model teacher-forced over text
(``profile_texts``: chunked prefill, a fresh context every ``window`` tokens so memory stays bounded) or
from recorded routing traces (``profile_traces``), and names the model it belongs to (the fingerprint of
``model_identity``), so a profile of one model is never applied to another.

``hot_keys`` turns a profile into what ``ExpertRuntime.preload_keys`` fills: per slot pool, that pool's
capacity of its most-routed experts, hottest first.

Names: E = experts of a layer, K = experts per token.
"""

from __future__ import annotations

import codecs
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from streamer.storage.profile_file import ROUTED, Profile, ProfileError, empty_profile
from streamer.tuning.cache_sim import trace_records
from streamer.tuning.saliency import Saliency

WINDOW = 2048  # tokens per context when profiling text: each window starts from an empty cache
_READ_BYTES = 1 << 20  # text is read, decoded and tokenized in pieces of about this size

Key = tuple[int, int]  # (layer, expert)
Progress = Callable[[int, int], None]


# ----------------------------------------------------------------------------------------------------
# Counting


class Counter:
    """An ``on_route`` hook: adds every token's K chosen experts to per-layer counts."""

    def __init__(self, num_experts: Sequence[int]):
        self.counts = [np.zeros(n, dtype=np.int64) for n in num_experts]
        self.tokens = 0  # token positions seen at the first layer

    def __call__(self, layer: int, ids) -> None:
        ids = np.asarray(ids)
        if layer == 0:
            self.tokens += ids.shape[0]
        self.counts[layer] += np.bincount(ids.reshape(-1), minlength=len(self.counts[layer]))

    def add_to(self, profile: Profile) -> None:
        for layer, c in enumerate(self.counts):
            routed = profile.arrays[layer][ROUTED]
            profile.arrays[layer][ROUTED] = [int(a) + int(b) for a, b in zip(routed, c, strict=True)]
        profile.tokens += self.tokens


def text_pieces(path: Path) -> Iterator[tuple[str, int]]:
    """(text, bytes consumed) pieces of a UTF-8 file of about ``_READ_BYTES``, split after a newline.

    Raises:
        ProfileError: the file is missing or unreadable, or not UTF-8.
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, carry = 0, ""
    try:
        with open(path, "rb") as f:
            while True:
                raw = f.read(_READ_BYTES)
                try:
                    text = carry + decoder.decode(raw, final=not raw)
                except UnicodeDecodeError as e:
                    raise ProfileError(
                        f"{path}: not UTF-8 text (byte {offset + e.start}); give a UTF-8 text file"
                    ) from None
                offset += len(raw)
                if not raw:
                    if text:
                        yield text, len(raw)
                    return
                cut = text.rfind("\n") + 1
                carry = text[cut:] if cut else text
                if cut:
                    yield text[:cut], len(raw)
                else:
                    yield "", len(raw)
    except FileNotFoundError:
        raise ProfileError(f"{path}: no such text file") from None
    except IsADirectoryError:
        raise ProfileError(f"{path}: a directory, not a text file") from None
    except OSError as e:
        raise ProfileError(f"{path}: cannot read ({e.strerror or e})") from None


def profile_texts(
    engine,
    paths: Sequence[str | os.PathLike],
    max_tokens: int | None = None,
    window: int = WINDOW,
    chunk: int | None = None,
    progress: Progress | None = None,
    on_route: Callable | None = None,
    reap: bool = False,
    resume: Profile | None = None,
    after_file: Callable[[Profile], None] | None = None,
) -> Profile:
    """Runs ``engine`` teacher-forced over each text and counts every routing decision.

    Each file starts a fresh context, and so does every ``window`` tokens of it (the KV cache never holds
    more). ``max_tokens`` caps the tokens of all texts together. ``progress(bytes done, bytes total)``
    is called after each chunk; ``on_route`` (e.g. a RouteTrace) sees the same routing as the counts.
    ``reap`` also measures each expert's REAP saliency (``tuning.saliency``) into ``reap`` arrays.
    ``resume``: a profile of the first files of ``paths`` (as ``after_file`` got it after each file):
    those files are skipped and counting goes on from it.

    Raises:
        ProfileError: a text is missing, unreadable, not UTF-8 or has no tokens; or no runtime.
    """
    from streamer.generation.generate import PREFILL_CHUNK, prefill
    from streamer.storage.session import model_identity

    runtime = engine.runtime
    if runtime is None:
        raise ProfileError("profiling needs a packed model (a --resident run has no expert routing to count)")
    paths = [Path(p) for p in paths]
    for p in paths:
        if not p.is_file():
            raise ProfileError(f"{p}: no such text file")
    chunk = chunk or PREFILL_CHUNK
    num_experts = [e.num_experts for e in runtime.packed.manifest.layers]
    top_k = engine.args.num_experts_per_tok
    profile = resume or empty_profile(model_identity(engine.path), num_experts, top_k)
    sizes = [p.stat().st_size for p in paths]
    vocab = engine.args.vocab_size
    total, left, previous = sum(sizes), max_tokens, runtime.on_route
    skip = _resumed_files(profile, paths, sizes, reap) if resume is not None else 0
    if left is not None:
        left -= sum(s["tokens"] for s in profile.sources)
    for i, path in enumerate(paths):
        if i < skip:
            continue
        if left is not None and left <= 0:
            break
        counter = Counter(num_experts)
        saliency = Saliency(num_experts) if reap else None
        if saliency:
            saliency.install(engine.model)
        runtime.on_route = _both(counter, on_route)
        run = _Windows(engine, window, lambda ids, cache: prefill(engine.model, ids, cache, chunk=chunk))
        done, pending = sum(sizes[:i]), []
        try:
            for text, consumed in text_pieces(path):
                ids = engine.tokenizer.encode(text) if text else []
                if ids and max(ids) >= vocab:
                    raise ProfileError(
                        f"{path}: the model's tokenizer gives token id {max(ids)}, beyond its vocabulary "
                        f"of {vocab} (a synthetic model without a matching tokenizer); profile with --trace"
                    )
                pending.extend(ids)
                # Whole chunks run as they fill; the tail waits for more text (or the end of the file).
                while len(pending) >= chunk and (left is None or run.tokens < left):
                    n = chunk if left is None else min(chunk, left - run.tokens)
                    run(pending[:n])
                    del pending[:n]
                done += consumed
                if progress:
                    progress(done, total)
                if left is not None and run.tokens >= left:
                    break
            tail = pending if left is None else pending[: max(0, left - run.tokens)]
            for start in range(0, len(tail), chunk):
                run(tail[start : start + chunk])
        finally:
            runtime.on_route = previous
            if saliency:
                Saliency.remove(engine.model)
        if run.tokens == 0:
            raise ProfileError(f"{path}: the text is empty (no tokens to profile)")
        if saliency:
            saliency.add_to(profile)  # before the counts: REAP means are weighted by the counts so far
        counter.add_to(profile)
        source = {"kind": "text", "name": path.name, "bytes": sizes[i], "tokens": run.tokens}
        profile.sources.append({**source, "reap": True} if reap else source)
        if progress:
            progress(sum(sizes[: i + 1]), total)
        if left is not None:
            left -= run.tokens
        if after_file:
            after_file(profile)
    return profile


def _resumed_files(profile: Profile, paths: Sequence[Path], sizes: Sequence[int], reap: bool) -> int:
    """How many leading files of ``paths`` the partial ``profile`` already holds (checked by name, size
    and mode).

    Raises:
        ProfileError: the partial profile was made from other files or without/with --reap.
    """
    done = profile.sources
    mine = [
        {"kind": "text", "name": p.name, "bytes": n, "reap": reap} for p, n in zip(paths, sizes, strict=True)
    ]
    ok = len(done) <= len(paths) and all(
        {k: s.get(k, False) for k in ("kind", "name", "bytes", "reap")} == m
        for s, m in zip(done, mine, strict=False)
    )
    if not ok:
        raise ProfileError(
            "the interrupted profile was made from other texts or options; delete its .progress file "
            "to start over"
        )
    return len(done)


class _Windows:
    """Runs token pieces through the model in contexts of at most ``window`` tokens (a fresh cache each)."""

    def __init__(self, engine, window: int, prefill: Callable):
        self._engine, self._window, self._prefill = engine, window, prefill
        self._cache, self._filled, self.tokens = None, 0, 0

    def __call__(self, ids: list[int]) -> None:
        if self._cache is None or self._filled + len(ids) > self._window:
            self._cache, self._filled = self._engine.model.make_cache(), 0
        self._prefill(ids, self._cache)
        self._filled += len(ids)
        self.tokens += len(ids)


def _both(first: Callable, second: Callable | None) -> Callable:
    if second is None:
        return first

    def hook(layer, ids):
        first(layer, ids)
        second(layer, ids)

    return hook


def profile_traces(
    paths: Sequence[str | os.PathLike], identity: dict, num_experts: Sequence[int], top_k: int
) -> Profile:
    """Counts the routing recorded in trace files (``streamer generate/bench --trace``) without running
    the model. A trace does not name its model: its layers, expert ids and K are checked against it.

    Raises:
        ProfileError: a trace is missing, empty, malformed, or routes outside this model's shape.
    """
    profile = empty_profile(identity, num_experts, top_k)
    for path in map(Path, paths):
        counter = Counter(num_experts)
        for n, layer, rows in trace_records(path):
            ids = np.asarray(rows) if len({len(r) for r in rows}) == 1 else None
            if ids is None:
                raise ProfileError(f"{path} line {n}: tokens route to different numbers of experts")
            if layer >= len(num_experts):
                raise ProfileError(
                    f"{path} line {n}: layer {layer}, but this model has {len(num_experts)} layers; "
                    "the trace was recorded with another model"
                )
            if ids.shape[1] != top_k or ids.max() >= num_experts[layer]:
                raise ProfileError(
                    f"{path} line {n}: routes to {ids.shape[1]} of expert ids up to {int(ids.max())}, but "
                    f"this model routes to {top_k} of {num_experts[layer]} experts in layer {layer}; "
                    "the trace was recorded with another model"
                )
            counter(layer, ids)
        if counter.tokens == 0:
            raise ProfileError(f"{path}: the trace has no routing of layer 0 (not a whole-model trace)")
        counter.add_to(profile)
        profile.sources.append(
            {"kind": "trace", "name": path.name, "bytes": path.stat().st_size, "tokens": counter.tokens}
        )
    return profile
