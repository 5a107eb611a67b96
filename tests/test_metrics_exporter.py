"""The trainer exporter on its own: names and labels, ranks, non-finite values, ports, a starved trainer."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubetune import contract, telemetry
from kubetune.cli import main
from kubetune.errors import UserError
from kubetune.jobfile import write_job
from kubetune.netutil import free_port
from tests.fixtures_models import causal_job, classification_job
from tests.fixtures_prometheus import prometheus_binary
from tests.trainer_runs import Trainer, split_instructions, wait


@pytest.fixture(autouse=True)
def _stop_exporter() -> Iterator[None]:
    yield
    telemetry.stop()


def scrape(url: str, timeout: float = 5) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return str(response.read().decode())


def served(expected: str, timeout: float = 5) -> str:
    """Scrape until `expected` is in the text: flush() hands the snapshot to the server process, which
    serves it once it has read the pipe."""
    deadline = time.monotonic() + timeout
    while expected not in (text := scrape(telemetry.endpoint())) and time.monotonic() < deadline:
        time.sleep(0.05)
    return text


def series(text: str) -> dict[str, float]:
    """'name{labels}' -> value for every sample line."""
    lines = [line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#")]
    return {key: float(value) for key, value in lines}


def test_imports_without_torch() -> None:
    code = "import sys, kubetune.telemetry, kubetune.telemetry_server; assert 'torch' not in sys.modules, 'torch'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_rank_zero_serves_every_contract_series_labelled_and_promtool_is_quiet() -> None:
    port = free_port()
    metrics = telemetry.start("reviews", "ml", env={contract.ENV_METRICS_PORT: str(port)}, addr="127.0.0.1")
    metrics.set_total_steps(10, 0)
    metrics.record_step(step=1, total=10, epoch=0.1, loss=0.7, learning_rate=1e-3, samples=16, tokens=512,
                        seconds=0.2)
    metrics.record_evaluation({"eval_loss": 0.6, "eval_accuracy": 0.8}, "eval")
    metrics.record_checkpoint(1, 0.5)
    telemetry.add_downloaded(1000)
    telemetry.add_uploaded(10)
    telemetry.flush()
    text = served(contract.METRIC_EVAL)
    values = series(text)
    names = {key.split("{")[0] for key in values}
    for name in (v for k, v in vars(contract).items() if k.startswith("METRIC_") and "_OP_" not in k):
        histogram = name in (contract.METRIC_STEP_SECONDS, contract.METRIC_CHECKPOINT_SECONDS)
        assert (name + "_count" if histogram else name) in names, name
    assert all('job="reviews"' in key and 'namespace="ml"' in key for key in values)
    assert values['kubetune_step_duration_seconds_count{job="reviews",namespace="ml",rank="0"}'] == 1
    assert values['kubetune_eval_metric{job="reviews",metric="accuracy",namespace="ml"}'] == 0.8
    assert values['kubetune_tokens_total{job="reviews",namespace="ml"}'] == 512
    assert values['kubetune_storage_downloaded_bytes_total{job="reviews",namespace="ml"}'] == 1000
    states = {k: v for k, v in values.items() if k.startswith(contract.METRIC_STATE + "{")}
    assert len(states) == len(contract.TRAINER_STATES) and sum(states.values()) == 1
    assert values['kubetune_state{job="reviews",namespace="ml",state="setup"}'] == 1
    checked = subprocess.run([prometheus_binary("promtool"), "check", "metrics"], input=text, capture_output=True,
                             text=True, timeout=60)
    assert checked.returncode == 0 and not (checked.stdout + checked.stderr).strip(), checked.stdout + checked.stderr


def test_other_ranks_serve_only_their_own_series_on_the_next_port() -> None:
    base = free_port()
    metrics = telemetry.start("reviews", "ml", rank=3, local_rank=1, env={contract.ENV_METRICS_PORT: str(base - 1)},
                              addr="127.0.0.1")
    metrics.record_step(step=1, total=10, epoch=0.1, loss=0.7, learning_rate=1e-3, samples=16, tokens=512,
                        seconds=0.2)
    telemetry.flush()
    assert telemetry.endpoint() == f"http://127.0.0.1:{base}/metrics"
    names = {key.split("{")[0] for key in series(served(contract.METRIC_MEMORY_PEAK))}
    assert names == {f"{contract.METRIC_STEP_SECONDS}_{s}" for s in ("bucket", "count", "sum", "created")} | {
        contract.METRIC_MEMORY, contract.METRIC_MEMORY_PEAK}
    assert all('rank="3"' in key for key in series(scrape(telemetry.endpoint())))


def test_non_finite_losses_are_exported_as_such() -> None:
    metrics = telemetry.start("nan", env={contract.ENV_METRICS_PORT: str(free_port())}, addr="127.0.0.1")
    metrics.record_step(step=1, total=2, epoch=0.5, loss=float("nan"), learning_rate=1e-3, samples=1, tokens=1,
                        seconds=0.1)
    telemetry.flush()
    assert 'kubetune_train_loss{job="nan",namespace="local"} NaN' in served('namespace="local"} NaN')
    metrics.record_step(step=2, total=2, epoch=1.0, loss=float("-inf"), learning_rate=1e-3, samples=1, tokens=1,
                        seconds=0.1)
    metrics.record_evaluation({"eval_loss": float("inf")}, "eval")
    telemetry.flush()
    text = served('namespace="local"} -Inf')
    assert 'kubetune_train_loss{job="nan",namespace="local"} -Inf' in text
    assert 'kubetune_eval_loss{job="nan",namespace="local"} +Inf' in text


def test_a_state_change_is_served_at_once_not_at_the_next_push() -> None:
    """Periodic pushes are PUSH_SECONDS apart; three transitions in a row each show within 0.3 s. Before, a short
    phase could pass unseen (a CI run's Prometheus test once saw no scrape in the training state)."""
    metrics = telemetry.start("states", env={contract.ENV_METRICS_PORT: str(free_port())}, addr="127.0.0.1")
    assert telemetry.PUSH_SECONDS >= 1.0  # else this proves nothing
    for state in ("evaluating", "training", "uploading"):
        metrics.set_state(state)
        expected = f'{contract.METRIC_STATE}{{job="states",namespace="local",state="{state}"}} 1.0'
        assert expected in served(expected, timeout=0.3), state


def test_port_zero_turns_the_endpoint_off_and_updates_still_work() -> None:
    metrics = telemetry.start("off", env={contract.ENV_METRICS_PORT: "0"})
    metrics.record_step(step=1, total=1, epoch=1.0, loss=0.1, learning_rate=0.0, samples=1, tokens=1, seconds=0.1)
    assert telemetry.endpoint() == ""


@pytest.mark.parametrize("value", ["abc", "-1", "70000"])
def test_bad_port_values_name_the_variable(value: str) -> None:
    with pytest.raises(UserError, match=contract.ENV_METRICS_PORT):
        telemetry.start("bad", env={contract.ENV_METRICS_PORT: value})


def test_default_port_in_use_warns_once_and_runs_without_the_endpoint(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        monkeypatch.setattr(contract, "DEFAULT_METRICS_PORT", busy.getsockname()[1])
        with caplog.at_level(logging.WARNING, logger="kubetune.trainer"):
            metrics = telemetry.start("busy", env={})
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "not available" in warnings[0].getMessage()
        assert contract.ENV_METRICS_PORT in warnings[0].getMessage()
        assert telemetry.endpoint() == ""
        metrics.record_step(step=1, total=1, epoch=1.0, loss=0.1, learning_rate=0.0, samples=1, tokens=1,
                            seconds=0.1)


def test_explicit_port_in_use_fails_the_run_with_exit_2_and_writes_nothing(
        tmp_path: Path, minilm_path: Path, reviews_subset: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    job = write_job(classification_job("busy-port", minilm_path, reviews_subset, out), tmp_path / "job.yaml")
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        monkeypatch.setenv(contract.ENV_METRICS_PORT, str(port))
        monkeypatch.setenv(contract.ENV_STATE_DIR, str(tmp_path / "state"))
        assert main(["run", str(job)]) == contract.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"{contract.ENV_METRICS_PORT}={port}: metrics port {port} is not available" in err
    assert "Traceback" not in err
    assert not out.exists()


def test_endpoint_answers_while_the_trainer_holds_the_gil(tmp_path: Path) -> None:
    """The trainer process runs one long C call that never releases the GIL; every scrape still answers fast."""
    port = free_port()
    script = (
        "import sys, time; from kubetune import telemetry\n"
        f"m = telemetry.start('busy', env={{'{contract.ENV_METRICS_PORT}': '{port}'}}, addr='127.0.0.1')\n"
        "m.record_step(step=1, total=2, epoch=0.5, loss=0.5, learning_rate=0.1, samples=1, tokens=1, seconds=1)\n"
        "telemetry.flush(); print('ready', flush=True)\n"
        "deadline = time.monotonic() + 4\n"
        "while time.monotonic() < deadline: sum(range(30_000_000))  # C loop: holds the GIL for ~0.5-1 s each\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    assert process.stdout is not None and process.stdout.readline().strip() == b"ready"
    latencies = []
    # Scrape for 3 of the child's 4 busy seconds: a scrape in flight when the child exits would be cut off
    # by its exporter shutting down, which says nothing about latency.
    stop = time.monotonic() + 3
    while time.monotonic() < stop:
        started = time.monotonic()
        text = scrape(f"http://127.0.0.1:{port}/metrics", timeout=5)
        latencies.append(time.monotonic() - started)
        assert 'kubetune_step{job="busy",namespace="local"} 1.0' in text
        time.sleep(0.1)
    assert process.wait() == 0
    assert len(latencies) >= 10 and max(latencies) < 0.5, latencies


def test_every_rank_of_a_torchrun_job_serves_its_series(tmp_path: Path, tiny_gpt2: Path) -> None:
    data = split_instructions(tmp_path / "data")
    doc = causal_job("two-ranks", tiny_gpt2, data["train"], tmp_path / "out",
                     hyperparameters={"maxSteps": 4, "batchSize": 8, "precision": "fp32"})
    base = free_port()
    while True:  # two free ports in a row: rank 1 serves on base + 1
        with socket.socket() as probe:
            try:
                probe.bind(("0.0.0.0", base + 1))
                break
            except OSError:
                base = free_port()

    class Observed(Trainer):
        def env(self) -> dict[str, str]:
            return {**super().env(), contract.ENV_METRICS_PORT: str(base), contract.ENV_METRICS_LINGER: "4"}

    trainer = Observed(write_job(doc, tmp_path / "job.yaml"), tmp_path / "state", nproc=2)
    process = trainer.start()
    seen: dict[int, str] = {}
    while process.poll() is None and len(seen) < 2:
        for rank in (0, 1):
            try:
                text = scrape(f"http://127.0.0.1:{base + rank}/metrics", timeout=2)
            except OSError:
                continue
            if 'state="done"} 1.0' in text or (rank == 1 and "_count" in text and " 4.0" in text):
                seen[rank] = text
        time.sleep(0.2)
    assert wait(process, 300) == 0, trainer.log.read_text()[-3000:]
    assert set(seen) == {0, 1}, trainer.log.read_text()[-3000:]
    rank0, rank1 = series(seen[0]), series(seen[1])
    assert rank0['kubetune_step_duration_seconds_count{job="two-ranks",namespace="local",rank="0"}'] == 4
    assert rank1['kubetune_step_duration_seconds_count{job="two-ranks",namespace="local",rank="1"}'] == 4
    assert rank0['kubetune_step{job="two-ranks",namespace="local"}'] == 4
    assert not any(key.startswith(contract.METRIC_STEP + "{") for key in rank1)  # job-level: rank 0 only
    assert rank1['kubetune_device_memory_bytes{job="two-ranks",namespace="local",rank="1"}'] > 0
    assert json.loads(trainer.termination_log.read_text())["outcome"] == "Succeeded"


def test_curves_png_survives_non_finite_losses(tmp_path: Path) -> None:
    from kubetune.train.curves import write_curves

    metrics = {"metric": "eval_accuracy", "bestStep": 2,
               "trainLoss": [{"step": 1, "loss": 0.7}, {"step": 2, "loss": float("nan")}, {"step": 3, "loss": 0.5}],
               "validation": [{"step": 2, "eval_loss": float("inf"), "eval_accuracy": 0.6},
                              {"step": 3, "eval_loss": 0.5, "eval_accuracy": 0.7}]}
    path = write_curves(tmp_path / contract.CURVES_FILE, metrics)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_loss_or_eta_series_before_there_is_one() -> None:
    """Absent means absent: a 0 loss before the first step reads as a perfect loss (issue 26)."""
    from prometheus_client import generate_latest

    metrics = telemetry.TrainerMetrics("fresh", "ml")
    names = {contract.METRIC_TRAIN_LOSS, contract.METRIC_EVAL_LOSS, contract.METRIC_ETA}
    fresh = generate_latest(metrics.registry).decode()
    assert [line for line in fresh.splitlines() if line.split("{")[0] in names] == []
    metrics.record_step(step=1, total=10, epoch=0.1, loss=0.7, learning_rate=1e-3, samples=8, tokens=64, seconds=0.5)
    trained = generate_latest(metrics.registry).decode()
    assert f'{contract.METRIC_TRAIN_LOSS}{{job="fresh",namespace="ml"}} 0.7' in trained
    assert contract.METRIC_ETA + "{" in trained and contract.METRIC_EVAL_LOSS + "{" not in trained
    metrics.record_evaluation({"eval_loss": 0.9}, "eval")
    evaluated = generate_latest(metrics.registry).decode()
    assert f'{contract.METRIC_EVAL_LOSS}{{job="fresh",namespace="ml"}} 0.9' in evaluated
