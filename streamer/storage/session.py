"""Chat sessions on disk: the conversation, its token ids and the model state (KV + DeltaNet), versioned.

A ``.session`` file is::

    offset 0   magic  b"STRMSESS"
    offset 8   u32 LE format version (1)
    offset 12  u32 LE header length N
    offset 16  N bytes of UTF-8 JSON header
    then       the arrays, each compressed alone as an LZ4 frame, at the body offsets the header lists

The header names the model the state belongs to (``model_identity``), the activation dtype, the messages,
the token ids whose state the arrays hold, and for every array its name, dtype, shape, body offset,
compressed and raw sizes and CRC-32. State of a full-attention layer is its keys/values [B, Hkv, L, D];
of a Gated DeltaNet layer its conv state [B, Kc - 1, C] and recurrent state [B, Hv, Dv, Dk].

A session also keeps the DeltaNet state at the last message boundary (the end of the last user message),
so the next turn can start from there exactly as an uninterrupted conversation would. The KV part of that
boundary state is not stored: it is the first ``boundary_tokens`` positions of the stored keys/values.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import lz4.frame
import mlx.core as mx
import numpy as np

from streamer import __version__
from streamer.errors import StreamerError
from streamer.models.layer_cache import DeltaNetSnapshot, KVSnapshot
from streamer.storage.paths import data_dir

MAGIC = b"STRMSESS"
VERSION = 1
SUFFIX = ".session"
_PREFIX = struct.Struct("<8sII")  # magic, version, header length
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
# Stored dtype -> (mlx dtype, numpy dtype of the raw bytes); bfloat16 travels as its uint16 bit pattern.
_DTYPES = {
    "float32": (mx.float32, np.float32),
    "float16": (mx.float16, np.float16),
    "bfloat16": (mx.bfloat16, np.uint16),
}


class SessionError(StreamerError):
    """A session name, file or model mismatch the user can fix."""


@dataclass
class SessionState:
    """Everything ``ChatSession`` needs to continue a conversation exactly where it was saved."""

    model: dict  # model_identity() of the model the state was computed with
    dtype: str  # activation dtype of that run, e.g. "bfloat16"
    messages: list[dict]
    token_ids: list[int]  # the tokens whose state ``caches`` holds
    caches: list  # one KVSnapshot / DeltaNetSnapshot per layer
    boundary_tokens: int | None = None  # token_ids[:boundary_tokens] is the last message boundary
    boundary: list | None = None  # per-layer snapshots at that boundary
    enable_thinking: bool = True


def session_path(name: str) -> Path:
    """``<data dir>/sessions/NAME.session``, for a NAME made of letters, digits, '.', '_' and '-'."""
    if not _NAME.match(name):
        raise SessionError(
            f"bad session name {name!r}: use letters, digits, '.', '_' and '-' (up to 100, not starting "
            "with '.' or '-')"
        )
    return data_dir() / "sessions" / f"{name}{SUFFIX}"


def list_sessions() -> list[str]:
    """Names of the saved sessions, sorted."""
    folder = data_dir() / "sessions"
    return sorted(p.name[: -len(SUFFIX)] for p in folder.glob(f"*{SUFFIX}")) if folder.is_dir() else []


def model_identity(path: str | os.PathLike) -> dict:
    """What a saved state depends on: the model's name and a fingerprint of its weights.

    A packed model is fingerprinted by its manifest (which holds a CRC-32 of every tensor and expert);
    a source checkpoint by its config and each weight file's name, size and last 64 KiB.
    """
    path = Path(path)
    h = hashlib.sha256()
    manifest = path / "manifest.json"
    if manifest.is_file():
        h.update(manifest.read_bytes())
    else:
        h.update((path / "config.json").read_bytes())
        for f in sorted(path.glob("*.safetensors")):
            size = f.stat().st_size
            with open(f, "rb") as fh:
                fh.seek(max(0, size - 65536))
                h.update(f"{f.name}:{size}:".encode() + fh.read())
    return {"name": path.name, "path": str(path.resolve()), "fingerprint": h.hexdigest()}


def check_compatible(state: SessionState, identity: dict, dtype: str, source: str) -> None:
    """Raises SessionError when ``state`` was computed with another model or activation dtype."""
    saved = state.model
    if saved.get("fingerprint") != identity["fingerprint"]:
        raise SessionError(
            f"{source} was saved with model {saved.get('name')!r} ({saved.get('path')}), not with this "
            f"one ({identity['name']!r}): its state means nothing to another model; load it in "
            f"`streamer chat {saved.get('path') or saved.get('name')}`"
        )
    if state.dtype != dtype:
        raise SessionError(
            f"{source} was saved with --dtype {state.dtype}, this run uses {dtype}; "
            f"restart with --dtype {state.dtype}"
        )


def write_session(path: str | os.PathLike, state: SessionState) -> int:
    """Writes ``state`` to ``path`` atomically (a ``.partial`` file renamed when complete); returns bytes."""
    path = Path(path)
    arrays = _state_arrays(state)
    entries, blobs, offset = [], [], 0
    for name, a in arrays.items():
        raw = _to_bytes(a)
        blob = lz4.frame.compress(raw)
        entries.append(
            {
                "name": name,
                "dtype": dtype_name(a.dtype),
                "shape": list(a.shape),
                "offset": offset,
                "compressed_bytes": len(blob),
                "raw_bytes": len(raw),
                "crc32": f"{zlib.crc32(raw):08x}",
            }
        )
        blobs.append(blob)
        offset += len(blob)
    header = {
        "streamer_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": state.model,
        "dtype": state.dtype,
        "enable_thinking": state.enable_thinking,
        "messages": state.messages,
        "token_ids": state.token_ids,
        "boundary_tokens": state.boundary_tokens,
        "layers": [{"kind": _kind(s), "offset": s.offset} for s in state.caches],
        "boundary_offsets": None if state.boundary is None else [s.offset for s in state.boundary],
        "arrays": entries,
    }
    head = json.dumps(header, ensure_ascii=False).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        f.write(_PREFIX.pack(MAGIC, VERSION, len(head)) + head)
        for blob in blobs:
            f.write(blob)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)
    return _PREFIX.size + len(head) + offset


def read_session(path: str | os.PathLike) -> SessionState:
    """Reads and checks a session file (magic, version, bounds, sizes, CRC-32 of every array).

    Raises:
        SessionError: missing, not a session, another version, truncated or corrupt, naming the file.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SessionError(
            f"{path}: no such session (saved sessions: {', '.join(list_sessions()) or 'none'})"
        ) from None
    if len(data) < _PREFIX.size or data[:8] != MAGIC:
        raise SessionError(f"{path}: not a streamer session file")
    _, version, head_len = _PREFIX.unpack_from(data)
    if version != VERSION:
        raise SessionError(
            f"{path}: session format version {version}; this streamer ({__version__}) reads version {VERSION}"
        )
    body_start = _PREFIX.size + head_len
    try:
        header = json.loads(data[_PREFIX.size : body_start].decode())
        arrays = {e["name"]: _read_array(data, body_start, e, path) for e in header["arrays"]}
        return _state_from(header, arrays)
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise SessionError(f"{path}: corrupt session header ({e!r}); save the session again") from None


