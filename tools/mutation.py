"""Mutation testing of streamer's core modules with mutmut 3 (not part of CI: minutes per module).

    python tools/mutation.py                   # every core module, one after the other
    python tools/mutation.py tool_calls        # one module (names: --list)
    python tools/mutation.py sampling --show   # also print each survivor's diff and equivalents row
    python tools/mutation.py sampling --survivors  # after adding tests: re-run only the last survivors

Each module runs in its own work directory under ``.mutation/NAME/`` (git-ignored): a generated
``pyproject.toml`` names the one file to mutate and the tests that exercise it, so mutmut copies the
package into ``.mutation/NAME/mutants/`` and never touches the working tree. A re-run reuses the
results only while neither the module nor its tests changed; ``--fresh`` starts over anyway.
``--survivors`` keeps the results when only tests changed and re-runs the survivors alone: right when
tests were only added or made stricter (a killed mutant stays killed), and much faster than a full run.

Surviving mutants that cannot be killed (the mutated program behaves the same) are listed with a reason
in ``tests/mutation_equivalents.md``; the table counts them apart and scores killed / (total − equivalent).
A listed mutant whose diff no longer matches the recorded one is reported as stale.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".mutation"
EQUIVALENTS = ROOT / "tests" / "mutation_equivalents.md"


@dataclass(frozen=True)
class Target:
    path: str  # the file to mutate
    tests: tuple[str, ...]  # what pytest runs for it (only these: the rest of the suite is too slow)


EXPERT_EDGES = ("tests/test_expert_cache_edges.py",)
STORAGE_EDGES = ("tests/test_packed_format_edges.py",)
GENERATION = ("tests/test_scheduler_mutants.py",)
TARGETS = {
    "tool_calls": Target(
        "streamer/serve/tool_calls.py", ("tests/test_tool_calls.py", "tests/test_tool_calls_edges.py")
    ),
    "sampling": Target(
        "streamer/generation/sampling.py", ("tests/test_sampling.py", "tests/test_sampling_edges.py")
    ),
    "slot_book": Target("streamer/experts/slot_book.py", ("tests/test_expert_cache.py", *EXPERT_EDGES)),
    "policy": Target("streamer/experts/policy.py", ("tests/test_policy.py", *EXPERT_EDGES)),
    "expert_cache": Target("streamer/experts/expert_cache.py", ("tests/test_expert_cache.py", *EXPERT_EDGES)),
    "packed_format": Target("streamer/storage/packed_format.py", ("tests/repack", *STORAGE_EDGES)),
    "verify": Target("streamer/storage/verify.py", ("tests/repack", *STORAGE_EDGES)),
    "gated_delta": Target(
        "streamer/models/gated_delta.py", ("tests/test_gated_delta.py", "tests/test_gated_delta_mutants.py")
    ),
    # The generation loop, against a toy model whose every token is known (no checkpoint, about a second
    # per mutant). test_scheduler.py (a repacked model per run, ~25 s) and test_generate_cli.py (two
    # repacks and mlx-lm) cost too much per mutant: a scheduler run with test_scheduler.py did ~15
    # mutants a minute on a shared 2-core machine, most of an hour for its 495.
    "scheduler": Target("streamer/generation/scheduler.py", GENERATION),
    "generate": Target("streamer/generation/generate.py", GENERATION),
    "repack": Target("streamer/storage/repack.py", ("tests/repack",)),
}

# mutmut's exit-code classes, folded into the table's columns.
COLUMNS = {
    "killed": "killed",
    "caught by type check": "killed",
    "survived": "survived",
    "timeout": "timeout",
    "suspicious": "timeout",
    "no tests": "no tests",
    "segfault": "killed",  # the mutant crashed the test process: the tests noticed
}


def write_config(name: str, target: Target) -> Path:
    """Lays out .mutation/NAME: links to the package and tests, and a pyproject.toml for mutmut."""
    work = WORK / name
    work.mkdir(parents=True, exist_ok=True)
    for link in ("streamer", "tests"):
        if not (work / link).exists():
            (work / link).symlink_to(ROOT / link)
    tests = ", ".join(f'"{t}"' for t in target.tests)
    (work / "pyproject.toml").write_text(
        "[tool.mutmut]\n"
        'source_paths = ["streamer"]\n'
        f'only_mutate = ["{target.path}"]\n'
        f"pytest_add_cli_args_test_selection = [{tests}]\n"
        'pytest_add_cli_args = ["-p", "no:cacheprovider", "-x", "-q"]\n'
        "use_git_change_detection = false\n"
        # MLX deadlocks in a child forked after the parent evaluated anything: fork each mutant from a
        # server that has only imported the heavy modules (importing evaluates nothing).
        'process_isolation = "forkserver"\n'
        'forkserver_warmup = "import"\n'
        f'preload_modules_file = "{work / "preload.txt"}"\n'
        "\n[tool.pytest.ini_options]\n"
        'testpaths = ["tests"]\n'
        'markers = ["slow: tests that take more than a few seconds"]\n'
    )
    (work / "preload.txt").write_text("mlx.core\nmlx.nn\nnumpy\npytest\nstreamer\n")
    return work


def inputs_digest(target: Target) -> str:
    """A hash of the module and every test file that runs against it."""
    h = hashlib.sha256()
    for entry in (target.path, *target.tests):
        root = ROOT / entry
        for f in sorted(root.rglob("*.py")) if root.is_dir() else [root]:
            h.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def mutmut(work: Path, *args: str, quiet: bool = False) -> str:
    cmd = [sys.executable, "-c", "from mutmut.__main__ import cli; cli()", *args]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    res = subprocess.run(cmd, cwd=work, env=env, text=True, capture_output=quiet)
    if res.returncode != 0:
        if quiet:
            sys.stderr.write(res.stdout + res.stderr)
        raise SystemExit(f"mutmut {' '.join(args)} failed in {work} (exit {res.returncode})")
    return res.stdout if quiet else ""


def read_equivalents() -> dict[str, tuple[str, str]]:
    """Mutant name -> (recorded mutated line, reason), from the table rows of mutation_equivalents.md."""
    found = {}
    row = re.compile(
        r"^\|\s*`(?P<name>[\w.]+__mutmut_\d+)`\s*\|\s*`(?P<line>.*)`\s*\|\s*(?P<why>.+?)\s*\|\s*$"
    )
    for line in EQUIVALENTS.read_text().splitlines() if EQUIVALENTS.exists() else []:
        m = row.match(line)
        if m:
            found[m["name"]] = (m["line"].replace("\\|", "|"), m["why"])
    return found


def mutated_line(work: Path, name: str) -> str:
    """The first added line of a mutant's diff, stripped (what the equivalents file records)."""
    diff = mutmut(work, "show", name, quiet=True)
    added = [ln[1:].strip() for ln in diff.splitlines() if ln.startswith("+") and not ln.startswith("+++")]
    return added[0] if added else ""


