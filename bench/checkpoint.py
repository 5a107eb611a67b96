"""Checkpoint cost and work lost to preemption, for MiniLM full fine-tuning and LoRA, local disk and SeaweedFS.

    .venv/bin/python bench/checkpoint.py [--repeats 3] [--signal-every 10] [--signal-storage local seaweed]

Part 1, cost: a real FineTuneRecipe (spec defaults: batch 16, bf16 autocast where the CPU has it, AdamW) is set
up on the sample reviews and trains a few steps in train mode through the recipe's own update function (timed:
the per-step time). It validates once, so the checkpoint carries best_weights as every checkpoint after the first
epoch does; then `recipe.save_checkpoint()` is timed, and so is a fresh recipe's resume inside its setup() (find
the newest complete checkpoint, fetch, verify, load weights, optimizer, scheduler, RNG). Both are reported as a
fraction of `checkpoint.everySteps` (spec default 100) training steps: measured step time x everySteps.

Part 2, work lost: `kubetune run` in a subprocess with a small checkpoint.everySteps is sent SIGKILL (or SIGTERM)
at a random step after the first checkpoint, then run again; work lost = the last step the first run logged
minus the step the restart resumes from. SIGKILL must lose at most everySteps; SIGTERM must lose nothing.

The last line of output is one JSON object with every figure and the ratios.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as common

from kubetune.contract import DEFAULT_GRACE_SECONDS, EXIT_RETRY

TARGET_OVERHEAD = 0.05
MAX_SIGNAL_EVERY = 13  # the signal runs train 3 x everySteps steps; up to 39 of them are each logged
BUCKET = "kubetune-bench"
STEP_LINE = re.compile(r"\bstep (\d+)/(\d+)\b")
RESUMED_LINE = re.compile(r"resumed from (\S+) at step (\d+)")
SUMMARY_LINE = re.compile(r"\bsteps (\d+)/(\d+)\b")
PREEMPTED_LINE = re.compile(r"SIGTERM: saved (\S+) at step (\d+)")


def checkpoint_root(storage: str, name: str, work: Path) -> str:
    return f"s3://{BUCKET}/{name}/checkpoints/" if storage == "seaweed" else str(work / name / "checkpoints")


def job_for(name: str, method: str, storage: str, endpoint: str | None, work: Path, **spec: Any) -> dict[str, Any]:
    doc = common.job_document(name, common.sample_path(common.REVIEWS), work / name / "output",
                              method={"type": method}, **spec)
    doc["spec"]["checkpoint"] = {**doc["spec"].get("checkpoint", {}), "uri": checkpoint_root(storage, name, work)}
    if storage == "seaweed":
        doc["spec"]["storage"] = {"endpoint": endpoint}
        doc["spec"]["output"]["uri"] = f"s3://{BUCKET}/{name}/output/"
    return doc


# ---- part 1: write / restore time -----------------------------------------------------------------
def measure_cost(method: str, storage: str, endpoint: str | None, args: argparse.Namespace,
                 work: Path) -> dict[str, Any]:
    from kubetune.jobfile import parse_job

    name = f"cost-{method}-{storage}"
    job = parse_job(job_for(name, method, storage, endpoint, work))
    busy, own, started = common.busy_cpu_seconds(), _own_cpu_seconds(), time.perf_counter()
    result = time_saves(job, args, work / name)
    gc.collect()  # the training recipe's model and optimizer go before the restores build theirs
    restores = [time_restore(job, result["savedStep"], work / name / f"restore-{i}") for i in range(args.repeats)]
    # CPU share used by other processes (SeaweedFS included) meanwhile: how noisy the step times may be.
    others = common.busy_cpu_seconds() - busy - (_own_cpu_seconds() - own)
    background = max(0.0, others) / ((time.perf_counter() - started) * (os.cpu_count() or 1))
    return {"method": method, "storage": storage, **result, "restoreSeconds": statistics.median(restores),
            "restoreRuns": restores, "everySteps": job.spec.checkpoint.every_steps, "backgroundCpu": background}


def add_overheads(costs: list[dict[str, Any]]) -> None:
    """Save and restore time as a fraction of everySteps training steps.

    The step time of a method is the one measured in its local-disk case when there is one: after an upload
    the SeaweedFS server (on these same cores) keeps working and slows the steps, which would flatter the ratio.
    """
    local = {c["method"]: c["stepSeconds"] for c in costs if c["storage"] == "local"}
    for c in costs:
        step = local.get(c["method"], c["stepSeconds"])
        interval = c["everySteps"] * step
        c.update(referenceStepSeconds=step, intervalSeconds=interval, saveOverhead=c["saveSeconds"] / interval,
                 restoreOverhead=c["restoreSeconds"] / interval)
        # A default run on the reviews also checkpoints at every epoch end, more often than everySteps.
        saves = {s for s in range(1, c["totalSteps"] + 1)
                 if s % c["everySteps"] == 0 or s % c["stepsPerEpoch"] == 0 or s == c["totalSteps"]}
        c.update(defaultRunSaves=len(saves),
                 defaultRunOverhead=len(saves) * c["saveSeconds"] / (c["totalSteps"] * step))


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def time_saves(job: Any, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """Train a few steps with the recipe's own update (timed), validate once, then time save_checkpoint()."""
    from kubetune.train.batching import epoch_batches
    from kubetune.train.progress import Progress
    from kubetune.train.recipe import FineTuneRecipe

    hp = job.spec.hyperparameters
    recipe = FineTuneRecipe(job, folder / "work")
    recipe.setup()
    recipe.ddp.train()  # as the training loop does: dropout on (from_pretrained leaves the model in eval mode)
    batches = epoch_batches(recipe.lengths, hp.batch_size, hp.seed, 0, 1, 0)
    step_times: list[float] = []

    def train(steps: int, timed: bool = True) -> None:
        # One optimizer update as the training loop runs it: collate, autocast forward, backward, clip, AdamW.
        for _ in range(steps):
            started = time.perf_counter()
            recipe._update([batches[recipe.state.step % len(batches)]])
            if timed:
                step_times.append(time.perf_counter() - started)
            recipe.state.step += 1
            recipe.state.samples_in_epoch = sum(len(b) for b in batches[: recipe.state.step % len(batches)])

    train(args.warmup_steps, timed=False)  # first steps pay one-off allocation and kernel selection
    recipe._validate(Progress(recipe.total_steps, recipe.state.step, enabled=False))
    recipe.save_checkpoint()  # warm-up: creates the S3 client and checks the bucket once, as a real run does
    saves: list[float] = []
    for _ in range(args.repeats):
        train(args.steps_between)
        started = time.perf_counter()
        recipe.save_checkpoint()
        saves.append(time.perf_counter() - started)
    manifest = recipe.storage.read_manifest(recipe.last_checkpoint or "") or {}
    return {
        "checkpointBytes": sum(f["size"] for f in manifest.get("files", [])),
        "stepSeconds": statistics.mean(step_times), "stepsTimed": len(step_times),
        "saveSeconds": statistics.median(saves), "saveRuns": saves, "savedStep": recipe.state.step,
        "stepsPerEpoch": recipe.steps_per_epoch, "totalSteps": recipe.total_steps,
    }


