"""The embedded default model: a small synthetic Qwen3.5-MoE built on first use and cached.

Commands given no model use it, so a fresh install can chat at once. It has random weights (it
writes noise), but the real Qwen3.5 vocabulary and chat template, so every code path is real.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from .synthetic import generate, get_preset

log = logging.getLogger(__name__)

DEMO_PRESET = "demo"
DEMO_SEED = 0
DEMO_NOTICE = "demo model: random weights (it writes noise); pass a model to chat with a real one"


def cache_dir() -> Path:
    """Where streamer keeps rebuildable files: $STREAMER_CACHE, else the platform's user cache dir."""
    if env := os.environ.get("STREAMER_CACHE"):
        return Path(env)
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "streamer"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "streamer"


def demo_checkpoint(build: bool = True) -> Path:
    """The demo checkpoint's directory, generating it (once, ~0.1 GB) if it is not cached yet."""
    path = cache_dir() / f"demo-{DEMO_PRESET}-seed{DEMO_SEED}"
    if not path.exists() and build:
        log.info("building the demo checkpoint in %s", path)
        path.parent.mkdir(parents=True, exist_ok=True)
        generate(path, get_preset(DEMO_PRESET), dtype="bfloat16", seed=DEMO_SEED)
    return path


def demo_packed() -> Path:
    """The packed demo model, building and repacking it on first use (a few seconds)."""
    from .paths import models_dir
    from .repack import make_plan, run_repack

    dst = models_dir() / f"streamer-demo-seed{DEMO_SEED}"
    if (dst / "manifest.json").is_file():
        return dst
    src = demo_checkpoint()
    log.info("packing the demo model into %s", dst)
    run_repack(make_plan(src, dst))
    return dst
