"""`streamer prune`: a packed model with only some experts of each layer, written like `repack` writes.

The pruned copy keeps, per layer, the chosen experts' blocks byte for byte (in ascending id order) and
the matching rows of that layer's router (``mlp.gate`` weight, and its scales and biases when
quantized), and says ``num_experts`` = kept in config.json: the way REAP-pruned checkpoints are made
(arXiv 2510.13999; the model keeps one expert count for every layer). Everything else is copied as is.

The run reuses repack's machinery (``repack_destination``): the same progress journal, lock, free-space
check, inspection of what DST holds (a complete copy is re-verified, a damaged one repaired, an
interrupted one resumed) and per-step verification (``verify``): each layer is re-read and checked
against the *source's* CRC-32 of each kept expert before it is renamed into place, so a pruned expert is
the source's expert, bit for bit. The manifest (written last) carries a ``pruned`` record.

``export_checkpoint`` writes any packed model back in the mlx-community layout (stacked expert tensors,
sharded safetensors with an index), so mlx-lm loads a pruned model.

Names: E = experts of a source layer, N = experts kept, B = block bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from streamer.errors import ConfigError
from streamer.storage.files import CHUNK_BYTES, crc32_file, fsync_dir, read_into, write_all, write_atomic
from streamer.storage.packed import PackedModel
from streamer.storage.packed_format import (
    EXPERTS_DIR,
    FORMAT_VERSION,
    MANIFEST_FILE,
    PROGRESS_FILE,
    RESIDENT_FILE,
    LayerEntry,
    Manifest,
    pack_layer_header,
)
from streamer.storage.repack import RepackResult, _leftovers, _remove_leftovers
from streamer.storage.repack_destination import (
    Journal,
    _check_space,
    _drop_incomplete,
    _locked,
    inspect_destination,
    recheck_complete,
)
from streamer.storage.repack_plan import DestinationError, _resident_header
from streamer.storage.safetensors_file import TensorInfo
from streamer.storage.verify import verify_layer_file, verify_resident_file

CONFIG_FILE = "config.json"


_ROUTER = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp\.gate\.(?:weight|scales|biases)$")


ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class PrunePlan:
    """What prune will write; duck-types the parts of ``RepackPlan`` that ``repack_destination`` reads."""

    model: PackedModel  # the unpruned source
    dst: Path
    kept: tuple[tuple[int, ...], ...]  # per layer, the source ids of the experts kept, ascending
    config: bytes  # the pruned config.json
    record: dict  # the manifest's ``pruned`` record
    resident: tuple[TensorInfo, ...]  # the pruned shapes; path/offset point into the source file
    resident_header: bytes
    layers: tuple[LayerEntry, ...]  # without checksums

    @property
    def resident_bytes(self) -> int:
        return len(self.resident_header) + sum(t.nbytes for t in self.resident)

    @property
    def expert_bytes(self) -> int:
        return sum(e.file_bytes for e in self.layers)

    @property
    def total_bytes(self) -> int:
        return self.resident_bytes + self.expert_bytes

    @property
    def files_bytes(self) -> int:
        return sum(m["bytes"] for m in self.model.manifest.files.values())

    def source_record(self) -> dict:
        src = self.model.manifest.source
        choice = json.dumps([src.get("fingerprint"), self.kept]).encode()
        return {
            "name": f"{src.get('name')} pruned ({self.record['method']}, {self.record['experts']} experts)",
            "config_sha256": hashlib.sha256(self.config).hexdigest(),
            "fingerprint": hashlib.sha256(choice).hexdigest(),
        }

    def plan_sha256(self) -> str:
        layers = [
            [e.layer, e.num_experts, e.block_bytes, [c.to_json() for c in e.components]] for e in self.layers
        ]
        doc = json.dumps([FORMAT_VERSION, self.resident_header.hex(), layers, self.kept], sort_keys=True)
        return hashlib.sha256(doc.encode()).hexdigest()


def make_prune_plan(
    model: PackedModel, dst: str | os.PathLike, kept: Sequence[Sequence[int]], record: dict
) -> PrunePlan:
    """Lays out the pruned copy of ``model`` keeping ``kept[layer]`` (source expert ids) in each layer.

    ``record``: what the manifest's ``pruned`` record says besides the counts (method, profile, ...).

    Raises:
        ConfigError: a layer count or expert id that does not fit the model, or unequal counts per layer
            (the model has one ``num_experts`` for every layer).
    """
    m = model.manifest
    kept = tuple(tuple(sorted({int(e) for e in ids})) for ids in kept)
    if len(kept) != len(m.layers):
        raise ConfigError(f"{len(kept)} layers of experts to keep, the model has {len(m.layers)}")
    if len({len(ids) for ids in kept}) != 1:
        raise ConfigError("keep the same number of experts in every layer (config.json has one num_experts)")
    for entry, ids in zip(m.layers, kept, strict=True):
        if not ids or ids[0] < 0 or ids[-1] >= entry.num_experts:
            raise ConfigError(f"layer {entry.layer}: expert ids to keep must be 0 .. {entry.num_experts - 1}")
    n = len(kept[0])
    config = json.loads((model.path / CONFIG_FILE).read_bytes())
    for section in (config, config.get("text_config") or {}):
        if "num_experts" in section:
            section["num_experts"] = n
    layers = tuple(dataclasses.replace(e, num_experts=n, crc32=()) for e in m.layers)
    resident = []
    for t in sorted(model.resident_tensors().values(), key=lambda t: t.name):
        match = _ROUTER.search(t.name)
        if match:
            E = m.layers[int(match.group(1))].num_experts
            rows = len(kept[int(match.group(1))])
            assert t.shape[0] == E, f"{t.name}: {t.shape[0]} router rows, {E} experts"
            t = dataclasses.replace(t, shape=(rows, *t.shape[1:]), nbytes=t.nbytes // E * rows)
        resident.append(t)
    full = {
        **record,
        "experts": n,
        "source_experts": max(e.num_experts for e in m.layers),
        "source": dict(m.source),
        "kept": [list(ids) for ids in kept],
    }
    return PrunePlan(
        model=model,
        dst=Path(dst).expanduser(),
        kept=kept,
        config=(json.dumps(config, indent=2) + "\n").encode(),
        record=full,
        resident=tuple(resident),
        resident_header=_resident_header(tuple(resident)),
        layers=layers,
    )


def run_prune(
    plan: PrunePlan,
    *,
    progress: ProgressFn | None = None,
    after_layer: Callable[[int], None] | None = None,
) -> RepackResult:
    """Writes (or finishes, or repairs) the pruned model ``plan`` describes; statuses as ``run_repack``.

    Raises:
        DestinationError: DST holds something else (another model or another pruning), or the disk is
            full. Nothing written ever looks complete.
    """
    start = time.monotonic()
    status, journal = inspect_destination(plan)
    expected = status
    if status == "complete":
        journal = recheck_complete(plan)
        if journal is None:
            if _leftovers(plan.dst):
                with _locked(plan.dst):
                    _remove_leftovers(plan.dst)
            return RepackResult(plan.dst, "already packed", 0, time.monotonic() - start)
        status = "repair"
    journal = journal or Journal(plan.source_record(), plan.plan_sha256())
    done = _drop_incomplete(plan, journal)
    _check_space(plan, plan.total_bytes + plan.files_bytes - done)
    plan.dst.mkdir(parents=True, exist_ok=True)
    written = [0]

    def report(n: int) -> None:
        written[0] += n
        if progress:
            progress(done + written[0], plan.total_bytes)

    with _locked(plan.dst):
        if inspect_destination(plan)[0] != expected:
            raise DestinationError(f"{plan.dst} changed while starting; run the command again")
        write_atomic(plan.dst / PROGRESS_FILE, journal.to_bytes())
        if status == "repair":
            (plan.dst / MANIFEST_FILE).unlink()
            fsync_dir(plan.dst)
        _write_steps(plan, journal, report, after_layer)
    outcome = {"resume": "resumed", "repair": "repaired"}.get(status, "packed")
    return RepackResult(plan.dst, outcome, written[0], time.monotonic() - start)


def _write_steps(plan: PrunePlan, journal: Journal, report: Callable[[int], None], after_layer) -> None:
    dst = plan.dst
    (dst / EXPERTS_DIR).mkdir(exist_ok=True)
    if journal.resident_crc32 is None:
        journal.resident_crc32 = _write_resident(plan, report)
        write_atomic(dst / PROGRESS_FILE, journal.to_bytes())
    for entry, ids in zip(plan.layers, plan.kept, strict=True):
        if entry.layer in journal.layers:
            continue
        source = plan.model.manifest.layers[entry.layer]
        entry = dataclasses.replace(entry, crc32=tuple(source.crc32[e] for e in ids))
        _write_layer(
            plan.model.path / source.file, source, dst / (entry.file + ".partial"), entry, ids, report
        )
        verify_layer_file(dst / (entry.file + ".partial"), entry)  # the source's checksums, re-read
        os.replace(dst / (entry.file + ".partial"), dst / entry.file)
        fsync_dir(dst / EXPERTS_DIR)
        journal.layers[entry.layer] = entry.crc32
        write_atomic(dst / PROGRESS_FILE, journal.to_bytes())
        if after_layer:
            after_layer(entry.layer)
    files = _write_files(plan)
    manifest = Manifest(
        model_type=plan.model.manifest.model_type,
        source=journal.source,
        resident_bytes=plan.resident_bytes,
        resident_crc32=journal.resident_crc32,
        layers=tuple(dataclasses.replace(e, crc32=journal.layers[e.layer]) for e in plan.layers),
        files=files,
        pruned=plan.record,
    )
    write_atomic(dst / MANIFEST_FILE, manifest.to_json_bytes())  # the step that makes DST complete
    _remove_leftovers(dst)


def _write_resident(plan: PrunePlan, report: Callable[[int], None]) -> dict[str, int]:
    """resident.safetensors with the kept router rows; returns each tensor's CRC-32."""
    part = plan.dst / (RESIDENT_FILE + ".partial")
    source = plan.model.manifest
    originals = plan.model.resident_tensors()
    crcs, pos = {}, len(plan.resident_header)
    buf = memoryview(bytearray(CHUNK_BYTES))
    src_fd = os.open(plan.model.path / RESIDENT_FILE, os.O_RDONLY)
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_all(fd, memoryview(plan.resident_header), 0)
        for t in plan.resident:
            src = originals[t.name]
            match = _ROUTER.search(t.name)
            if match:  # [E, ...] -> [N, ...]: the kept rows, in the kept (ascending) order
                layer = int(match.group(1))
                row = src.nbytes // source.layers[layer].num_experts
                pieces = [(src.offset + e * row, row) for e in plan.kept[layer]]
            else:
                pieces = [
                    (src.offset + at, min(len(buf), src.nbytes - at)) for at in range(0, src.nbytes, len(buf))
                ]
            crc = 0
            for offset, n in pieces:
                if read_into(src_fd, [buf[:n]], offset) != n:
                    raise DestinationError(
                        f"{plan.model.path / RESIDENT_FILE}: short read (changed while pruning?)"
                    )
                crc = zlib.crc32(buf[:n], crc)
                write_all(fd, buf[:n], pos)
                pos += n
            crcs[t.name] = crc
            if not match and crc != source.resident_crc32[t.name]:
                raise DestinationError(
                    f"{plan.model.path / RESIDENT_FILE}: tensor '{t.name}' does not match its manifest "
                    f"checksum; run `streamer verify {plan.model.path}`"
                )
        os.fsync(fd)
        report(pos)
    finally:
        os.close(fd)
        os.close(src_fd)
    verify_resident_file(part, plan.resident_bytes, crcs)
    os.replace(part, plan.dst / RESIDENT_FILE)
    fsync_dir(plan.dst)
    return crcs