def read_statuses(work: Path) -> dict[str, str]:
    """Mutant name -> table column, from mutmut's recorded results."""
    statuses = {}
    for line in mutmut(work, "results", "--all", "true", quiet=True).splitlines():
        key, _, status = line.strip().rpartition(": ")
        if key:
            statuses[key] = COLUMNS.get(status, status)
    return statuses


def run_module(
    name: str, fresh: bool, show: bool, children: int, survivors: bool = False
) -> dict[str, object]:
    target = TARGETS[name]
    work = write_config(name, target)
    # mutmut keeps a survivor's verdict while the test names it knows stay the same, even when a test's
    # body changed: start over whenever the module or any of its tests changed (unless --survivors and
    # only tests changed).
    stamp, module_stamp = work / "inputs.sha256", work / "module.sha256"
    digest = inputs_digest(target)
    module_digest = hashlib.sha256((ROOT / target.path).read_bytes()).hexdigest()
    keep = (
        survivors
        and module_stamp.exists()
        and module_stamp.read_text() == module_digest
        and (work / "mutants").exists()
    )
    # (survivors listed as equivalent are not re-run; the table below still checks their diffs)
    listed = read_equivalents()
    rerun = [k for k, s in read_statuses(work).items() if s == "survived" and k not in listed] if keep else []
    if not keep and (fresh or not stamp.exists() or stamp.read_text() != digest):
        shutil.rmtree(work / "mutants", ignore_errors=True)
    print(f"== {name}: {target.path} against {' '.join(target.tests)}", flush=True)
    if keep:
        print(f"   the module is unchanged: re-running its {len(rerun)} survivors only", flush=True)
    if rerun or not keep:
        mutmut(work, "run", "--max-children", str(children), *rerun, quiet=True)
    stamp.write_text(digest)
    module_stamp.write_text(module_digest)
    statuses = read_statuses(work)
    equivalents = read_equivalents()
    counts = {"killed": 0, "survived": 0, "equivalent": 0, "timeout": 0, "no tests": 0}
    for key, status in sorted(statuses.items()):
        if status == "survived" and key in equivalents:
            recorded, _ = equivalents[key]
            if mutated_line(work, key) == recorded:
                counts["equivalent"] += 1
                continue
            print(f"   stale equivalent (diff changed, re-triage): {key}")
        counts[status] = counts.get(status, 0) + 1
        if status == "survived" and show:
            print(mutmut(work, "show", key, quiet=True))
            line = mutated_line(work, key).replace("|", "\\|")
            print(f"   equivalents row, if it is one: | `{key}` | `{line}` | WHY |\n")
        elif status != "killed":
            print(f"   {status}: {key}")
    return {"module": name, **counts}


