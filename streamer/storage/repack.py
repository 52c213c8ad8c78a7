"""`streamer repack`: plan, copy, verify and resume the packed layout (formats/PACKED.md) of a checkpoint.

A run is a sequence of steps — resident tensors, then each expert layer, then small files and the
manifest. Each step writes a ``.partial`` file, re-reads and checks it, renames it, and records itself
in ``repack-progress.json``. Output bytes depend only on the source, so a run resumed after any
interruption (kill -9 included) ends byte-identical to an uninterrupted one.

Data flow: reader threads scatter the next group of experts into a buffer while the main thread
checksums and writes the current one (in cache-sized slices), and a verifier thread re-reads the
previous layer. Memory stays bounded by two ``GROUP_BYTES`` buffers and one small verify buffer
whatever the model size. Bytes pass through user space (not ``copy_file_range``) because every byte is
checksummed on the way.

Names: E = experts in a layer, B = block bytes, n = experts per read group.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import shutil
import time
import zlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from streamer.errors import CheckpointError, PackedFormatError
from streamer.storage.files import crc32_file, fsync_dir, read_into, write_all, write_atomic
from streamer.storage.packed_format import (
    EXPERTS_DIR,
    MANIFEST_FILE,
    PROGRESS_FILE,
    RESIDENT_FILE,
    LayerEntry,
    Manifest,
    pack_layer_header,
)
from streamer.storage.repack_destination import (
    Journal,
    _check_space,
    _drop_incomplete,
    _locked,
    _same_source,
    damaged_parts,
    inspect_destination,
    recheck_complete,
    without_damaged,
)
from streamer.storage.repack_plan import DestinationError, RepackPlan
from streamer.storage.safetensors_file import TensorInfo
from streamer.storage.verify import (
    check_held_files,
    read_any_manifest,
    verify_layer_file,
    verify_resident_file,
)

log = logging.getLogger(__name__)

GROUP_BYTES = 64 << 20  # one read/write group; two are in flight (read ahead while writing)
MAX_GROUP_EXPERTS = 256  # keeps preadv under IOV_MAX
READ_THREADS = 4
SLICE_BYTES = 1 << 20  # checksum-then-write unit: fits in a core's L2 cache

ProgressFn = Callable[[int, int], None]  # (bytes done, total bytes)


# ----------------------------------------------------------------------------------------------------
# The progress journal and what DST already holds.


# ----------------------------------------------------------------------------------------------------
# Copying.


class _Sources:
    """The open source shards, read by a few threads at once: several streams keep the SSD's queue
    full, which one sequential reader does not (benchmarks/bench_repack.py measures it)."""

    def __init__(self, paths) -> None:
        self._fds = {p: os.open(p, os.O_RDONLY) for p in sorted(set(paths))}
        self._pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="repack-read")

    def read(self, t: TensorInfo, start: int, views: list[memoryview]) -> None:
        """Fills ``views`` with ``t``'s bytes from ``start`` (relative to the tensor) on."""
        want = sum(len(v) for v in views)
        if read_into(self._fds[t.path], views, t.offset + start) != want:
            raise CheckpointError(
                f"{t.path}: tensor '{t.name}' ends early (shard truncated or being rewritten?)"
            )

    def read_all(self, tasks: list[tuple[TensorInfo, int, list[memoryview]]]) -> None:
        """Runs ``read(*task)`` for every task concurrently; raises the first failure."""
        for future in [self._pool.submit(self.read, *task) for task in tasks]:
            future.result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)  # no read may outlive its fd
        for fd in self._fds.values():
            os.close(fd)


@dataclass(frozen=True)
class RepackResult:
    dst: Path
    status: str  # "packed", "resumed" or "already packed"
    bytes_written: int
    seconds: float


class _Progress:
    def __init__(self, total: int, done: int, fn: ProgressFn | None):
        self.total, self.done, self.fn = total, done, fn
        self.written = 0

    def __call__(self, n: int) -> None:
        self.done += n
        self.written += n
        if self.fn:
            self.fn(self.done, self.total)


