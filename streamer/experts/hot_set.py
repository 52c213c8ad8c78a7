"""The hot set: a model's most-routed experts (from its profile) to fill the cache with before the first
token (``--preload hot``): per slot pool, that pool's capacity of its hottest experts.
"""

from __future__ import annotations

import os
from pathlib import Path

from streamer.experts.policy import Key
from streamer.storage.profile_file import (
    Profile,
    ProfileError,
    check_profile_matches,
    default_profile_path,
    read_profile,
)


def load_profile_for(runtime, model_dir: str | os.PathLike, path: str | os.PathLike | None = None) -> Profile:
    """The profile of the packed model at ``model_dir`` (``path``, else ``profile.json`` in it), checked
    against the model the runtime serves.

    Raises:
        ProfileError: none there (saying how to make one), unreadable, or of another model.
    """
    from streamer.storage.session import model_identity

    where = Path(path) if path else default_profile_path(model_dir)
    if not where.is_file():
        raise ProfileError(
            f"--preload hot needs an expert profile and {where} does not exist; "
            f"run `streamer profile {model_dir} --text FILE` first"
        )
    profile = read_profile(where)
    num_experts = [e.num_experts for e in runtime.packed.manifest.layers]
    check_profile_matches(profile, model_identity(model_dir), num_experts, str(where))
    return profile


def hot_keys(profile: Profile, runtime) -> list[Key]:
    """Per slot pool, its capacity of the pool's most-routed experts; all of them, hottest first.

    Ties go to the lower layer, then the lower expert id (deterministic).
    """
    pools: dict[int, tuple[int, list[int]]] = {}
    for entry in runtime.entries:  # the layers this runtime streams (a pipeline stage: its own)
        pool = runtime.cache.pool(entry.layer)
        pools.setdefault(id(pool), (pool.slots, []))[1].append(entry.layer)
    chosen: list[tuple[int, int, int]] = []
    for slots, layers in pools.values():
        ranked = sorted((-c, layer, e) for layer in layers for e, c in enumerate(profile.counts(layer)))
        chosen.extend(ranked[:slots])
    return [(layer, e) for _, layer, e in sorted(chosen)]
