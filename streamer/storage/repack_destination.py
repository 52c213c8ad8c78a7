"""What a repack destination already holds: the progress journal, a finished or damaged copy, free space,
and the lock that keeps two repacks out of one directory.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from streamer.errors import PackedFormatError
from streamer.storage.packed import check_packed_files
from streamer.storage.packed_format import (
    MANIFEST_FILE,
    PROGRESS_FILE,
    RESIDENT_FILE,
    Manifest,
    pack_layer_header,
)
from streamer.storage.repack_plan import DestinationError, RepackPlan
from streamer.storage.verify import bytes_to_check, packed_checks

log = logging.getLogger(__name__)

LOCK_FILE = ".repack.lock"


SPACE_SLACK_BYTES = 64 << 20  # manifest, journal, filesystem overhead


@dataclass
class Journal:
    """``repack-progress.json``: which steps are complete, with their checksums (for the final manifest)."""

    source: dict
    plan_sha256: str
    resident_crc32: dict[str, int] | None = None
    layers: dict[int, tuple[tuple[int, ...], ...]] = dataclasses.field(default_factory=dict)

    def to_bytes(self) -> bytes:
        doc = {
            "source": self.source,
            "plan_sha256": self.plan_sha256,
            "resident_crc32": None
            if self.resident_crc32 is None
            else {k: f"{v:08x}" for k, v in self.resident_crc32.items()},
            "layers": {
                str(i): [" ".join(f"{c:08x}" for c in row) for row in rows] for i, rows in self.layers.items()
            },
        }
        return json.dumps(doc, indent=1).encode()

    @classmethod
    def from_bytes(cls, raw: bytes, path: Path) -> Journal:
        try:
            doc = json.loads(raw)
            res = doc["resident_crc32"]
            return cls(
                source=doc["source"],
                plan_sha256=doc["plan_sha256"],
                resident_crc32=None if res is None else {k: int(v, 16) for k, v in res.items()},
                layers={
                    int(i): tuple(tuple(int(x, 16) for x in row.split()) for row in rows)
                    for i, rows in doc["layers"].items()
                },
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise PackedFormatError(
                f"{path}: unreadable progress journal ({e!r}); delete the directory and re-run"
            ) from None


def _same_source(recorded: dict, plan: RepackPlan) -> bool:
    mine = plan.source_record()
    return all(recorded.get(k) == mine[k] for k in ("config_sha256", "fingerprint"))


def inspect_destination(plan: RepackPlan) -> tuple[str, Journal | None]:
    """What DST holds: ("new", None), ("resume", journal), ("repair", journal) or ("complete", None).

    "repair": DST is this model's packed copy but the open-time checks (sizes, headers) fail; the
    journal holds the steps the manifest records, and those whose files are intact are kept.

    Raises:
        DestinationError: when DST holds another model or something that is not a packed model.
    """
    dst = plan.dst
    if not dst.exists() or (dst.is_dir() and not any(p.name != LOCK_FILE for p in dst.iterdir())):
        return "new", None
    if not dst.is_dir():
        raise DestinationError(f"{dst} exists and is not a directory")
    other = f"{dst} holds a packed copy of another checkpoint ({{}}); choose another destination or delete it"
    if (dst / MANIFEST_FILE).is_file():
        manifest = Manifest.from_json_bytes((dst / MANIFEST_FILE).read_bytes(), dst / MANIFEST_FILE)
        if not _same_source(manifest.source, plan):
            raise DestinationError(other.format(manifest.source.get("name")))
        try:
            check_packed_files(dst, manifest)
        except PackedFormatError as e:
            log.warning("%s is damaged (%s): rewriting what is damaged", dst, e)
            return "repair", _journal_from_manifest(manifest, plan)
        return "complete", None
    if (dst / PROGRESS_FILE).is_file():
        journal = Journal.from_bytes((dst / PROGRESS_FILE).read_bytes(), dst / PROGRESS_FILE)
        if not _same_source(journal.source, plan):
            raise DestinationError(other.format(f"an interrupted repack of {journal.source.get('name')}"))
        if journal.plan_sha256 != plan.plan_sha256():
            log.warning(
                "%s: layout changed since the interrupted run (other streamer version?): starting over", dst
            )
            return "resume", Journal(journal.source, plan.plan_sha256())
        return "resume", journal
    raise DestinationError(f"{dst} exists and is not a streamer packed model; refusing to write into it")


def recheck_complete(plan: RepackPlan, progress=None) -> Journal | None:
    """Re-reads a complete DST as ``streamer verify`` does: None if every checksum matches, else the
    repair journal without the damaged steps (resident file, layers; copied files are always recopied).

    This is what makes "already packed" true for damage only the bytes show (a changed byte inside a
    block). It reads every byte once: measured by benchmarks/bench_verify_reads.py (see
    ``streamer.storage.repack.run_repack`` for the numbers and why the full check is kept).

    Args:
        progress: called with (bytes checked, total bytes).
    """
    dst = plan.dst
    manifest = Manifest.from_json_bytes((dst / MANIFEST_FILE).read_bytes(), dst / MANIFEST_FILE)
    damaged = damaged_parts(dst, manifest, progress)
    return without_damaged(_journal_from_manifest(manifest, plan), damaged) if damaged else None


def damaged_parts(
    dst: Path, manifest: Manifest, progress=None, logger: logging.Logger = log
) -> set[str | int]:
    """Runs every check of the copy ``manifest`` describes (``verify.packed_checks``), warning about each
    damaged part on ``logger``; returns the damaged parts (copied files' names, ``RESIDENT_FILE``, layer
    indices).

    Args:
        progress: called with (bytes checked, total bytes).
    """
    total, checked = bytes_to_check(dst, manifest), 0

    def step(n: int) -> None:
        nonlocal checked
        checked += n
        if progress:
            progress(checked, total)

    damaged = set()
    for part, _, check in packed_checks(dst, manifest, step):
        try:
            check()
        except PackedFormatError as e:
            logger.warning("%s is damaged (%s): rewriting what is damaged", dst, e)
            damaged.add(part)
    return damaged


def without_damaged(journal: Journal, damaged: set[str | int]) -> Journal:
    """``journal`` without the steps that wrote ``damaged`` parts (copied files are always recopied)."""
    if RESIDENT_FILE in damaged:
        journal.resident_crc32 = None
    for part in damaged:
        if isinstance(part, int):
            journal.layers.pop(part, None)
    return journal


def _journal_from_manifest(manifest: Manifest, plan: RepackPlan) -> Journal:
    """The steps a complete manifest records, as a journal (none if the layout is not the plan's)."""
    journal = Journal(manifest.source, plan.plan_sha256())
    layout = tuple(dataclasses.replace(e, crc32=()) for e in manifest.layers)
    if layout != plan.layers or manifest.resident_bytes != plan.resident_bytes:
        log.warning("%s: layout differs from this streamer's (other version?): rewriting all", plan.dst)
        return journal
    journal.resident_crc32 = dict(manifest.resident_crc32)
    journal.layers = {e.layer: e.crc32 for e in manifest.layers}
    return journal


def _drop_incomplete(plan: RepackPlan, journal: Journal) -> int:
    """Forgets steps whose files are gone or altered; returns the bytes of the steps that stay done."""
    dst, done = plan.dst, 0
    if journal.resident_crc32 is not None:
        if _starts_with(dst / RESIDENT_FILE, plan.resident_bytes, plan.resident_header):
            done += plan.resident_bytes
        else:
            journal.resident_crc32 = None
    for i in list(journal.layers):
        entry = plan.layers[i] if i < len(plan.layers) else None
        if entry is not None and _starts_with(dst / entry.file, entry.file_bytes, pack_layer_header(entry)):
            done += entry.file_bytes
        else:
            del journal.layers[i]
    return done


def _starts_with(file: Path, size: int, head: bytes) -> bool:
    if not file.is_file() or file.stat().st_size != size:
        return False
    with open(file, "rb") as f:
        return f.read(len(head)) == head


def _check_space(plan: RepackPlan, needed: int) -> None:
    probe = plan.dst
    while not probe.exists():
        probe = probe.parent
    # .partial files are truncated before being rewritten: their space comes back.
    reclaim = sum(p.stat().st_size for p in plan.dst.rglob("*.partial")) if plan.dst.is_dir() else 0
    free = shutil.disk_usage(probe).free + reclaim
    if free < needed + SPACE_SLACK_BYTES:
        raise DestinationError(
            f"not enough free space for {plan.dst}: need {needed / 1e9:.2f} GB, {free / 1e9:.2f} GB free; "
            "free some space or pass another destination"
        )


@contextmanager
def _locked(dst: Path):
    """Holds an exclusive lock on DST for the run: a second repack into it fails at once."""
    fd = os.open(dst / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DestinationError(f"{dst}: another streamer repack is writing here") from None
    try:
        yield
    finally:
        (dst / LOCK_FILE).unlink(missing_ok=True)
        os.close(fd)
