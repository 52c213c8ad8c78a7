"""What every benchmark script shares: the results file, machine/commit labels, cache dropping."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path

RESULTS = Path(__file__).parent / "results.tsv"
COLUMNS = ["date", "commit", "machine", "config", "metric", "value", "ratio", "note"]


def commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
        )
        return out.stdout.strip() + ("+" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> str:
    return f"{platform.system()}-{platform.machine()}-{os.cpu_count()}cpu"


def row(config: str, metric: str, value: float, ratio: float | str = "", note: str = "") -> list[str]:
    ratio_text = f"{ratio:.3f}" if isinstance(ratio, float) else str(ratio)
    return [
        datetime.date.today().isoformat(),
        commit(),
        machine(),
        config,
        metric,
        f"{value:.4g}",
        ratio_text,
        note,
    ]


def append_results(rows: list[list[str]]) -> None:
    """Appends rows to benchmarks/results.tsv (writing the header first if the file is new)."""
    new = not RESULTS.exists()
    with open(RESULTS, "a") as f:
        if new:
            f.write("\t".join(COLUMNS) + "\n")
        for r in rows:
            f.write("\t".join(r) + "\n")


def drop_caches() -> bool:
    """Empties the OS page cache (root only) so the next read comes from the disk."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------------
# Machine load (the 2 cores are shared: every note says how busy they were) and checkpoints in both
# layouts: "bf16" as published (bfloat16 scales, biases and unquantized tensors, as every mlx-community
# 4-bit upload) and "f32", the same checkpoint with every bfloat16 tensor widened to float32 (exact).

LAYOUTS = {"bf16": "bfloat16", "f32": "float32"}


def load_note() -> str:
    """'load 1m X, cpu pressure avg60 Y%': how busy the shared cores are right now."""
    one = os.getloadavg()[0]
    try:
        pressure = Path("/proc/pressure/cpu").read_text().split()[2].split("=")[1] + "%"
    except (OSError, IndexError):
        pressure = "n/a"
    return f"load {one:.2f}, cpu pressure avg60 {pressure}"


def issue15_preset():
    """The published-layout model of issue 15's table: hidden 1024, 8 layers, 128 experts top-8,
    moe_intermediate 512, 4-bit (~0.9 GB with bf16 scales); small vocabulary so the layers dominate."""
    from streamer.synthetic.presets import Preset, _text_config

    tc = _text_config(
        hidden_size=1024,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=128,
        linear_num_value_heads=8,
        linear_num_key_heads=4,
        linear_key_head_dim=128,
        linear_value_head_dim=128,
        num_experts=128,
        num_experts_per_tok=8,
        moe_intermediate_size=512,
        shared_expert_intermediate_size=512,
    )
    return Preset("issue15", "issue 15's hidden-1024 / 8-layer / 128 x top-8 model", tc, values="codes")


def widen_checkpoint(src: Path, dst: Path) -> Path:
    """Copies ``src`` with every bfloat16 tensor widened to float32 (bf16 -> f32 is exact): the float32
    variant of the *same* checkpoint."""
    import json
    import shutil

    import mlx.core as mx

    if (dst / "config.json").exists():
        return dst
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for p in src.iterdir():
        if p.suffix == ".safetensors":
            arrays, meta = mx.load(str(p), return_metadata=True)
            arrays = {k: v.astype(mx.float32) if v.dtype == mx.bfloat16 else v for k, v in arrays.items()}
            mx.save_safetensors(str(tmp / p.name), arrays, metadata=meta)
            del arrays
        elif p.name == "config.json":
            config = json.loads(p.read_text())
            for c in (config, config.get("text_config", {})):
                for key in ("dtype", "torch_dtype"):
                    if key in c:
                        c[key] = "float32"
            (tmp / p.name).write_text(json.dumps(config, indent=4))
        elif p.is_file():
            shutil.copy2(p, tmp / p.name)
    tmp.rename(dst)
    return dst


def cli(*argv: str) -> None:
    import sys

    subprocess.run([sys.executable, "-c", "from streamer.cli.main import main; main()", *argv], check=True)


def build_pair(work: Path, name: str, make_bf16) -> dict[str, tuple[Path, Path]]:
    """{layout: (source checkpoint, packed copy)} for both layouts; ``make_bf16(dst)`` writes the
    published-layout source (or returns an existing one), the f32 variant is widened from it."""
    work.mkdir(parents=True, exist_ok=True)
    src_bf16 = make_bf16(work / f"{name}-bf16-src")
    out = {"bf16": src_bf16, "f32": widen_checkpoint(src_bf16, work / f"{name}-f32-src")}
    pairs = {}
    for layout, src in out.items():
        dst = work / f"{name}-{layout}-packed"
        if not (dst / "manifest.json").exists():
            cli("repack", str(src), str(dst))
        pairs[layout] = (src, dst)
    return pairs


def synthetic_maker(preset, layers: int | None = None, vocab: int | None = None):
    """A ``make_bf16`` for ``build_pair``: a synthetic checkpoint in the published layout."""

    def make(dst: Path) -> Path:
        if not (dst / "config.json").exists():
            if isinstance(preset, str):
                cmd = ["synthetic", preset, str(dst), "--dtype", "bfloat16"]
                cmd += ["--layers", str(layers)] if layers else []
                cmd += ["--vocab-size", str(vocab)] if vocab else []
                cli(*cmd)
            else:
                from streamer.synthetic.writer import generate

                generate(dst, preset, dtype="bfloat16")
        return dst

    return make
