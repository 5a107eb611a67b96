"""`kubetune sweep FILE`: a FineTuneSweep on this machine. Each trial is a `kubetune run` of its own manifest in a
process of its own, followed as the operator follows a trial: its validation metric read from its metrics
endpoint (the median rule stops it with SIGTERM), its result from its metrics.json once it has ended."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from kubetune import contract
from kubetune.cpus import usable_cpus
from kubetune.jobfile import write_job
from kubetune.netutil import free_port
from kubetune.preflight import resolve_local
from kubetune.runner import state_dir_for
from kubetune.spec import StorageSpec
from kubetune.storage import Storage, join_uri
from kubetune.sweep import report, search
from kubetune.sweep.spec import SWEEP_API_VERSION, Sweep, finite, load_sweep

POLL_SECONDS = 0.5
STOP_SECONDS = 60  # a pruned trial checkpoints on SIGTERM; past this it is killed
SUMMARY_DIR = "summary"  # <output.uri>/summary/: sweep.json, sweep.png, manifest.json


@dataclass
class Trial:
    record: dict[str, Any]
    process: subprocess.Popen[bytes]
    url: str
    started: float
    stopping: float | None = None  # when a pruned trial was sent SIGTERM


def new_record(sweep: Sweep, index: int, parameters: dict[str, Any]) -> dict[str, Any]:
    return {"name": sweep.trial_name(index), "index": index, "parameters": parameters, "state": "Running"}


def trial_document(sweep: Sweep, index: int, parameters: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": SWEEP_API_VERSION, "kind": contract.KIND,
            "metadata": {"name": sweep.trial_name(index), "labels": {contract.LABEL_SWEEP: sweep.name}},
            "spec": sweep.trial_spec(index, parameters)}


def _resolved(sweep: Sweep, manifest: str) -> Sweep:
    """Relative local paths are relative to the sweep's manifest, as for `kubetune run`."""
    template = json.loads(json.dumps(sweep.template))
    for section, key in (("model", "uri"), ("data", "train"), ("data", "validation"), ("data", "test"),
                         ("output", "uri"), ("checkpoint", "uri")):
        if (template.get(section) or {}).get(key):
            template[section][key] = resolve_local(template[section][key], manifest)
    return Sweep(sweep.resource, template)


def scrape(url: str, metric: str) -> tuple[int | None, float | None]:
    """(step, the objective's latest validation value) from a trial's metrics endpoint; (None, None) when down."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return None, None
    step = value = None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == contract.METRIC_STEP:
                step = int(sample.value)
            elif (sample.name, sample.labels.get("metric")) == _series(metric):
                value = finite(sample.value)
    return step, value


def _series(metric: str) -> tuple[str, str | None]:
    """The trainer's gauge for a validation metric: eval_loss has its own, the others share one by label."""
    if metric == "eval_loss":
        return contract.METRIC_EVAL_LOSS, None
    return contract.METRIC_EVAL, metric.removeprefix("eval_")