def run_repack(
    plan: RepackPlan,
    *,
    progress: ProgressFn | None = None,
    after_layer: Callable[[int], None] | None = None,
    check_progress: ProgressFn | None = None,
) -> RepackResult:
    """Writes (or finishes writing) the packed model that ``plan`` describes.

    Args:
        plan: from ``make_plan``.
        progress: called with (bytes done, total bytes) as data is written.
        after_layer: called with the layer index once that layer is committed (tests interrupt here).
        check_progress: called with (bytes checked, total bytes) while a complete destination is
            re-checked.

    Returns:
        Where and what was done; a complete destination whose every checksum matches is left
        untouched ("already packed"), a damaged one is repaired in place ("repaired").

    Raises:
        CheckpointError: the source changed or is truncated. DestinationError: DST holds something
            else, or the disk is (or would be) full. Nothing written ever looks complete.
    """
    start = time.monotonic()
    plan = plan_for_destination(plan)
    status, journal = destination_status(plan)
    expected = status  # what the shallow inspection must still say once DST is locked
    if status == "complete":
        # Sizes and headers match, so re-read every byte before saying "already packed": damage
        # inside a block (a flipped bit, an overwritten range) is invisible otherwise. DECISION: a full
        # check, with its own progress bar. Measured (benchmarks/bench_verify_reads.py): 0.27 s per GB
        # with the page cache warm on 2 shared cores (3.7 GB in 0.99 s; CRC-bound at ~4 GB/s), so a
        # 223 GB model takes ~1 min CPU-bound, or its SSD read time (~1 min at 3-4 GB/s) when cold.
        # Repack is an explicit command, and a sampled check would miss a single damaged block.
        journal = _recheck(plan, check_progress)
        if journal is None:
            if _leftovers(plan.dst):  # a run killed after writing the manifest, before cleaning up
                with _locked(plan.dst):
                    _remove_leftovers(plan.dst)
            return RepackResult(plan.dst, "already packed", 0, time.monotonic() - start)
        status = "repair"
    journal = journal or Journal(plan.source_record(), plan.plan_sha256())
    done = _drop_incomplete(plan, journal)
    _check_space(plan, plan.total_bytes + plan.files_bytes - done)  # before creating anything
    plan.dst.mkdir(parents=True, exist_ok=True)
    with _locked(plan.dst):
        if destination_status(plan)[0] != expected:
            raise DestinationError(f"{plan.dst} changed while starting; run the command again")
        write_atomic(plan.dst / PROGRESS_FILE, journal.to_bytes())
        if status in ("repair", "adopt"):  # DST must not look complete until the manifest is rewritten
            (plan.dst / MANIFEST_FILE).unlink()
            fsync_dir(plan.dst)
        report = _Progress(plan.total_bytes, done, progress)
        sources = _Sources(t.path for t in plan.checkpoint.tensors.values())
        try:
            _write_all_steps(plan, journal, sources, report, after_layer)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DestinationError(
                    f"disk full while writing {plan.dst}: "
                    "free some space and run the same command again to resume"
                ) from None
            raise
        finally:
            sources.close()
    outcome = {"resume": "resumed", "adopt": "resumed", "repair": "repaired"}.get(status, "packed")
    return RepackResult(plan.dst, outcome, report.written, time.monotonic() - start)


# ----------------------------------------------------------------------------------------------------
# A pipeline stage's copy (--layers) at DST: repack_destination reads whole copies only.


def _copy_at(dst: Path) -> Manifest | None:
    """DST's manifest, a whole copy's or a stage's, or None when DST has none."""
    return read_any_manifest(dst) if (dst / MANIFEST_FILE).is_file() else None


def _stage_copy(dst: Path) -> Manifest | None:
    """DST's manifest when DST is a pipeline stage's copy, else None."""
    copy = _copy_at(dst)
    return copy if copy is not None and copy.stage is not None else None


