"""Trainer entrypoints: one process runs the recipe; several are launched with torchrun.

Each worker writes results/rank-<R>.json; the launcher turns them into one exit code and the
JSON the operator reads from /dev/termination-log.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path
from types import FrameType
from typing import Any

from kubetune import contract, telemetry
from kubetune.cpus import usable_cpus
from kubetune.errors import NotImprovedError, PreemptedError, UserError
from kubetune.jobfile import load_job
from kubetune.netutil import free_port
from kubetune.storage import is_s3
from kubetune.train import interrupts
from kubetune.train.quality import finite_numbers

log = logging.getLogger("kubetune.trainer")
TERMINATION_LOG_LIMIT = 4096  # Kubernetes keeps at most 4 KiB of the termination message


def absolute_uri(uri: str) -> str:
    """s3:// as is; a local path made absolute (a pod's working directory means nothing to whoever reads it)."""
    if is_s3(uri):
        return uri
    return str(Path(uri).expanduser().resolve()) + ("/" if uri.endswith("/") else "")


def work_dir_for(name: str) -> Path:
    configured = os.environ.get(contract.ENV_WORK_DIR)
    if configured:
        return Path(configured)
    return Path(os.environ.get(contract.ENV_STATE_DIR, ".kubetune")) / "runs" / name


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is now, so rich's progress bar can redirect log lines above itself."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def setup_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        handlers=[_CurrentStderr()],
        force=True,
    )
    for noisy in ("transformers", "peft", "botocore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight-loading bars would drown the training log
    hf_logging.set_verbosity_error()  # the "newly initialized" load report is expected: the head is new
    # peft calls a transformers API deprecated for v6 on every run; nothing a user can act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def run_worker(spec_path: str, standalone: bool = True) -> int:
    """One training process (plain, or one of torchrun's). Returns its exit code.

    standalone: no launcher waits for us, so giving up after a signal also writes the job's result.
    """
    rank = int(os.environ.get("RANK", "0"))
    setup_logging(rank)
    result: dict[str, Any] = {"rank": rank}
    folder = results_dir(spec_path)

    def give_up(signum: int) -> None:
        # The grace period is spent (a stuck rank, a slow upload): report and leave before SIGKILL does.
        code = interrupts.exit_code(signum)
        message = interrupts.give_up_message(signum)
        _write_result(folder, {**result, "outcome": _outcome(code), "reason": "Preempted", "message": message,
                               "exitCode": code, "failedAt": time.time()})
        if standalone:
            finish(folder)
            print(f"{_outcome(code).lower()}: {message}", file=sys.stderr, flush=True)
        os._exit(code)

    main_thread = threading.current_thread() is threading.main_thread()  # only it may set handlers
    previous = interrupts.install(give_up) if main_thread else {}
    recipe = None
    try:
        job = load_job(spec_path)
        work_dir = work_dir_for(job.metadata.name)
        result["outputUri"] = job.spec.output.uri
        from kubetune.train.recipe import FineTuneRecipe  # torch import stays out of `kubetune validate`

        recipe = FineTuneRecipe(job, work_dir)
        recipe.setup()
        recipe.train()
        result.update(recipe.write_outputs())
        result.update(outcome="Succeeded", exitCode=contract.EXIT_OK)
        telemetry.set_state("done")
    except UserError as exc:  # printed once by whoever launched us, without a traceback
        result.update(outcome="Failed", reason="InvalidInput", message=str(exc), exitCode=contract.EXIT_BAD_INPUT)
        telemetry.set_state("failed")
    except NotImprovedError as exc:  # every rank knows; only the report was published
        result.update(exc.summary, outcome="Failed", reason="NotImproved", message=str(exc),
                      exitCode=contract.EXIT_NOT_IMPROVED)
        telemetry.set_state("failed")
    except PreemptedError as exc:
        if rank == 0 and exc.exit_code == contract.EXIT_RETRY:  # every rank saw it; one line is enough
            log.warning("%s", exc)
        result.update(outcome=_outcome(exc.exit_code), reason="Preempted", message=str(exc), exitCode=exc.exit_code)
    except Exception as exc:
        log.error("training failed on rank %d:\n%s", rank, traceback.format_exc())
        result.update(outcome="Failed", reason=type(exc).__name__, message=str(exc), exitCode=contract.EXIT_FAILURE)
        telemetry.set_state("failed")
    finally:
        if result.get("outcome") != "Succeeded":
            result["failedAt"] = time.time()  # the first failing rank is the cause; see combine_results
        if recipe is not None:
            result.setdefault("lastCheckpoint", recipe.last_checkpoint)
            result.setdefault("step", recipe.state.step)
            result.setdefault("totalSteps", getattr(recipe, "total_steps", None))
            recipe.cleanup()
    for key in ("outputUri", "lastCheckpoint", "reportUri"):  # where they are from anywhere, not from our cwd
        if result.get(key):
            result[key] = absolute_uri(result[key])
    _write_result(folder, result)
    telemetry.stop(linger=True)  # a last scrape sees the final state (KUBETUNE_METRICS_LINGER_SECONDS)
    interrupts.restore(previous)
    code: int = result["exitCode"]
    return code


def _outcome(code: int) -> str:
    return "Interrupted" if code == contract.EXIT_INTERRUPTED else "Preempted"


def _write_result(folder: Path, result: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".rank-{result['rank']}.json.tmp"
    tmp.write_text(json.dumps(result, default=str))
    os.replace(tmp, folder / f"rank-{result['rank']}.json")  # the watchdog and the loop may both write it


def results_dir(spec_path: str) -> Path:
    try:
        name = load_job(spec_path).metadata.name
    except UserError:
        name = "invalid"
    return work_dir_for(name) / "results"


def combine_results(folder: Path) -> dict[str, Any]:
    """Rank 0's result on success; otherwise the most telling failure (bad input > crash > preempted)."""
    results = [json.loads(p.read_text()) for p in sorted(folder.glob("rank-*.json"))]
    if not results:
        return {"outcome": "Failed", "reason": "NoResult", "message": "no trainer process reported a result",
                "exitCode": contract.EXIT_FAILURE}
    failures = [r for r in results if r.get("exitCode") != contract.EXIT_OK]
    if not failures:
        return next((r for r in results if r.get("rank") == 0), results[0])
    order = {contract.EXIT_BAD_INPUT: 0, contract.EXIT_NOT_IMPROVED: 0, contract.EXIT_RETRY: 2,
             contract.EXIT_INTERRUPTED: 2}

    def telling(r: dict[str, Any]) -> tuple[int, float, int]:
        kind = order.get(r["exitCode"], 1)
        # Among crashes the first is the cause: the others failed because its connections closed.
        when = float(r.get("failedAt", float("inf"))) if kind == 1 else 0.0
        return kind, when, int(r.get("rank", 0))

    return min(failures, key=telling)


def final_figures(result: dict[str, Any]) -> dict[str, Any]:
    """The last train loss, the last validation row and the epochs done: what status.metrics should end with."""
    final: dict[str, Any] = {}
    losses = result.get("trainLoss")
    if isinstance(losses, list) and losses and isinstance(losses[-1], dict):
        final["trainLoss"] = losses[-1].get("loss")
    validation = result.get("validation")
    if isinstance(validation, list) and validation and isinstance(validation[-1], dict):
        final["validation"] = finite_numbers({k: v for k, v in validation[-1].items() if k.startswith("eval_")})
    if isinstance(result.get("epochsCompleted"), int | float):
        final["epoch"] = result["epochsCompleted"]
    return finite_numbers(final)


def termination_message(result: dict[str, Any]) -> str:
    keys = ("outcome", "reason", "message", "exitCode", "step", "totalSteps", "lastCheckpoint", "outputUri",
            "reportUri")
    short = {k: result.get(k) for k in keys if result.get(k) is not None}
    for key in ("test", "dryRun"):  # numbers only: the 4 KiB limit
        if isinstance(result.get(key), dict):
            short[key] = finite_numbers({k: v for k, v in result[key].items() if isinstance(v, int | float | bool)})
    if isinstance(result.get("quality"), dict):  # base vs fine-tuned: the operator's Improved condition
        short["quality"] = finite_numbers(result["quality"])
    final = final_figures(result)
    if final:  # the status a job ends with, even when the operator was down for its last scrapes
        short["final"] = final
    text = json.dumps(short)
    while len(text.encode()) > TERMINATION_LOG_LIMIT and short.get("message"):
        message = str(short["message"])
        short["message"] = message[: len(message) // 2] + "..."
        text = json.dumps(short)
    return text


def write_termination_log(result: dict[str, Any], work_dir: Path) -> Path:
    """Kubernetes mounts /dev/termination-log in pods; elsewhere it goes to the work dir."""
    configured = os.environ.get(contract.ENV_TERMINATION_LOG)
    default = Path(contract.TERMINATION_LOG)
    path = Path(configured) if configured else default if default.exists() else work_dir / "termination-log"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(termination_message(result))
    return path


def launch(spec_path: str, nproc_per_node: int, nnodes: int = 1, node_rank: int = 0,
           master_addr: str = "127.0.0.1", master_port: int | None = None) -> None:
    """Run the workers under torchrun; each writes its own result file."""
    shutdown = max(1, int(interrupts.grace_seconds() * interrupts.LAUNCHER_SHARE))
    command = [
        sys.executable, "-m", "kubetune.train.torchrun",
        f"--nnodes={nnodes}", f"--node-rank={node_rank}", f"--nproc-per-node={nproc_per_node}",
        f"--master-addr={master_addr}", f"--master-port={master_port or free_port()}",
        f"--shutdown-timeout={shutdown}",  # torchrun's default (30 s) ignores the pod's grace period
        "-m", "kubetune.train.worker", spec_path,
    ]
    threads = str(max(1, usable_cpus() // nproc_per_node))  # the pod's CPU limit shared by its processes
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", threads)}
    process: subprocess.Popen[bytes] | None = None
    received: list[int] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        # A pod's SIGTERM reaches only this process: torchrun passes it on to the workers, which checkpoint.
        # Only the first: torchrun ignores repeats anyway, and a Ctrl-C already reached it from the terminal.
        if not received and process is not None:
            process.send_signal(signum)
        received.append(signum)

    main_thread = threading.current_thread() is threading.main_thread()  # only it may set handlers
    previous = {s: signal.signal(s, forward) for s in interrupts.SIGNALS} if main_thread else {}
    try:
        process = subprocess.Popen(command, env=env)
        if received:  # arrived while starting it
            process.send_signal(received[0])
        process.wait()  # bounded: torchrun kills the workers after its shutdown timeout
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old if old is not None else signal.SIG_DFL)


def finish(folder: Path) -> dict[str, Any]:
    """The job's result from the rank files, also written where the operator reads it."""
    result = combine_results(folder)
    write_termination_log(result, folder.parent)
    return result


def run(spec_path: str, nproc_per_node: int = 1) -> dict[str, Any]:
    """Train on this node: in-process for one worker, torchrun for several (or several nodes)."""
    nnodes = int(os.environ.get(contract.ENV_NNODES, "1"))
    folder = results_dir(spec_path)
    for old in folder.glob("rank-*.json"):  # a previous attempt's results must not speak for this one
        old.unlink()
    if nproc_per_node * nnodes > 1:
        launch(
            spec_path, nproc_per_node, nnodes,
            node_rank=int(os.environ.get(contract.ENV_NODE_RANK, "0")),
            master_addr=os.environ.get(contract.ENV_MASTER_ADDR, "127.0.0.1"),
            master_port=int(os.environ.get(contract.ENV_MASTER_PORT, "0")) or None,
        )
    else:
        run_worker(spec_path)
    return finish(folder)


def failure_line(result: dict[str, Any]) -> str:
    """What the user reads when a run did not succeed: Ctrl-C's own line, else outcome and message."""
    if result["exitCode"] == contract.EXIT_INTERRUPTED:
        return str(result.get("message"))
    return f"{result['outcome'].lower()}: {result.get('message')}"


def trainer_main(spec_path: str | None) -> int:
    """`kubetune trainer`: the pod entrypoint. Topology comes from the operator's env vars."""
    path = spec_path or os.environ.get(contract.ENV_SPEC_PATH, contract.SPEC_MOUNT_PATH)
    job = load_job(path)  # bad input: exit 2 before any process starts
    if int(os.environ.get(contract.ENV_NODE_RANK, "0")) == 0:
        from kubetune.storage import Storage
        from kubetune.train.outputs import check_output

        check_output(Storage(job.spec.storage), job.spec)  # an output we may not replace: refuse before training
    result = run(path, int(os.environ.get(contract.ENV_NPROC_PER_NODE, "1")))
    if result["exitCode"] != contract.EXIT_OK:
        print(failure_line(result), file=sys.stderr)
    code: int = result["exitCode"]
    return code
