"""Cost of the Prometheus exporter: kubetune's training loop with metrics off vs on, in the same invocation.

Each run is a child process that fine-tunes MiniLM + LoRA on the sample reviews (kubetune defaults, 30 steps,
one epoch), with KUBETUNE_METRICS_PORT=0 (off) or a free port (on). While a run with metrics is going, this
process scrapes its endpoint every second, as a Prometheus with a 1 s scrape interval would (15-30 s is usual).
Runs alternate off/on so that drifting machine load hits both sides alike.

    .venv/bin/python bench/exporter_overhead.py [--repeats 3] [--steps 30] [--threads 2]

It first measures the exporter's own costs in this process (robust to other load): the per-step updates
(`record_step`) and one snapshot push to the server process; `--repeats 0` stops there.

Samples/s = training examples / wall time of `recipe.train()` minus the time inside evaluation and checkpoint
saves: the exporter's per-step updates and its push thread are inside that time. The last line of output is
one JSON object with every figure and the relative difference (target: under 1%).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import _common as common
from trainer_throughput import Stopwatch

TARGET_PERCENT = 1.0


def run_child(config: dict[str, Any]) -> dict[str, Any]:
    from kubetune.jobfile import load_job
    from kubetune.train.entry import setup_logging
    from kubetune.train.recipe import FineTuneRecipe

    setup_logging(0)
    common.set_torch_threads(config["threads"])
    recipe = FineTuneRecipe(load_job(config["job"]), Path(config["workDir"]))
    recipe.setup()
    excluded = Stopwatch()
    recipe._evaluate = excluded.wrap(recipe._evaluate)  # type: ignore[method-assign]
    recipe.save_checkpoint = excluded.wrap(recipe.save_checkpoint)  # type: ignore[method-assign]
    started = time.perf_counter()
    recipe.train()
    loop = time.perf_counter() - started - excluded.seconds
    recipe.cleanup()
    from kubetune import telemetry

    telemetry.stop()
    if recipe.state.resumed_from:
        raise RuntimeError(f"resumed from {recipe.state.resumed_from}: the runs must be independent")
    return {"samples": recipe.state.samples_seen, "steps": recipe.state.step, "trainSeconds": loop,
            "samplesPerSecond": recipe.state.samples_seen / loop, "precision": recipe.precision.name}


def scrape_every_second(port: int, stop: threading.Event, counts: list[int]) -> None:
    while not stop.wait(1.0):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                response.read()
            counts[0] += 1
        except OSError:
            pass  # not up yet (setup) or gone (finished)


def measure(work: Path, job: Path, metrics_on: bool, index: int, threads: int) -> dict[str, Any]:
    from kubetune.netutil import free_port

    port = free_port() if metrics_on else 0
    config = {"job": str(job), "workDir": str(work / f"run-{index}"), "threads": threads}
    config_file = work / f"config-{index}.json"
    config_file.write_text(json.dumps(config))
    result_file = work / f"result-{index}.json"
    env = {**os.environ, "KUBETUNE_METRICS_PORT": str(port), "KUBETUNE_STATE_DIR": str(work / "state")}
    stop, scrapes = threading.Event(), [0]
    scraper = threading.Thread(target=scrape_every_second, args=(port, stop, scrapes), daemon=True)
    if metrics_on:
        scraper.start()
    common.wait_for_quiet(60)
    child = common.run_child([sys.executable, __file__, "--child", str(config_file), str(result_file)],
                             work / f"run-{index}.log", env=env, timeout=900)
    stop.set()
    if child.returncode != 0:
        raise SystemExit(f"run {index} failed:\n{common.log_tail(child.log)}")
    result = common.read_json(result_file)
    return {**result, "metrics": metrics_on, "scrapes": scrapes[0], "otherLoad": child.background_cpu}


def micro() -> dict[str, float]:
    """The exporter's own costs, robust to machine load: one step's updates, and one snapshot push."""
    from kubetune import telemetry
    from kubetune.netutil import free_port

    metrics = telemetry.start("micro", env={"KUBETUNE_METRICS_PORT": str(free_port())}, addr="127.0.0.1")
    calls = 20_000  # CPU time (process_time), not wall time: other processes' load does not inflate it
    started = time.process_time()
    for step in range(1, calls + 1):
        metrics.record_step(step=step, total=calls, epoch=0.5, loss=0.5, learning_rate=1e-4, samples=16,
                            tokens=2048, seconds=0.1)
    record_step = (time.process_time() - started) / calls
    pushes = 2_000
    started = time.process_time()
    for _ in range(pushes):
        telemetry.flush()
    push = (time.process_time() - started) / pushes
    telemetry.stop()
    return {"recordStepMicroseconds": record_step * 1e6, "pushMilliseconds": push * 1e3,
            "pushSeconds": telemetry.PUSH_SECONDS, "pushCpuShare": push / telemetry.PUSH_SECONDS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    common.setup_env(args.threads)
    if args.child:
        config = json.loads(Path(args.child[0]).read_text())
        Path(args.child[1]).write_text(json.dumps(run_child(config)))
        return

    print(json.dumps(common.machine()), flush=True)
    costs = micro()
    print(f"record_step {costs['recordStepMicroseconds']:.1f} us per optimizer step; one snapshot push "
          f"{costs['pushMilliseconds']:.3f} ms every {costs['pushSeconds']:g} s = {100 * costs['pushCpuShare']:.2f}% "
          "of one core", flush=True)
    if args.repeats == 0:
        print(json.dumps({"machine": common.machine(), **costs}))
        return
    with tempfile.TemporaryDirectory(prefix="kubetune-exporter-bench-") as tmp:
        work = Path(tmp)
        runs: list[dict[str, Any]] = []
        for _ in range(args.repeats):
            for on in (False, True):
                # Each run its own output (and checkpoints): a later run must not resume an earlier one.
                doc = common.job_document(
                    "exporter-bench", common.sample_path(common.REVIEWS), work / f"out-{len(runs)}",
                    method={"type": "lora"}, hyperparameters={"maxSteps": args.steps, "batchSize": 16},
                    checkpoint={"everySteps": 100_000})
                job = common.write_yaml(doc, work / f"job-{len(runs)}.yaml")
                run = measure(work, job, on, len(runs), args.threads)
                runs.append(run)
                print(f"  metrics {'on ' if on else 'off'}  {run['samplesPerSecond']:7.2f} samples/s  "
                      f"({run['scrapes']} scrapes, other load {100 * run['otherLoad']:.0f}%)", flush=True)
    off = statistics.median(r["samplesPerSecond"] for r in runs if not r["metrics"])
    on = statistics.median(r["samplesPerSecond"] for r in runs if r["metrics"])
    cost = 100 * (off - on) / off
    print(common.table(["exporter", "samples/s (median)", "runs"],
                       [["off (KUBETUNE_METRICS_PORT=0)", off, args.repeats],
                        ["on, scraped every 1 s", on, args.repeats]]))
    step_seconds = statistics.median(r["trainSeconds"] / r["steps"] for r in runs if not r["metrics"])
    bound = 100 * (costs["recordStepMicroseconds"] * 1e-6 / step_seconds + costs["pushCpuShare"])
    print(f"cost {cost:+.2f}% end to end (target < {TARGET_PERCENT}%), precision {runs[0]['precision']}; "
          f"the exporter's own work is {bound:.3f}% of a {step_seconds * 1e3:.0f} ms step")
    print(json.dumps({"machine": common.machine(), "offSamplesPerSecond": off, "onSamplesPerSecond": on,
                      "costPercent": cost, "boundPercent": bound, "targetPercent": TARGET_PERCENT, **costs,
                      "runs": runs}))


if __name__ == "__main__":
    main()