def plan_for_destination(plan: RepackPlan) -> RepackPlan:
    """``plan``, or its whole-model plan when it is a stage's and DST holds an intact whole copy (sizes
    and headers): a whole copy serves every stage, and would shrink to one otherwise. (A copy of another
    source is refused by ``destination_status`` either way.)"""
    if plan.stage is None:
        return plan
    copy = _copy_at(plan.dst)
    if copy is None or copy.stage is not None:
        return plan
    try:
        check_held_files(plan.dst, copy)
    except PackedFormatError:
        return plan  # a machine holding some of a whole copy's files: becomes this stage's copy
    return plan.whole()


def destination_status(plan: RepackPlan) -> tuple[str, Journal | None]:
    """``repack_destination.inspect_destination``, knowing stage copies too. A stage's copy at DST is
    "complete" (to be re-checked) when it is the one ``plan`` writes; "adopt" when it is another stage's, or
    ``plan`` is a whole model's and DST a stage's copy, or the reverse: the intact layer files that
    ``plan`` writes are kept, the rest is written.

    Raises:
        DestinationError: DST holds another model, or something that is not a packed model.
    """
    copy = _copy_at(plan.dst)
    if copy is None or (copy.stage is None and plan.stage is None):
        return inspect_destination(plan)
    if not _same_source(copy.source, plan):
        raise DestinationError(
            f"{plan.dst} holds a packed copy of another checkpoint ({copy.source.get('name')}); choose "
            "another destination or delete it"
        )
    if copy.stage != plan.stage:
        return "adopt", _journal_from_copy(copy, plan)
    return "complete", None  # _recheck reads every byte it holds: a missing file is damage too


def _journal_from_copy(copy: Manifest, plan: RepackPlan) -> Journal:
    """What a copy at DST holds that ``plan`` writes: its layers and resident file, which
    ``_drop_incomplete`` keeps only where size and header are the plan's (another stage's resident file
    never is: its header lists other tensors)."""
    journal = Journal(copy.source, plan.plan_sha256())
    held = {e.layer for e in plan.held_layers}
    journal.layers = {e.layer: e.crc32 for e in copy.held_layers if e.layer in held}
    journal.resident_crc32 = dict(copy.resident_crc32)  # kept only if its header is the plan's
    return journal


def _recheck(plan: RepackPlan, progress: ProgressFn | None) -> Journal | None:
    """``recheck_complete`` for a whole or a stage's copy: None if every checksum of what DST holds
    matches, else the journal without the damaged steps."""
    copy = _stage_copy(plan.dst)
    if copy is None:
        return recheck_complete(plan, progress)
    damaged = damaged_parts(plan.dst, copy, progress, log)
    return without_damaged(_journal_from_copy(copy, plan), damaged) if damaged else None


def _write_all_steps(
    plan: RepackPlan, journal: Journal, sources: _Sources, report: _Progress, after_layer
) -> None:
    dst = plan.dst
    (dst / EXPERTS_DIR).mkdir(exist_ok=True)
    if journal.resident_crc32 is None:
        journal.resident_crc32 = _write_resident(plan, sources, report)
        write_atomic(dst / PROGRESS_FILE, journal.to_bytes())

    def commit(entry: LayerEntry, verified: Future) -> None:
        verified.result()  # verified and renamed into place
        journal.layers[entry.layer] = entry.crc32
        write_atomic(dst / PROGRESS_FILE, journal.to_bytes())
        if after_layer:
            after_layer(entry.layer)

    held = {e.layer for e in plan.held_layers}
    # Layer N is verified (re-read, checksummed, renamed) while layer N+1 is copied.
    with ThreadPoolExecutor(1, thread_name_prefix="repack-verify") as verifier:
        pending = None
        for entry, srcs in zip(plan.layers, plan.sources, strict=True):
            if entry.layer in journal.layers or entry.layer not in held:
                continue
            written = _write_layer(dst, entry, srcs, sources, report)
            if pending:
                commit(*pending)
            pending = written, verifier.submit(_verify_and_rename, dst, written)
        if pending:
            commit(*pending)
    files = _copy_files(plan)
    manifest = Manifest(
        model_type=plan.checkpoint.model_type,
        source=journal.source,
        resident_bytes=plan.resident_bytes,
        resident_crc32=journal.resident_crc32,
        # A stage's copy records the layout of every layer, checksums only of those it holds.
        layers=tuple(
            dataclasses.replace(e, crc32=journal.layers[e.layer] if e.layer in held else ())
            for e in plan.layers
        ),
        files=files,
        stage=plan.stage,
    )
    write_atomic(dst / MANIFEST_FILE, manifest.to_json_bytes())  # the step that makes DST complete
    _remove_leftovers(dst)