def _read_array(data: bytes, body_start: int, e: dict, path: Path) -> mx.array:
    start, size = body_start + int(e["offset"]), int(e["compressed_bytes"])
    if start + size > len(data):
        raise SessionError(
            f"{path}: truncated: array {e['name']} ends at byte {start + size}, the file has {len(data)}"
        )
    mx_dtype, np_dtype = _DTYPES[e["dtype"]]
    try:
        raw = lz4.frame.decompress(data[start : start + size])
    except RuntimeError as err:
        raise SessionError(f"{path}: array {e['name']} does not decompress ({err})") from None
    expected = int(np.prod(e["shape"], dtype=np.int64)) * np.dtype(np_dtype).itemsize
    if len(raw) != int(e["raw_bytes"]) or len(raw) != expected:
        raise SessionError(f"{path}: array {e['name']} has {len(raw)} bytes, expected {expected}")
    if f"{zlib.crc32(raw):08x}" != e["crc32"]:
        raise SessionError(f"{path}: array {e['name']} fails its CRC-32 check (the file is corrupt)")
    a = mx.array(np.frombuffer(raw, dtype=np_dtype).reshape(e["shape"]))
    return mx.view(a, mx_dtype) if np_dtype is np.uint16 else a


def _state_arrays(state: SessionState) -> dict[str, mx.array]:
    out = {}
    for i, s in enumerate(state.caches):
        fields = ("keys", "values") if isinstance(s, KVSnapshot) else ("conv_state", "recurrent_state")
        out.update({f"cache.{i}.{f}": getattr(s, f) for f in fields if getattr(s, f) is not None})
    for i, s in enumerate(state.boundary or []):
        if isinstance(s, DeltaNetSnapshot):
            fields = ("conv_state", "recurrent_state")
            out.update({f"boundary.{i}.{f}": getattr(s, f) for f in fields if getattr(s, f) is not None})
        else:
            assert s.offset == state.boundary_tokens, "a boundary KV snapshot must end at the boundary"
    mx.eval(list(out.values()))
    return out


def _state_from(header: dict, arrays: dict[str, mx.array]) -> SessionState:
    caches = []
    for i, layer in enumerate(header["layers"]):
        if layer["kind"] == "kv":
            keys, values = arrays.get(f"cache.{i}.keys"), arrays.get(f"cache.{i}.values")
            caches.append(KVSnapshot(keys, values, layer["offset"]))
        else:
            conv, rec = arrays.get(f"cache.{i}.conv_state"), arrays.get(f"cache.{i}.recurrent_state")
            caches.append(DeltaNetSnapshot(conv, rec, layer["offset"]))
    boundary, n = None, header["boundary_tokens"]
    if header["boundary_offsets"] is not None:
        boundary = []
        for i, (s, offset) in enumerate(zip(caches, header["boundary_offsets"], strict=True)):
            if isinstance(s, KVSnapshot):
                cut = None if s.keys is None or not n else (s.keys[..., :n, :], s.values[..., :n, :])
                boundary.append(KVSnapshot(*(cut or (None, None)), offset))
            else:
                conv, rec = (
                    arrays.get(f"boundary.{i}.conv_state"),
                    arrays.get(f"boundary.{i}.recurrent_state"),
                )
                boundary.append(DeltaNetSnapshot(conv, rec, offset))
    return SessionState(
        model=header["model"],
        dtype=header["dtype"],
        messages=header["messages"],
        token_ids=[int(t) for t in header["token_ids"]],
        caches=caches,
        boundary_tokens=n,
        boundary=boundary,
        enable_thinking=bool(header["enable_thinking"]),
    )


def _kind(s) -> str:
    return "kv" if isinstance(s, KVSnapshot) else "deltanet"


def dtype_name(dtype: mx.Dtype) -> str:
    for name, (d, _) in _DTYPES.items():
        if d == dtype:
            return name
    raise SessionError(f"cannot save state of dtype {dtype} (supported: {', '.join(_DTYPES)})")


def _to_bytes(a: mx.array) -> bytes:
    if a.dtype == mx.bfloat16:
        a = mx.view(a, mx.uint16)
    return np.ascontiguousarray(np.array(a)).tobytes()