def time_restore(job: Any, saved_step: int, work_dir: Path) -> float:
    """A fresh recipe's resume inside its setup(); a fresh work dir, so an S3 checkpoint is downloaded again."""
    from kubetune.train.recipe import FineTuneRecipe

    fresh = FineTuneRecipe(job, work_dir)
    resume, seconds = fresh._resume, [0.0]

    def timed_resume() -> None:
        started = time.perf_counter()
        resume()
        seconds[0] += time.perf_counter() - started

    fresh._resume = timed_resume  # type: ignore[method-assign]  # setup() calls the instance attribute
    fresh.setup()
    if fresh.state.step != saved_step:
        sys.exit(f"{job.metadata.name}: restore resumed at step {fresh.state.step}, expected {saved_step}")
    return seconds[0]


# ---- part 2: work lost to SIGKILL / SIGTERM ---------------------------------------------------------
def kubetune_run(job_path: Path, log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    kubetune = Path(sys.executable).parent / "kubetune"
    with open(log, "ab") as out:
        return subprocess.Popen([str(kubetune), "run", str(job_path)], stdout=out, stderr=subprocess.STDOUT,
                                env=env)


def steps_logged(log: Path) -> list[int]:
    return [int(m.group(1)) for m in STEP_LINE.finditer(log.read_text(errors="replace"))]


def interrupt(kind: str, storage: str, endpoint: str | None, every: int, rng: random.Random,
              work: Path) -> dict[str, Any]:
    """Run, signal at a random step after the first checkpoint, restart; compare the steps."""
    name = f"signal-{kind.lower()}-{storage}"
    # 3 x everySteps steps: kubetune logs every max(1, total // 20) steps, so with everySteps <= 13 every step.
    doc = job_for(name, "lora", storage, endpoint, work, checkpoint={"everySteps": every},
                  hyperparameters={"maxSteps": 3 * every})
    job_path = common.write_yaml(doc, work / name / "job.yaml")
    env = {**os.environ, "KUBETUNE_STATE_DIR": str(work / name / "state"), "PYTHONUNBUFFERED": "1"}
    target = rng.randint(every + 1, 2 * every)  # after the first checkpoint, before the second one
    first_log, second_log = work / name / "first.log", work / name / "second.log"

    process = kubetune_run(job_path, first_log, env)
    while process.poll() is None and max(steps_logged(first_log), default=0) < target:
        time.sleep(0.05)
    if process.poll() is not None:
        sys.exit(f"{name}: kubetune run ended before step {target}:\n{common.log_tail(first_log)}")
    sent = time.perf_counter()
    process.send_signal(signal.SIGKILL if kind == "SIGKILL" else signal.SIGTERM)
    code = process.wait()
    exit_seconds = time.perf_counter() - sent
    # SIGTERM lets the step in flight finish (and log) before the checkpoint: the last logged step counts.
    reached = max(steps_logged(first_log))
    preempted = PREEMPTED_LINE.search(first_log.read_text(errors="replace"))

    restarted = kubetune_run(job_path, second_log, env)
    second_code = restarted.wait()
    text = second_log.read_text(errors="replace")
    resumed = RESUMED_LINE.search(text)
    summary = SUMMARY_LINE.search(text)
    if second_code != 0 or resumed is None:
        sys.exit(f"{name}: the restart failed (exit {second_code}) or did not resume:\n{common.log_tail(second_log)}")
    resume_step = int(resumed.group(2))
    return {
        "signal": kind, "storage": storage, "everySteps": every, "signalledAtStep": target,
        "stepReached": reached, "exitCode": code, "exitSeconds": exit_seconds,
        "savedAtStep": int(preempted.group(2)) if preempted else None, "resumedAtStep": resume_step,
        "stepsLost": reached - resume_step, "restartExitCode": second_code,
        "finalSteps": int(summary.group(1)) if summary else None, "totalSteps": 3 * every,
    }


# ---- report ------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    parser.add_argument("--storage", nargs="+", default=["local", "seaweed"], choices=["local", "seaweed"])
    parser.add_argument("--repeats", type=int, default=5, help="timed saves and restores per case (median)")
    parser.add_argument("--warmup-steps", type=int, default=3, help="untimed training steps first")
    parser.add_argument("--steps-between", type=int, default=5, help="timed training steps before each save")
    parser.add_argument("--signal-every", type=int, default=10, help="checkpoint.everySteps of the signal runs")
    parser.add_argument("--signal-storage", nargs="*", default=["local", "seaweed"], choices=["local", "seaweed"],
                        help="storage of the SIGKILL/SIGTERM runs (none: skip them)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the random signal step (default: random)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--quiet-wait", type=float, default=120.0,
                        help="before each cost case, wait up to this many seconds for other processes to go quiet")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep files here (default: a temp dir)")
    args = parser.parse_args()
    if not 2 <= args.signal_every <= MAX_SIGNAL_EVERY:
        parser.error(f"--signal-every must be 2..{MAX_SIGNAL_EVERY} so that the progress log names every step")

    common.setup_env(args.threads)
    common.set_torch_threads(args.threads)
    from kubetune.spec import CheckpointSpec, StorageSpec
    from kubetune.storage.s3 import S3Backend
    from kubetune.storage.seaweed import SeaweedServer
    from kubetune.train.entry import setup_logging

    setup_logging(0)
    # SeaweedFS without identities accepts any key; botocore only needs some credentials in its chain.
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "kubetune-bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "kubetune-bench-secret")
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 30)
    rng = random.Random(seed)
    needs_s3 = "seaweed" in args.storage or "seaweed" in (args.signal_storage or [])
    with tempfile.TemporaryDirectory(prefix="kubetune-bench-ckpt-") as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        server = SeaweedServer(work / "seaweed") if needs_s3 else None
        endpoint = None
        try:
            if server is not None:
                server.start()
                endpoint = server.endpoint
                S3Backend(StorageSpec(endpoint=endpoint)).ensure_bucket(BUCKET)
            costs = []
            for method in args.methods:
                for storage in args.storage:
                    if args.quiet_wait:
                        common.wait_for_quiet(args.quiet_wait)  # step times are what the overhead divides by
                    print(f"checkpoint cost: {method} on {storage} ...", file=sys.stderr, flush=True)
                    costs.append(measure_cost(method, storage, endpoint, args, work))
            add_overheads(costs)
            lost = []
            for storage in args.signal_storage or []:
                for kind in ("SIGKILL", "SIGTERM"):
                    print(f"{kind} on {storage} ...", file=sys.stderr, flush=True)
                    lost.append(interrupt(kind, storage, endpoint, args.signal_every, rng, work))
        finally:
            if server is not None:
                server.stop()
    report(costs, lost, args, seed, CheckpointSpec().every_steps)