def print_table(rows: list[dict[str, object]]) -> None:
    head = ("killed", 8), ("survived", 10), ("equivalent", 12), ("timeout", 9), ("no tests", 10), ("score", 8)
    print("\n" + "module".ljust(14) + "".join(name.rjust(width) for name, width in head))
    for r in rows:
        total = sum(int(r[c]) for c in ("killed", "survived", "timeout", "no tests"))
        score = (int(r["killed"]) + int(r["timeout"])) / total if total else 1.0
        print(
            f"{r['module']:<14}{r['killed']:>8}{r['survived']:>10}{r['equivalent']:>12}"
            f"{r['timeout']:>9}{r['no tests']:>10}{score:>8.1%}"
        )
    print(
        "score = (killed + timeout) / (total - equivalent). timeout: the tests hung, or the test process"
        " died (mutmut files an import-time crash under it too): either way the tests noticed"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("modules", nargs="*", help="module names (default: all)")
    parser.add_argument("--list", action="store_true", help="list the module names and their tests")
    parser.add_argument("--fresh", action="store_true", help="forget earlier results")
    parser.add_argument(
        "--survivors", action="store_true", help="keep the results, re-run the survivors (tests only added)"
    )
    parser.add_argument("--show", action="store_true", help="print each surviving mutant's diff")
    parser.add_argument("--children", type=int, default=2, help="mutants tested at once (default 2)")
    args = parser.parse_args()
    if args.list:
        for name, t in TARGETS.items():
            print(f"{name:<14}{t.path:<40}{' '.join(t.tests)}")
        return
    unknown = [m for m in args.modules if m not in TARGETS]
    if unknown:
        raise SystemExit(f"unknown module {', '.join(unknown)}: choose from {', '.join(TARGETS)}")
    rows = [
        run_module(m, args.fresh, args.show, args.children, args.survivors) for m in args.modules or TARGETS
    ]
    print_table(rows)


if __name__ == "__main__":
    main()
