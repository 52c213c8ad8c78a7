"""Where models live: the user's streamer data dir, hub-id resolution, and packed-model lookup.

A model argument is either a directory or a Hugging Face hub id (``org/name``). Sources resolve to a
local checkpoint (a directory, or the hub's local cache, offline); packed models live under
``<data dir>/models/<org>--<name>`` so ``streamer repack ID`` then ``streamer chat ID`` just works.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from streamer.errors import CheckpointError, PackedFormatError
from streamer.storage.packed_format import MANIFEST_FILE, PROGRESS_FILE

# org/name as the hub spells repo ids: no leading dot or slash, exactly one slash.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def data_dir() -> Path:
    """The streamer data directory: $STREAMER_HOME, else the platform's per-user data location."""
    if os.environ.get("STREAMER_HOME"):
        return Path(os.environ["STREAMER_HOME"]).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "streamer"
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share") / "streamer"


def models_dir() -> Path:
    return data_dir() / "models"


def looks_like_hub_id(arg: str) -> bool:
    """True when ``arg`` is spelled like a hub id (``org/name``), whether or not such a path exists."""
    return bool(_HUB_ID.match(arg))


def is_hub_id(arg: str) -> bool:
    """True when ``arg`` reads as ``org/name`` and is not an existing local path."""
    return bool(_HUB_ID.match(arg)) and not Path(arg).exists()


def model_dir_name(model_id: str) -> str:
    """The folder name of a model id under models_dir(): ``org/name`` -> ``org--name``."""
    return model_id.replace("/", "--")


def model_id_from_dir_name(name: str) -> str:
    return name.replace("--", "/", 1) if "--" in name else name


def resolve_source(arg: str | os.PathLike) -> tuple[Path, str]:
    """Finds a source checkpoint on this machine, never downloading.

    Args:
        arg: a checkpoint directory, or a hub id already in the local Hugging Face cache.

    Returns:
        (checkpoint directory, a display name: the hub id or the directory's name).

    Raises:
        CheckpointError: when the path does not exist or the id is not in the local cache.
    """
    arg = str(arg)
    path = Path(arg).expanduser()
    if path.exists():
        return path, path.resolve().name
    if not _HUB_ID.match(arg):
        raise CheckpointError(f"{arg}: no such directory (and not a Hugging Face id like org/name)")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - tokenizers depends on huggingface_hub
        raise CheckpointError(
            f"{arg}: resolving hub ids needs huggingface_hub (pip install huggingface_hub), "
            "or pass the checkpoint directory instead"
        ) from None
    try:
        return Path(snapshot_download(arg, local_files_only=True)), arg
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"{arg} is not in the local Hugging Face cache and streamer does not download: get it with "
            f'"hf download {arg}" (or "huggingface-cli download {arg}"), or pass a checkpoint directory'
        ) from None


def default_packed_dir(arg: str | os.PathLike) -> Path:
    """Where ``streamer repack ARG`` writes by default: a hub id maps to ``org--name``, a dir to its name."""
    arg = str(arg)
    path = Path(arg).expanduser()
    if path.exists():
        return models_dir() / path.resolve().name
    return models_dir() / model_dir_name(arg)


def resolve_packed_model(arg: str | os.PathLike) -> Path:
    """The packed model directory that ``arg`` names, for every command that runs a model.

    Args:
        arg: a packed directory; a hub id packed into the data dir; or a source checkpoint directory
            that was packed to its default place.

    Returns:
        A directory holding a complete packed model (its manifest exists; ``packed.open_packed``
        checks the rest).

    Raises:
        PackedFormatError: when nothing packed is found, or a repack was interrupted, with the
            command that fixes it.
    """
    arg = str(arg)
    path = Path(arg).expanduser()
    candidates = [path] if path.exists() else []
    candidates.append(default_packed_dir(arg))
    for cand in candidates:
        if (cand / MANIFEST_FILE).is_file():
            return cand
        if (cand / PROGRESS_FILE).is_file() and cand == path:  # the unfinished output directory itself
            raise PackedFormatError(
                f"{cand}: a repack into it was interrupted and is incomplete; run "
                f'"streamer repack SRC {cand}" again (SRC: {_journal_source(cand)}) to resume it'
            )
        if (cand / PROGRESS_FILE).is_file():
            raise PackedFormatError(
                f"{cand}: the repack of {arg} was interrupted and is incomplete; "
                f'run "streamer repack {arg}" again to resume it'
            )
    if path.exists() and path.is_dir() and not (path / "config.json").is_file():
        raise PackedFormatError(f"{path}: not a packed model (no {MANIFEST_FILE})")
    if path.exists() and not path.is_dir():
        raise PackedFormatError(f"{path}: not a directory (expected a packed model directory or a hub id)")
    if not path.exists() and not _HUB_ID.match(arg):
        raise PackedFormatError(f"{arg}: no such directory (and not a Hugging Face id like org/name)")
    raise PackedFormatError(f'{arg} is not packed yet: run "streamer repack {arg}" first')


def _journal_source(path: Path) -> str:
    """The source an unfinished repack was packing, as its journal names it."""
    import json

    try:
        name = json.loads((path / PROGRESS_FILE).read_bytes())["source"]["name"]
    except (OSError, ValueError, KeyError, TypeError):
        return "the checkpoint it was packing"
    return f"the {name!r} checkpoint"


def list_packed_dirs() -> list[Path]:
    """Directories under models_dir() holding a packed model or an interrupted repack, sorted by name."""
    root = models_dir()
    if not root.is_dir():
        return []
    return sorted(
        d
        for d in root.iterdir()
        if d.is_dir() and ((d / MANIFEST_FILE).is_file() or (d / PROGRESS_FILE).is_file())
    )
