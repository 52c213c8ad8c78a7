"""The expert-profile file (formats/PROFILE.md): per layer, named per-expert arrays of one model; version 1
holds ``routed``, how many token positions routed to each expert. Built by ``tuning/profile``, read for
``--preload hot`` (``experts/hot_set``).
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from streamer.errors import StreamerError

PROFILE_FILE = "profile.json"


FORMAT = "streamer-expert-profile"


VERSION = 1


ROUTED = "routed"  # the per-expert array of routing counts


REAP = "reap"  # the per-expert REAP saliency: mean over routed tokens of gate weight x ||expert output||


class ProfileError(StreamerError):
    """A profile, a text or a trace cannot be used: missing, malformed, another version or another model."""


@dataclass
class Profile:
    """Per-expert statistics of one model.

    ``arrays[layer][name]`` is a list with one number per expert of ``layer``; ``routed`` always exists.
    """

    model: dict  # {"name", "fingerprint"} of streamer.storage.session.model_identity
    num_experts_per_tok: int
    arrays: dict[int, dict[str, list]]
    tokens: int = 0
    sources: list[dict] = field(default_factory=list)  # {"kind", "name", "bytes", "tokens"}
    created: str = ""

    def counts(self, layer: int) -> list[int]:
        return self.arrays[layer][ROUTED]

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "model": self.model,
            "num_experts_per_tok": self.num_experts_per_tok,
            "tokens": self.tokens,
            "sources": self.sources,
            "created": self.created,
            "layers": [
                {"layer": layer, "num_experts": len(a[ROUTED]), "experts": a}
                for layer, a in sorted(self.arrays.items())
            ],
        }


def empty_profile(identity: dict, num_experts: Sequence[int], top_k: int) -> Profile:
    """A profile with zero counts for a model of ``num_experts[layer]`` experts per layer."""
    model = {"name": identity["name"], "fingerprint": identity["fingerprint"]}
    arrays = {layer: {ROUTED: [0] * n} for layer, n in enumerate(num_experts)}
    return Profile(model, top_k, arrays)


def write_profile(profile: Profile, path: str | os.PathLike) -> Path:
    """Writes ``profile`` atomically (a ``.partial`` file renamed when complete)."""
    path = Path(path)
    profile.created = profile.created or datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"
    )
    tmp = path.with_name(path.name + ".partial")
    try:
        # One line per layer keeps the file readable and diffable without a pretty-printer's bulk.
        data = profile.to_json()
        layers = data.pop("layers")
        head = json.dumps(data, indent=1)[:-2]
        body = ",\n".join("  " + json.dumps(layer) for layer in layers)
        tmp.write_text(f'{head},\n "layers": [\n{body}\n ]\n}}\n')
        tmp.replace(path)
    except OSError as e:
        raise ProfileError(f"{path}: cannot write the profile ({e.strerror or e})") from None
    return path


def read_profile(path: str | os.PathLike) -> Profile:
    """Parses a profile file.

    Raises:
        ProfileError: missing, not JSON, not a profile, a newer version, or inconsistent arrays.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise ProfileError(f"{path}: no such profile") from None
    except OSError as e:
        raise ProfileError(f"{path}: cannot read the profile ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ProfileError(f"{path}: not a profile (not JSON); rewrite it with `streamer profile`") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ProfileError(f'{path}: not a streamer expert profile (no "format": "{FORMAT}")')
    version = data.get("version")
    if not isinstance(version, int) or version < 1:
        raise ProfileError(f"{path}: profile has no valid version ({version!r})")
    if version > VERSION:
        raise ProfileError(
            f"{path}: profile format version {version} is newer than this streamer reads ({VERSION}); "
            "upgrade streamer or rewrite the profile with `streamer profile`"
        )
    try:
        arrays = {}
        for entry in data["layers"]:
            layer, n, named = int(entry["layer"]), int(entry["num_experts"]), dict(entry["experts"])
            if not isinstance(named.get(ROUTED), list):
                raise ValueError(f"layer {layer} has no {ROUTED!r} array")
            for name, values in named.items():
                if not isinstance(values, list) or len(values) != n:
                    raise ValueError(f"layer {layer} {name!r} has not {n} values")
            if any(not isinstance(c, int) or isinstance(c, bool) or c < 0 for c in named[ROUTED]):
                raise ValueError(f"layer {layer} {ROUTED!r} holds a value that is not a count")
            if REAP in named and any(
                not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v < float("inf")
                for v in named[REAP]
            ):
                raise ValueError(f"layer {layer} {REAP!r} holds a value that is not a finite score >= 0")
            arrays[layer] = named
        model = data["model"]
        if not isinstance(model, dict) or not isinstance(model.get("fingerprint"), str):
            raise ValueError("no model fingerprint")
        return Profile(
            model={"name": model.get("name", ""), "fingerprint": model["fingerprint"]},
            num_experts_per_tok=int(data["num_experts_per_tok"]),
            arrays=arrays,
            tokens=int(data.get("tokens", 0)),
            sources=list(data.get("sources", [])),
            created=str(data.get("created", "")),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ProfileError(f"{path}: malformed profile ({e}); rewrite it with `streamer profile`") from None


def check_profile_matches(profile: Profile, identity: dict, num_experts: Sequence[int], source: str) -> None:
    """Raises ProfileError unless ``profile`` was made for the model ``identity`` names."""
    if profile.model["fingerprint"] != identity["fingerprint"]:
        raise ProfileError(
            f"{source} is the profile of model {profile.model.get('name')!r}, not of this one "
            f"({identity['name']!r}); run `streamer profile {identity['name']} --text FILE` for this model"
        )
    shape = [
        len(profile.arrays[layer][ROUTED]) if layer in profile.arrays else 0
        for layer in range(len(num_experts))
    ]
    if shape != list(num_experts) or len(profile.arrays) != len(num_experts):
        raise ProfileError(
            f"{source}: its layers do not match this model's; rewrite it with `streamer profile`"
        )


def default_profile_path(model_dir: str | os.PathLike) -> Path:
    return Path(model_dir) / PROFILE_FILE