class LocalSweep:
    def __init__(self, sweep: Sweep, state: Path, at_once: int, console: Console) -> None:
        self.sweep, self.spec, self.state, self.console = sweep, sweep.spec, state, console
        self.at_once = at_once
        self.records: list[dict[str, Any]] = []
        self.running: dict[str, Trial] = {}
        self.storage = Storage(StorageSpec.model_validate(sweep.template.get("storage") or {}))

    def run(self) -> dict[str, Any]:
        while True:
            self._launch()
            if not self.running:
                break
            time.sleep(POLL_SECONDS)
            for name, trial in list(self.running.items()):
                code = trial.process.poll()
                if code is None:
                    self._follow(trial)
                    continue
                del self.running[name]
                self._finish(trial, code)
                self.console.print(report.row(trial.record, self.spec.objective_metric()), soft_wrap=True,
                                   highlight=False)
        best = search.best_trial(self.spec, self.records)
        return report.summary(self.sweep, self.records, best)

    def _launch(self) -> None:
        while len(self.running) < self.at_once:
            parameters = search.next_parameters(self.spec, self.records)
            if parameters is None:
                return
            index = len(self.records)
            record = new_record(self.sweep, index, parameters)
            self.records.append(record)
            manifest = write_job(trial_document(self.sweep, index, parameters),
                                 self.state / "trials" / f"{record['name']}.yaml")
            port = free_port()
            threads = max(1, usable_cpus() // self.at_once)  # trials at once share this machine's cores
            env = {**os.environ, contract.ENV_STATE_DIR: str(self.state), contract.ENV_METRICS_PORT: str(port),
                   "OMP_NUM_THREADS": str(threads)}
            log = (self.state / "trials" / f"{record['name']}.log").open("wb")
            command = [sys.executable, "-m", "kubetune.cli", "run", str(manifest)]
            process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
            self.running[record["name"]] = Trial(record, process, f"http://127.0.0.1:{port}/metrics", time.monotonic())
            self.console.print(f"{record['name']}: started  " + ", ".join(f"{p}={v}" for p, v in parameters.items()),
                               highlight=False)

    def _follow(self, trial: Trial) -> None:
        record = trial.record
        if trial.stopping is not None:
            if time.monotonic() - trial.stopping > STOP_SECONDS:
                trial.process.kill()
            return
        step, value = scrape(trial.url, self.spec.objective_metric())
        if step is not None:
            record["steps"] = step
        every = self.sweep.resource.spec.template.evaluation.every_steps
        if not search.observe(record, step, value, every):
            return
        why = search.should_prune(self.spec, self.records, record)
        if why:
            record.update(state="Pruned", message=why)
            trial.process.send_signal(signal.SIGTERM)  # it checkpoints and stops; its resources are free
            trial.stopping = time.monotonic()

    def _finish(self, trial: Trial, code: int) -> None:
        record = trial.record
        record["seconds"] = round(time.monotonic() - trial.started, 1)
        ended = _termination(self.state / "runs" / record["name"] / "termination-log")
        if isinstance(ended.get("step"), int):
            record["steps"] = ended["step"]
        record["outputUri"] = ended.get("outputUri")
        if record["state"] == "Pruned":
            return
        if code != contract.EXIT_OK:
            record.update(state="Failed", message=str(ended.get("message") or f"exit code {code}")[:300])
            return
        metrics = self._metrics(record["outputUri"])
        record.update(state="Succeeded", objective=finite(metrics.get("bestMetric")), steps=metrics.get("steps"),
                      test={k: v for k, v in (metrics.get("test") or {}).items() if finite(v) is not None})
        metric = self.spec.objective_metric()  # the exact curve, every evaluation, from the run's own record
        record["curve"] = [[row["step"], row[metric]] for row in metrics.get("validation") or []
                           if finite(row.get(metric)) is not None]

    def _metrics(self, output: str) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="kubetune-sweep-") as tmp:
            path = self.storage.fetch(join_uri(output, contract.METRICS_FILE), Path(tmp) / contract.METRICS_FILE)
            found: dict[str, Any] = json.loads(path.read_text())
            return found

    def publish(self, result: dict[str, Any]) -> str:
        """sweep.json and the PNG under <output.uri>/summary/ (manifest.json last, as for a model)."""
        uri = join_uri(self.sweep.template["output"]["uri"], SUMMARY_DIR)
        with tempfile.TemporaryDirectory(prefix="kubetune-sweep-") as tmp:
            report.save(Path(tmp), result)
            self.storage.publish(Path(tmp), uri, extra={"kind": "sweep"})
        return uri


def _termination(path: Path) -> dict[str, Any]:
    try:
        found: dict[str, Any] = json.loads(path.read_text())
        return found
    except (OSError, ValueError):
        return {}


def run_sweep(file: str, parallel: int | None = None) -> int:
    sweep = _resolved(load_sweep(file), file)
    console = Console()
    spec = sweep.spec
    console.print(f"sweep {sweep.name}: {spec.trial_count()} trials ({spec.algorithm}, seed {spec.seed}), "
                  f"{spec.goal()} {spec.objective_metric()} on the validation split", highlight=False)
    local = LocalSweep(sweep, state_dir_for(file) / "sweeps" / sweep.name, parallel or spec.parallelism, console)
    try:
        result = local.run()
    finally:
        for trial in local.running.values():  # Ctrl-C: no trial left running behind us
            trial.process.terminate()
    uri = local.publish(result)
    console.print(report.table(result))
    best = result["best"]
    console.print(f"summary: {join_uri(uri, contract.SWEEP_FILE)} and {contract.SWEEP_PLOT}", soft_wrap=True)
    if best is None:
        console.print("[bold red]no trial succeeded[/]")
        return contract.EXIT_FAILURE
    console.print(f"[bold green]best: {best['name']}[/] {spec.objective_metric()} {best['objective']:.4g}; "
                  f"model in {best.get('outputUri')}", soft_wrap=True, highlight=False)
    return contract.EXIT_OK
