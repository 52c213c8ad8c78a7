"""The embedded default model: a small Qwen3.5-MoE trained on Python source, shipped with the package.

Commands given no model use it, so a fresh install can chat at once. It is a real mlx-community
checkpoint (4-bit experts, 8-bit routers, Qwen3.5 special tokens and chat template) of 8 layers with 64
experts top-8, trained by ``tools/train_demo.py`` on the Python standard library's source: it writes
Python-looking code, not answers. It is packed once into the user's models directory.

If the shipped checkpoint is missing (a trimmed install), the random-weight ``demo`` synthetic preset
is built instead, as before the trained model existed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from pathlib import Path

from streamer.synthetic.presets import get_preset
from streamer.synthetic.writer import generate

log = logging.getLogger(__name__)

DEMO_ASSET = Path(__file__).parents[1] / "assets" / "demo"
DEMO_PRESET = "demo"  # the random-weight fallback
DEMO_SEED = 0


def cache_dir() -> Path:
    """Where streamer keeps rebuildable files: $STREAMER_CACHE, else the platform's user cache dir."""
    if env := os.environ.get("STREAMER_CACHE"):
        return Path(env)
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "streamer"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "streamer"


def has_trained_demo() -> bool:
    """True when the trained checkpoint ships with this install."""
    return (DEMO_ASSET / "config.json").is_file() and (DEMO_ASSET / "model.safetensors.index.json").is_file()


# Shown by commands that fall back to the demo model; says which of the two is in use.
DEMO_NOTICE = (
    "demo model: a tiny MoE trained on Python source (it writes code-like text, not answers); "
    "pass a model to chat with a real one"
    if has_trained_demo()
    else "demo model: random weights (it writes noise); pass a model to chat with a real one"
)


def demo_checkpoint(build: bool = True) -> Path:
    """The demo checkpoint's directory: the shipped trained one, else the random fallback (built once)."""
    if has_trained_demo():
        return DEMO_ASSET
    path = cache_dir() / f"demo-{DEMO_PRESET}-seed{DEMO_SEED}"
    if not path.exists() and build:
        log.warning(
            "the trained demo checkpoint is missing from %s; building a random one in %s", DEMO_ASSET, path
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        generate(path, get_preset(DEMO_PRESET), dtype="bfloat16", seed=DEMO_SEED)
    return path


def _fingerprint(ckpt: Path) -> str:
    # Names the packed copy after the checkpoint's bytes, so a new shipped model is repacked.
    h = hashlib.sha256()
    for name in sorted(p.name for p in ckpt.iterdir() if p.is_file()):
        h.update(name.encode())
        h.update((ckpt / name).read_bytes())
    return h.hexdigest()[:12]


def demo_packed() -> Path:
    """The packed demo model, repacking the checkpoint on first use (a second or so)."""
    from streamer.storage.paths import models_dir
    from streamer.storage.repack import run_repack
    from streamer.storage.repack_plan import make_plan

    if has_trained_demo():
        dst = models_dir() / f"streamer-demo-{_fingerprint(DEMO_ASSET)}"
    else:
        dst = models_dir() / f"streamer-demo-random-seed{DEMO_SEED}"
    if (dst / "manifest.json").is_file():
        return dst
    src = demo_checkpoint()
    log.info("packing the demo model into %s", dst)
    run_repack(make_plan(src, dst))
    return dst