def _write_layer(
    src: Path, source: LayerEntry, part: Path, entry: LayerEntry, ids: Sequence[int], report
) -> None:
    """Header, then the kept experts' blocks copied whole from the source layer file, fsynced."""
    B = entry.block_bytes
    buf = memoryview(bytearray(B))
    src_fd = os.open(src, os.O_RDONLY)
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_all(fd, memoryview(pack_layer_header(entry)), 0)
        for j, e in enumerate(ids):
            if read_into(src_fd, [buf], source.block_offset(e)) != B:
                raise DestinationError(f"{src}: short read at expert {e} (changed while pruning?)")
            write_all(fd, buf, entry.block_offset(j))
        os.fsync(fd)
        report(entry.file_bytes)
    finally:
        os.close(fd)
        os.close(src_fd)


def _write_files(plan: PrunePlan) -> dict[str, dict]:
    """config.json (pruned) and the source's other files (tokenizer, template) copied and checked."""
    out = {}
    for name, meta in sorted(plan.model.manifest.files.items()):
        part = plan.dst / (name + ".partial")
        if name == CONFIG_FILE:
            part.write_bytes(plan.config)
        else:
            shutil.copyfile(plan.model.path / name, part)
            if crc32_file(part) != meta["crc32"]:
                raise DestinationError(f"{plan.model.path / name}: does not match its manifest checksum")
        with open(part, "rb") as f:
            os.fsync(f.fileno())
        out[name] = {"bytes": part.stat().st_size, "crc32": crc32_file(part)}
        os.replace(part, plan.dst / name)
    fsync_dir(plan.dst)
    return out
