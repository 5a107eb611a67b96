"""`kubetune run`: the same manifest a cluster runs, on this machine, with a summary at the end."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from kubetune import contract
from kubetune.jobfile import load_job
from kubetune.preflight import check_local_inputs, resolve_local
from kubetune.spec import DryRunSpec, FineTuneJob
from kubetune.storage import Storage
from kubetune.train.outputs import check_output, metric_rows
from kubetune.train.quality import describe, warning


def resolve_paths(job: FineTuneJob, manifest_file: str | Path) -> FineTuneJob:
    """Relative local paths are relative to the manifest, as a user reading it would expect."""
    spec = job.spec

    def fix(uri: str | None) -> str | None:
        return None if uri is None else resolve_local(uri, manifest_file)

    data = spec.data.model_copy(update={k: fix(getattr(spec.data, k)) for k in ("train", "validation", "test")})
    updated = spec.model_copy(update={
        "model": spec.model.model_copy(update={"uri": fix(spec.model.uri)}),
        "data": data,
        "output": spec.output.model_copy(update={"uri": fix(spec.output.uri)}),
        "checkpoint": spec.checkpoint.model_copy(update={"uri": fix(spec.checkpoint.uri)}),
    })
    return job.model_copy(update={"spec": updated})


def write_resolved(job: FineTuneJob, work_dir: Path) -> Path:
    work_dir.mkdir(parents=True, exist_ok=True)
    path = work_dir / "job.yaml"
    path.write_text(yaml.safe_dump(job.model_dump(mode="json", by_alias=True, exclude_none=True), sort_keys=False))
    return path


def summary_table(result: dict[str, Any]) -> Table:
    table = Table(title="test split: base model vs fine-tuned")
    table.add_column("metric")
    table.add_column("base", justify="right")
    table.add_column("fine-tuned", justify="right")
    table.add_column("difference", justify="right")
    for row in metric_rows(result.get("baseTest"), result.get("test")):
        table.add_row(*row)
    return table


def state_dir_for(manifest_file: str | Path) -> Path:
    """Where `kubetune run` keeps its state: $KUBETUNE_STATE_DIR, else .kubetune/ beside the manifest."""
    configured = os.environ.get(contract.ENV_STATE_DIR)
    return Path(configured) if configured else Path(manifest_file).resolve().parent / ".kubetune"


@contextmanager
def _state_dir(path: Path) -> Iterator[None]:
    """The trainer (in this process or torchrun's) finds its work dir through the environment."""
    saved = os.environ.get(contract.ENV_STATE_DIR)
    os.environ[contract.ENV_STATE_DIR] = str(path)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(contract.ENV_STATE_DIR, None)
        else:
            os.environ[contract.ENV_STATE_DIR] = saved


def run_manifest(file: str, nproc_per_node: int = 1, embedded_s3: bool = False, dry_run: bool = False) -> int:
    with _state_dir(state_dir_for(file)):
        return _run_manifest(file, nproc_per_node, embedded_s3, dry_run)


def _run_manifest(file: str, nproc_per_node: int, embedded_s3: bool, dry_run: bool) -> int:
    from kubetune.train.entry import failure_line, run, work_dir_for

    loaded = load_job(file)
    check_local_inputs(loaded.spec, file)  # messages name the manifest's own paths and where they resolve
    job = resolve_paths(loaded, file)
    if dry_run and job.spec.dry_run is None:  # --dry-run: the spec's own dryRun settings win when it has them
        job = job.model_copy(update={"spec": job.spec.model_copy(update={"dry_run": DryRunSpec()})})
    console = Console(stderr=False)
    work_dir = work_dir_for(job.metadata.name)
    if embedded_s3:
        from kubetune.storage.embedded import embedded_s3 as serve
        from kubetune.storage.embedded import list_objects, local_copy_spec, save_local_copy

        copy_spec = local_copy_spec(job, work_dir.parent.parent)  # refuse a foreign folder before training
        with serve(job, work_dir.parent.parent, Path(file)) as s3_job:
            console.print(f"embedded S3 at {s3_job.spec.storage.endpoint}; output -> {s3_job.spec.output.uri}")
            result = run(str(write_resolved(s3_job, work_dir)), nproc_per_node)
            if result["exitCode"] == contract.EXIT_OK:
                objects = list_objects(s3_job.spec.storage, s3_job.spec.output.uri)
                for key, size in objects:
                    console.print(f"  {key}  ({size:,} bytes)")
                if not result.get("dryRun"):  # The server's volume files are no place to leave a model.
                    copy = save_local_copy(s3_job, copy_spec)
                    console.print(f"verified copy of the output in {copy}", soft_wrap=True)  # stays copyable
    else:
        check_output(Storage(job.spec.storage), job.spec)  # refuse before training, not after it
        result = run(str(write_resolved(job, work_dir)), nproc_per_node)
    code: int = result["exitCode"]
    if code == contract.EXIT_NOT_IMPROVED:  # the numbers that decided it, then why nothing was published
        console.print(summary_table(result))
    if code != contract.EXIT_OK:
        print(failure_line(result), file=sys.stderr)
        return code
    if result.get("alreadyFinished"):  # the trainer said so in one line; the output is as it was
        return code
    if result.get("dryRun"):
        from kubetune.train import dryrun

        console.print(dryrun.describe(result["dryRun"]), soft_wrap=True)
        console.print(f"report: {result['outputUri']}", soft_wrap=True)
        return code
    console.print(summary_table(result))
    if isinstance(result.get("test"), dict) and "confusion_matrix" in result["test"]:
        console.print(f"confusion matrix (rows = true, columns = predicted, {job.spec.model.labels}): "
                      f"{result['test']['confusion_matrix']}")
    console.print(f"steps {result.get('steps')}/{result.get('totalSteps')}, best step {result.get('bestStep')}, "
                  f"{result.get('trainSamplesPerSecond', 0):.1f} samples/s")
    console.print(f"training curves: {result['outputUri'].rstrip('/')}/{contract.CURVES_FILE}")
    console.print(f"[bold green]model written to {result['outputUri']}[/] (manifest.json lists every file)",
                  soft_wrap=True)
    verdict = result.get("quality")
    if verdict:  # the last lines: base, fine-tuned and the difference for the metric that judges the model
        console.print(describe(verdict) + (" [green]better than the base[/]" if verdict["improved"] else ""),
                      soft_wrap=True, highlight=False)
        if warning(verdict):
            console.print(f"[bold yellow]{warning(verdict)}[/]", soft_wrap=True, highlight=False)
    return code