def report(costs: list[dict[str, Any]], lost: list[dict[str, Any]], args: argparse.Namespace, seed: int,
           default_every: int) -> None:
    machine = common.machine()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, {args.threads} threads")
    print(f"checkpoint cost at checkpoint.everySteps = {default_every} (spec default), spec-default "
          "hyperparameters (batch 16, precision auto, AdamW); step s = mean of the timed steps of the method's "
          f"local case; {default_every} steps s = step s x {default_every} (extrapolated); save/restore = median "
          f"of {args.repeats}; default run = the saves of a default 3-epoch run on the reviews (everySteps and "
          "every epoch end) over its training time")
    print()
    rows = [[c["method"], c["storage"], c["checkpointBytes"] / 2**20, c["referenceStepSeconds"],
             c["intervalSeconds"], c["saveSeconds"], 100 * c["saveOverhead"], c["restoreSeconds"],
             100 * c["restoreOverhead"], f"{100 * c['defaultRunOverhead']:.1f} ({c['defaultRunSaves']} saves)",
             100 * c["backgroundCpu"]] for c in costs]
    print(common.table(["method", "storage", "ckpt MiB", "step s", f"{default_every} steps s", "save s", "save %",
                        "restore s", "restore %", "default run %", "other load %"], rows))
    worst = max((c["saveOverhead"] for c in costs), default=0.0)
    print(f"\nworst save overhead: {100 * worst:.2f}% of {default_every} steps "
          f"(target < {100 * TARGET_OVERHEAD:.0f}%) {'MET' if worst < TARGET_OVERHEAD else 'NOT MET'}")
    if lost:
        print(f"\nwork lost to a signal (kubetune run, LoRA, checkpoint.everySteps {args.signal_every}, "
              f"signal step drawn with seed {seed})")
        rows = [[r["signal"], r["storage"], r["signalledAtStep"], r["stepReached"], r["exitCode"], r["exitSeconds"],
                 r["resumedAtStep"], r["stepsLost"], f"{r['finalSteps']}/{r['totalSteps']}"] for r in lost]
        print(common.table(["signal", "storage", "sent at step", "step reached", "exit", "exit s", "resumed at",
                            "steps lost", "final"], rows))
    kill_ok = all(r["stepsLost"] <= r["everySteps"] for r in lost if r["signal"] == "SIGKILL")
    term_ok = all(r["stepsLost"] == 0 and r["exitCode"] == EXIT_RETRY for r in lost if r["signal"] == "SIGTERM")
    if lost:
        slowest = max((r["exitSeconds"] for r in lost if r["signal"] == "SIGTERM"), default=0.0)
        print(f"SIGKILL loses <= everySteps: {'MET' if kill_ok else 'NOT MET'}; "
              f"SIGTERM loses 0 and exits {EXIT_RETRY}: {'MET' if term_ok else 'NOT MET'}; "
              f"SIGTERM to exit at most {slowest:.1f}s (default grace period {DEFAULT_GRACE_SECONDS}s)")
    print(json.dumps({
        "benchmark": "checkpoint", "machine": machine, "threads": args.threads, "everySteps": default_every,
        "costs": costs, "worstSaveOverhead": worst, "target": TARGET_OVERHEAD, "overheadMet": worst < TARGET_OVERHEAD,
        "signals": lost, "signalSeed": seed, "sigkillMet": kill_ok, "sigtermMet": term_ok,
    }))


if __name__ == "__main__":
    main()