def _leftovers(dst: Path) -> list[Path]:
    """Files of an unfinished run: the journal, partial files, temporary files of atomic writes."""
    found = [*dst.glob("*.partial"), *dst.glob("*.tmp"), *(dst / EXPERTS_DIR).glob("*.partial")]
    return found + [dst / PROGRESS_FILE] if (dst / PROGRESS_FILE).exists() else found


def _remove_leftovers(dst: Path) -> None:
    for stale in _leftovers(dst):
        stale.unlink()
    fsync_dir(dst)


def _pipeline(groups: list, buf_bytes: int, read: Callable, consume: Callable) -> None:
    """Runs ``read(buf, group)`` for the next group in a thread while ``consume(buf, group)`` handles
    this one: two reusable buffers, so reads overlap checksums and writes with bounded memory."""
    bufs = [memoryview(bytearray(buf_bytes)), memoryview(bytearray(buf_bytes))]
    with ThreadPoolExecutor(1, thread_name_prefix="repack-read") as reader:
        pending = reader.submit(read, bufs[0], groups[0]) if groups else None
        for k, group in enumerate(groups):
            pending.result()
            if k + 1 < len(groups):
                pending = reader.submit(read, bufs[(k + 1) % 2], groups[k + 1])
            consume(bufs[k % 2], group)


def _checksum_and_write(fd: int, buf: memoryview, offset: int, ranges: list, crcs: dict) -> None:
    """Writes ``buf`` at ``offset`` and folds each range ``(start, end, key)`` of it into ``crcs[key]``.

    Walks the buffer in SLICE_BYTES pieces so each byte is checksummed and then written while it is
    still in the CPU cache: measured here, a third of the CPU of whole-group passes. Ranges are sorted
    and disjoint.
    """
    k = 0
    for pos in range(0, len(buf), SLICE_BYTES):
        end = min(pos + SLICE_BYTES, len(buf))
        while k < len(ranges) and ranges[k][0] < end:
            start, stop, key = ranges[k]
            lo, hi = max(start, pos), min(stop, end)
            if lo < hi:
                crcs[key] = zlib.crc32(buf[lo:hi], crcs.get(key, 0))
            if stop > end:
                break  # continues in the next slice
            k += 1
        write_all(fd, buf[pos:end], offset + pos)


def _resident_groups(tensors: tuple[TensorInfo, ...]) -> list[list[tuple[TensorInfo, int, int]]]:
    """Splits the resident tensors into pieces (tensor, start, nbytes) and packs them into groups of at
    most GROUP_BYTES, in file order: small tensors share a group, large ones span several."""
    groups: list[list[tuple[TensorInfo, int, int]]] = [[]]
    room = GROUP_BYTES
    for t in tensors:
        start = 0
        while start < t.nbytes:
            if room == 0:
                groups.append([])
                room = GROUP_BYTES
            n = min(room, t.nbytes - start)
            groups[-1].append((t, start, n))
            start, room = start + n, room - n
    return [g for g in groups if g]


