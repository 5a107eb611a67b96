"""Start small: train briefly on a sample, then say what the full job would cost on this hardware.

A dry run trains on `dryRun.fraction` of the examples for at most `dryRun.maxSteps` updates, validates
once, and reports measured throughput, the time the full job would take, peak memory and whether the
loss is going down. It never resumes nor writes checkpoints, and it publishes no model: only a report
under <output.uri>/dry-run/, so nobody mistakes it for a finished model.
"""

from __future__ import annotations

import random
import statistics
from typing import Any

from kubetune import procmem
from kubetune.contract import DRY_RUN_DIR

__all__ = ["DRY_RUN_DIR", "describe", "peak_memory_bytes", "report", "sample"]
REPORT_FILE = "dry-run.json"


def sample(examples: list[dict[str, Any]], fraction: float, minimum: int, seed: int) -> list[dict[str, Any]]:
    """A seeded uniform sample: the lengths (and so the cost per example) match the full set's on average."""
    count = min(len(examples), max(minimum, round(len(examples) * fraction)))
    chosen = sorted(random.Random(seed).sample(range(len(examples)), count))
    return [examples[i] for i in chosen]


def peak_memory_bytes(device: Any) -> int:
    """Reserved, not allocated: the caching allocator's blocks are what a device runs out of."""
    if device.type == "cuda":
        import torch

        return int(torch.cuda.max_memory_reserved(device))
    return procmem.peak_rss_bytes()


def report(*, step_seconds: list[float], step_tokens: list[int], losses: list[float], full_steps: int,
           full_tokens: int, samples_per_second: float, eval_seconds: float, eval_examples: int,
           full_eval_examples: int, peak_bytes: int, validation: dict[str, Any] | None) -> dict[str, Any]:
    """Extrapolate by padded tokens (a step costs about its batch's padded tokens) at the median rate of the
    measured steps; the first step, which warms caches up, is left out when there are enough others."""
    measured = list(zip(step_seconds, step_tokens, strict=True))
    steady = measured[1:] if len(measured) > 2 else measured
    # The median step rate: one slow step (a page fault storm, another process) must not set the estimate.
    seconds_per_token = statistics.median(s / max(n, 1) for s, n in steady)
    train_seconds = full_tokens * seconds_per_token
    eval_rate = eval_examples / max(eval_seconds, 1e-9)
    eval_total = full_eval_examples / eval_rate if eval_examples else 0.0
    third = max(1, len(losses) // 3)
    first, last = statistics.fmean(losses[:third]), statistics.fmean(losses[-third:])
    return {
        "dryRun": True,
        "steps": len(step_seconds),
        "samplesPerSecond": samples_per_second,
        "secondsPerThousandTokens": seconds_per_token * 1000,
        "fullSteps": full_steps,
        "estimatedTrainSeconds": train_seconds,
        "estimatedEvalSeconds": eval_total,
        "estimatedTotalSeconds": train_seconds + eval_total,
        "peakMemoryBytes": peak_bytes,
        "lossFirst": first,
        "lossLast": last,
        "lossDecreasing": last < first,
        "validation": validation,
    }


def describe(result: dict[str, Any]) -> str:
    minutes = result["estimatedTotalSeconds"] / 60
    trend = "going down" if result["lossDecreasing"] else "NOT going down: check the learning rate and the data"
    return (f"dry run: {result['steps']} steps at {result['samplesPerSecond']:.1f} samples/s; the full job "
            f"({result['fullSteps']} steps) would take about {minutes:.1f} min on this hardware "
            f"(training {result['estimatedTrainSeconds']:.0f} s, evaluation {result['estimatedEvalSeconds']:.0f} s); "
            f"peak memory {result['peakMemoryBytes'] / 2**30:.2f} GiB; loss {result['lossFirst']:.4f} -> "
            f"{result['lossLast']:.4f} ({trend}). Not a finished model: nothing was published but the report.")
