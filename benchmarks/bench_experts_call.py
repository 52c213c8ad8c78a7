"""One streamed ``experts(x, indices)`` decode call vs the slot pool's size, for every expert dtype.

    python benchmarks/bench_experts_call.py                 # 8 vs 1024 slots, hidden 1024, inter 512
    python benchmarks/bench_experts_call.py --slots 8 2048 --rounds 30

For each stored dtype of the expert block (4-bit with bf16 / f16 / f32 scales and biases; unquantized
bf16 weights) and activation dtype, two pool layouts side by side:
  stored    the slots hold floats as on disk (before issue 15): the kernels convert the whole pool's
            scales (or weights) on every call when their dtype differs from the computation's;
  promoted  the slots hold ``mx.result_type(activation, stored)`` (ExpertCache today).
The call is ``switch_glu`` over the pools (gate, up, down; K = 8 routed), timed as median ms over
rounds, configurations interleaved round-robin. Goal: promoted flat in the slot count.
Appends one row per (combo, layout) to benchmarks/results.tsv (value: ms at the largest pool; ratio:
largest ÷ smallest).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from streamer.experts.expert_cache import _STORAGE, SlotPool, block_shape
from streamer.models.resident_experts import gather_qmm_experts, switch_glu

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results, row  # noqa: E402

K = 8


class _Proj:
    def __init__(self, pool: SlotPool, name: str, bits: int | None, group_size: int):
        self.w = pool.arrays[f"{name}.weight"]
        self.s, self.b = pool.arrays.get(f"{name}.scales"), pool.arrays.get(f"{name}.biases")
        self.bits, self.gs = bits, group_size

    def __call__(self, x, idx, sorted_indices=False):
        if self.bits is None:
            return mx.gather_mm(x, self.w.swapaxes(-1, -2), rhs_indices=idx, sorted_indices=sorted_indices)
        return gather_qmm_experts(
            x, self.w, self.s, self.b, idx, self.bits, self.gs, "affine", sorted_indices
        )


def components(hidden: int, inter: int, stored: str, bits: int | None, gs: int) -> list:
    comps = []
    for name, (out, inp) in (
        ("gate_proj", (inter, hidden)),
        ("up_proj", (inter, hidden)),
        ("down_proj", (hidden, inter)),
    ):
        if bits is None:
            comps.append((f"{name}.weight", stored, (out, inp)))
        else:
            comps += [
                (f"{name}.weight", "U32", (out, inp * bits // 32)),
                (f"{name}.scales", stored, (out, inp // gs)),
                (f"{name}.biases", stored, (out, inp // gs)),
            ]
    return comps


def make_pool(comps, activation, slots: int, seed: int = 0) -> SlotPool:
    """A pool (held as stored if ``activation`` is None) filled through the readers' path with random
    blocks: small floats for scales / weights, random codes for packed weights."""
    pool = SlotPool(block_shape(comps, activation), slots)
    rng = np.random.default_rng(seed)
    blocks = []
    for _ in range(min(slots, 8)):
        parts = []
        for _, dtype, shape in comps:
            n = int(np.prod(shape))
            if dtype == "U32":
                parts.append(rng.integers(0, 1 << 32, n, dtype=np.uint32).tobytes())
            else:
                vals = mx.array(rng.standard_normal(n).astype(np.float32) * 0.02).astype(_STORAGE[dtype][1])
                parts.append(bytes(np.array(vals.view(_STORAGE[dtype][0]))))
        blocks.append(parts)
    for slot in range(slots):
        parts = blocks[slot % len(blocks)]

        def fill(buffers, parts=parts):
            for buf, data in zip(buffers, parts, strict=True):
                buf[:] = data
            return sum(len(p) for p in parts)

        pool.buffers(slot).read(fill)
    return pool


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=512)
    ap.add_argument("--slots", type=int, nargs=2, default=[8, 1024], metavar=("SMALL", "LARGE"))
    ap.add_argument("--unquantized-slots", type=int, default=256, help="largest pool of f32 weights (memory)")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    small, large = args.slots
    combos = [  # (label, stored dtype, bits, activation)
        ("4-bit bf16 scales, f32 x", "BF16", 4, mx.float32),
        ("4-bit f16 scales, f32 x", "F16", 4, mx.float32),
        ("4-bit f32 scales, f32 x", "F32", 4, mx.float32),
        ("4-bit f16 scales, bf16 x", "F16", 4, mx.bfloat16),
        ("unquantized bf16, f32 x", "BF16", None, mx.float32),
    ]
    rng = np.random.default_rng(1)
    cfgs, keep = {}, []
    for label, stored, bits, act in combos:
        big = large if bits is not None else min(large, args.unquantized_slots)
        for layout in ("stored", "promoted"):
            for n in (small, big):
                comps = components(args.hidden, args.inter, stored, bits, 64)
                pool = make_pool(comps, None if layout == "stored" else act, n)
                projs = [_Proj(pool, p, bits, 64) for p in ("gate_proj", "up_proj", "down_proj")]
                x = mx.array(rng.standard_normal((1, 1, args.hidden)).astype(np.float32)).astype(act)
                idx = mx.array(rng.choice(n, K, replace=False).reshape(1, 1, K).astype(np.uint32))
                mx.eval(x, idx)
                keep.append(pool)
                cfgs[(label, layout, n)] = lambda x=x, idx=idx, projs=projs: switch_glu(x, idx, *projs)
    for f in cfgs.values():  # warm up
        mx.eval(f())
    times = {k: [] for k in cfgs}
    for _ in range(args.rounds):
        for k, f in cfgs.items():
            t = time.perf_counter()
            mx.eval(f())
            times[k].append((time.perf_counter() - t) * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = []
    print(
        f"experts() decode call, hidden {args.hidden}, inter {args.inter}, K={K}; median ms of {args.rounds}"
    )
    print(f"{'combo':<28} {'layout':<9} {'slots':>12} {'ms small':>9} {'ms large':>9} {'ratio':>6}")
    for label, _, bits, _ in combos:
        big = large if bits is not None else min(large, args.unquantized_slots)
        for layout in ("stored", "promoted"):
            a, b = med[(label, layout, small)], med[(label, layout, big)]
            print(f"{label:<28} {layout:<9} {f'{small}/{big}':>12} {a:9.2f} {b:9.2f} {b / a:6.2f}")
            rows.append(
                row(
                    f"experts() call {label}, hidden {args.hidden} inter {args.inter} K={K}, slots held {layout}",
                    f"ms per call at {big} slots",
                    b,
                    b / a,
                    f"{a:.2f} ms at {small} slots; ratio = {big} ÷ {small} slots; median of {args.rounds}",
                )
            )
    if not args.no_record:
        append_results(rows)


if __name__ == "__main__":
    main()