def _write_resident(plan: RepackPlan, sources: _Sources, report: _Progress) -> dict[str, int]:
    """Copies every non-expert tensor into resident.safetensors; returns each tensor's CRC-32."""
    part = plan.dst / (RESIDENT_FILE + ".partial")
    crcs: dict[str, int] = {}
    pos = len(plan.resident_header)

    def read(buf: memoryview, group: list) -> None:
        at, tasks = 0, []
        for t, start, n in group:
            tasks.append((t, start, [buf[at : at + n]]))
            at += n
        sources.read_all(tasks)

    def consume(buf: memoryview, group: list) -> None:
        nonlocal pos
        at, ranges = 0, []
        for t, _, n in group:
            ranges.append((at, at + n, t.name))
            at += n
        _checksum_and_write(fd, buf[:at], pos, ranges, crcs)
        pos += at
        report(at)

    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_all(fd, memoryview(plan.resident_header), 0)
        report(pos)
        groups = _resident_groups(plan.resident)
        _pipeline(groups, max((sum(p[2] for p in g) for g in groups), default=1), read, consume)
        os.fsync(fd)
    finally:
        os.close(fd)
    verify_resident_file(part, plan.resident_bytes, crcs)
    os.replace(part, plan.dst / RESIDENT_FILE)
    fsync_dir(plan.dst)
    return crcs


def _write_layer(
    dst: Path, entry: LayerEntry, srcs: tuple[TensorInfo, ...], sources: _Sources, report: _Progress
) -> LayerEntry:
    """Writes ``<layer file>.partial``: header, then blocks assembled group by group, fsynced.

    Returns:
        The layer entry with the CRC-32s of what was read from the source (for _verify_and_rename).
    """
    B, E, comps = entry.block_bytes, entry.num_experts, entry.components
    per = max(1, min(GROUP_BYTES // B, MAX_GROUP_EXPERTS, E))
    crcs: list[tuple[int, ...]] = []

    def read(buf: memoryview, group: tuple[int, int]) -> None:
        e0, n = group
        # Per component, one preadv scatters n experts' slices straight into their block slots.
        sources.read_all(
            [
                (t, e0 * c.nbytes, [buf[j * B + c.offset : j * B + c.offset + c.nbytes] for j in range(n)])
                for c, t in zip(entry.components, srcs, strict=True)
            ]
        )

    def consume(buf: memoryview, group: tuple[int, int]) -> None:
        e0, n = group
        ranges = [
            (j * B + c.offset, j * B + c.offset + c.nbytes, (j, i))
            for j in range(n)
            for i, c in enumerate(comps)
        ]
        group_crcs: dict = {}
        _checksum_and_write(fd, buf[: n * B], entry.block_offset(e0), ranges, group_crcs)
        crcs.extend(tuple(group_crcs[j, i] for i in range(len(comps))) for j in range(n))
        report(n * B)

    fd = os.open(dst / (entry.file + ".partial"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_all(fd, memoryview(pack_layer_header(entry)), 0)
        report(entry.data_offset)
        # Fresh buffers are zero and only component bytes are ever written: padding stays zero.
        _pipeline([(e0, min(per, E - e0)) for e0 in range(0, E, per)], per * B, read, consume)
        os.fsync(fd)
    finally:
        os.close(fd)
    return dataclasses.replace(entry, crc32=tuple(crcs))


def _verify_and_rename(dst: Path, entry: LayerEntry) -> None:
    """Re-reads the written layer and checks it against the checksums of the source bytes, then
    renames it into place."""
    part = dst / (entry.file + ".partial")
    verify_layer_file(part, entry)
    os.replace(part, dst / entry.file)
    fsync_dir(dst / EXPERTS_DIR)


def _copy_files(plan: RepackPlan) -> dict[str, dict]:
    """Copies config, tokenizer and template files; returns their sizes and CRC-32s."""
    out = {}
    for src in plan.checkpoint.extra_files:
        part = plan.dst / (src.name + ".partial")
        shutil.copyfile(src, part)
        with open(part, "rb") as f:
            os.fsync(f.fileno())
        crc = crc32_file(part)
        if crc != crc32_file(src):
            raise CheckpointError(f"{src}: changed while being copied")
        out[src.name] = {"bytes": part.stat().st_size, "crc32": crc}
        os.replace(part, plan.dst / src.name)
    fsync_dir(plan.dst)
    return out
