"""`make mutants`: put deliberate bugs back one at a time and see whether the suite catches each.

    python -m tests.mutants [--list tests/mutants.yaml] [--only ID ...]

Each entry of the list names a bug (`id`, `why`), the text changes that make it (`file`, and `find` -> `replace`
pairs, each `find` present exactly once), and the tests that must catch it. The tests run first on the code as
it is (they must pass), then once per mutant with only that mutant applied; the file is restored afterwards,
whatever happens. Caught means the tests failed. The last line is one JSON object with the score.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_LIST = ROOT / "tests" / "mutants.yaml"


@dataclass(frozen=True)
class Mutant:
    id: str
    why: str
    changes: list[tuple[str, str, str]]  # (file, find, replace)
    tests: list[str]


def load(path: Path) -> list[Mutant]:
    mutants = []
    for entry in yaml.safe_load(path.read_text()):
        changes = [(c.get("file", entry.get("file")), c["find"], c["replace"]) for c in entry["changes"]]
        mutants.append(Mutant(entry["id"], entry["why"], changes, entry["tests"]))
    return mutants


def pytest(tests: list[str], first_failure_stops: bool = True) -> tuple[bool, float, str]:
    """Run the tests; (passed, seconds, pytest's report)."""
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "pytest", *(["-x"] if first_failure_stops else []), "-q", "-p",
                           "no:cacheprovider", "-o", "addopts=-ra", *tests], cwd=ROOT, capture_output=True, text=True)
    return done.returncode == 0, time.monotonic() - start, done.stdout + done.stderr


def apply(mutant: Mutant, originals: dict[Path, str], dry: bool = False) -> None:
    """Apply every change in turn, keeping each file's original text in `originals` (for the caller to restore);
    dry: only check that each change finds its text exactly once, writing nothing."""
    texts: dict[Path, str] = {}
    for file, find, replace in mutant.changes:
        path = ROOT / file
        text = texts.get(path) or path.read_text()
        originals.setdefault(path, text)
        if text.count(find) != 1:
            raise ValueError(f"{mutant.id}: {file}: the text to change occurs {text.count(find)} times, not once")
        texts[path] = text.replace(find, replace)
        if not dry:
            path.write_text(texts[path])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", type=Path, default=DEFAULT_LIST)
    parser.add_argument("--only", nargs="*", help="run only these mutant ids")
    args = parser.parse_args(argv)
    mutants = [m for m in load(args.list) if not args.only or m.id in args.only]
    for mutant in mutants:  # every change still applies to today's code, before minutes of tests
        apply(mutant, {}, dry=True)
    every_test = sorted({t for m in mutants for t in m.tests})
    clean, seconds, report = pytest(every_test, first_failure_stops=False)
    print(f"baseline: {len(every_test)} test selections {'pass' if clean else 'FAIL'} ({seconds:.0f} s)", flush=True)
    if not clean:
        print("\n".join(report.splitlines()[-60:]), file=sys.stderr)
        print("the tests fail without any mutant: fix that first", file=sys.stderr)
        return 1
    results: list[dict[str, Any]] = []
    for mutant in mutants:
        originals: dict[Path, str] = {}
        try:
            apply(mutant, originals)
            passed, seconds, _ = pytest(mutant.tests)
        finally:
            for path, text in originals.items():
                path.write_text(text)
        verdict = "survived" if passed else "caught"
        results.append({"id": mutant.id, "verdict": verdict, "seconds": round(seconds)})
        print(f"{verdict:8s} {mutant.id:34s} {seconds:5.0f} s  {mutant.why}", flush=True)
    caught = sum(r["verdict"] == "caught" for r in results)
    print(json.dumps({"list": str(args.list.relative_to(ROOT)), "mutants": len(results), "caught": caught,
                      "survived": [r["id"] for r in results if r["verdict"] == "survived"]}))
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
