"""Sample data shipped with kubetune, written out for the demo and the tests."""

from __future__ import annotations

import shutil
from pathlib import Path

# File names inside this package. The demo and the tests refer to them by these constants so a rename
# only has to happen here.
REVIEWS = "reviews.jsonl"
INSTRUCTIONS = "instructions.jsonl"
# One preference pair per instruction prompt, written for kubetune's DPO demo: chosen is the instruction sample's
# own answer; rejected is an evasive, a curt or an off-topic reply (another prompt's answer), in turn.
PREFERENCES = "preferences.jsonl"

# Keys of the dict write_samples returns, mapped to the packaged file each one comes from.
_SAMPLES: dict[str, str] = {"reviews": REVIEWS, "instructions": INSTRUCTIONS, "preferences": PREFERENCES}


def sample_path(name: str) -> Path:
    """Path of a packaged sample file.

    The files are installed as package data next to this module (see [tool.setuptools.package-data]),
    and kubetune is never run from a zip, so a plain filesystem path is enough; it also lets callers
    hand the path straight to readers that want a real file.
    """
    path = Path(__file__).resolve().parent / name
    if not path.is_file():
        # Fail with the list of what exists rather than a bare FileNotFoundError from a later open().
        known = ", ".join(sorted(_SAMPLES.values()))
        raise FileNotFoundError(f"no sample named {name!r} in {path.parent} (known samples: {known})")
    return path


def write_samples(dest: Path) -> dict[str, Path]:
    """Copy every sample file into ``dest`` (created if missing) and return where each one landed.

    Copies rather than pointing at the package: the demo uploads the directory to object storage and
    the tests may modify it, and neither should be able to touch the installed package.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for key, name in _SAMPLES.items():
        target = dest / name
        shutil.copyfile(sample_path(name), target)
        written[key] = target
    return written


__all__ = ["INSTRUCTIONS", "PREFERENCES", "REVIEWS", "sample_path", "write_samples"]
