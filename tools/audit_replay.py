"""Re-makes the bugs of the tests audit (issue 21) and checks the test backing each claim catches it.

An audit planted deliberate bugs in a copy of the project and ran the tests behind each README claim; nine
passed every test they met. This script plants each of them again, one at a time, in a scratch copy of
the working tree (``git ls-files``; the tree itself is never touched), runs the tests that back the claim,
and reports CAUGHT (the tests failed) or MISSED (they passed: the claim is unguarded). Outside CI: it takes
several minutes.

    python tools/audit_replay.py            # every bug
    python tools/audit_replay.py verify-down-proj stop-after-3

Exit status 1 if any bug is missed or a planted edit no longer applies (the code moved: update the entry).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Bug:
    name: str
    claim: str  # the README promise it breaks
    file: str
    old: str  # exact text replaced (must occur once)
    new: str
    tests: tuple[str, ...]  # pytest arguments: the tests backing the claim


BUGS = [
    Bug(
        "direct-io-broken",
        "every io mode streams the same logits",
        "streamer/experts/store.py",
        "        flags = os.O_RDONLY\n",
        '        flags = os.O_RDONLY\n        if self.io_mode == "direct":\n'
        '            raise PackedFormatError(f"{path}: direct I/O broken on purpose")\n',
        ("tests/test_streaming.py",),
    ),
    Bug(
        "stop-after-3",
        "greedy tokens equal mlx-lm's",
        "streamer/generation/scheduler.py",
        'reason = "stop" if token in seq.eos_ids else',
        'reason = "stop" if token in seq.eos_ids or len(seq.tokens) >= 3 else',
        ("tests/test_generate_cli.py", "-k", "greedy_tokens_equal_mlx_lm"),
    ),
    Bug(
        "extra-line-before-errors",
        "a user mistake is one clear line",
        "streamer/cli/main.py",
        "        except StreamerError as e:\n",
        "        except StreamerError as e:\n"
        '            click.echo("note: something went wrong", err=True)\n',
        ("tests/test_catalogue.py",),
    ),
    Bug(
        "verify-skips-down-proj",
        "verify re-checks every checksum",
        "streamer/storage/verify.py",
        "                for c, want in zip(entry.components, entry.crc32[e0 + j], strict=True):\n",
        "                for c, want in zip(entry.components, entry.crc32[e0 + j], strict=True):\n"
        '                    if c.name.startswith("down_proj"):\n                        continue\n',
        ("tests/repack", "tests/test_damaged_copies.py"),
    ),
    Bug(
        "verify-skips-last-expert",
        "verify re-checks every checksum",
        "streamer/storage/verify.py",
        "            for j in range(n):\n                for c, want in",
        "            for j in range(n - (e0 + n == entry.num_experts)):\n                for c, want in",
        ("tests/repack", "tests/test_damaged_copies.py"),
    ),
    Bug(
        "repack-skips-verify-after-write",
        "repack verifies what it wrote",
        "streamer/storage/repack.py",
        "    verify_layer_file(part, entry)\n    os.replace(part, dst / entry.file)",
        "    os.replace(part, dst / entry.file)",
        ("tests/repack",),
    ),
    Bug(
        "disconnect-never-noticed",
        "a client that goes away stops its generation",
        "streamer/serve/http.py",
        '            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""',
        "            return False",
        ("tests/serve/test_openai_api.py", "-k", "disconnect"),
    ),
    Bug(
        "deltanet-chunk-end-off-by-one",
        "output equals mlx-lm's (prompts longer than a prefill chunk)",
        "streamer/models/gated_delta.py",
        "end_decay = mx.exp(log_G[:, :, n, -1])[..., None, None]",
        "end_decay = mx.exp(log_G[:, :, n, -2])[..., None, None]",
        ("tests/test_model_parity.py", "-k", "long_prompt"),
    ),
    Bug(
        "router-normalisation-removed",
        "streamed output equals mlx-lm's",
        "streamer/models/moe_block.py",
        "        if self.norm_topk_prob:\n            scores = scores / scores.sum(axis=-1, keepdims=True)\n",
        "",
        ("tests/test_streaming.py", "-k", "mlx_lm"),
    ),
]


def copy_tree(dst: Path) -> None:
    """The tracked and untracked-but-not-ignored files of the working tree, as they are now."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout.split(b"\0")  # fmt: skip
    for name in filter(None, files):
        src = REPO / os.fsdecode(name)
        if src.is_file():
            (dst / os.fsdecode(name)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / os.fsdecode(name))


def plant(root: Path, bug: Bug) -> None:
    path = root / bug.file
    text = path.read_text()
    if text.count(bug.old) != 1:
        raise LookupError(f"{bug.name}: the text to replace occurs {text.count(bug.old)} times in {bug.file}")
    path.write_text(text.replace(bug.old, bug.new))


def run_tests(root: Path, tests: tuple[str, ...]) -> tuple[bool, float, str]:
    """(passed, seconds, the last lines of output), with the copy's ``streamer`` first on the path."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
    }
    start = time.perf_counter()
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
        cwd=root, env=env, capture_output=True, text=True,
    )  # fmt: skip
    tail = "\n".join((run.stdout + run.stderr).strip().splitlines()[-3:])
    return run.returncode == 0, time.perf_counter() - start, tail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bugs", nargs="*", help="names of bugs to plant (default: all)")
    args = parser.parse_args(argv)
    chosen = [b for b in BUGS if not args.bugs or b.name in args.bugs]
    if unknown := set(args.bugs) - {b.name for b in BUGS}:
        parser.error(f"unknown bug(s) {', '.join(sorted(unknown))}; known: {', '.join(b.name for b in BUGS)}")
    failed = False
    with tempfile.TemporaryDirectory(prefix="audit-replay-") as tmp:
        pristine = Path(tmp) / "pristine"
        copy_tree(pristine)
        # A control first: the copy must pass each test selection unplanted, or CAUGHT would prove nothing.
        for tests in dict.fromkeys(b.tests for b in chosen):
            passed, seconds, tail = run_tests(pristine, tests)
            outcome = "passes" if passed else "FAILS: the copy is broken"
            print(f"control {' '.join(tests)}: unplanted, {outcome} ({seconds:.0f} s)")
            if not passed:
                print("        " + tail.replace("\n", "\n        "))
                return 1
        for bug in chosen:
            root = Path(tmp) / bug.name
            shutil.copytree(pristine, root)
            try:
                plant(root, bug)
            except LookupError as e:
                print(f"STALE   {e}")
                failed = True
                continue
            passed, seconds, tail = run_tests(root, bug.tests)
            verdict = "MISSED" if passed else "CAUGHT"
            failed |= passed
            print(f"{verdict}  {bug.name:34s} ({bug.claim}) by {' '.join(bug.tests)} in {seconds:.0f} s")
            print("        " + (tail if passed else tail.splitlines()[-1]).replace("\n", "\n        "))
            shutil.rmtree(root)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
