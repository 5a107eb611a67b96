"""`kubetune run`: the same manifest a cluster runs, on this machine, with a summary at the end."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from kubetune import contract
from kubetune.jobfile import load_job
from kubetune.preflight import check_local_inputs, resolve_local
from kubetune.spec import FineTuneJob
from kubetune.train.outputs import metric_rows


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
    for row in metric_rows(result.get("baseTest"), result.get("test")):
        table.add_row(*row)
    return table


def run_manifest(file: str, nproc_per_node: int = 1, embedded_s3: bool = False) -> int:
    from kubetune.train.entry import run, work_dir_for

    job = resolve_paths(load_job(file), file)
    check_local_inputs(job.spec)
    console = Console(stderr=False)
    work_dir = work_dir_for(job.metadata.name)
    if embedded_s3:
        from kubetune.storage.embedded import embedded_s3 as serve
        from kubetune.storage.embedded import list_objects

        with serve(job, work_dir.parent.parent, Path(file)) as s3_job:
            console.print(f"embedded S3 at {s3_job.spec.storage.endpoint}; output -> {s3_job.spec.output.uri}")
            result = run(str(write_resolved(s3_job, work_dir)), nproc_per_node)
            if result["exitCode"] == contract.EXIT_OK:
                objects = list_objects(s3_job.spec.storage, s3_job.spec.output.uri)
                for key, size in objects:
                    console.print(f"  {key}  ({size:,} bytes)")
    else:
        result = run(str(write_resolved(job, work_dir)), nproc_per_node)
    code: int = result["exitCode"]
    if code != contract.EXIT_OK:
        print(f"{result['outcome'].lower()}: {result.get('message')}", file=sys.stderr)
        return code
    console.print(summary_table(result))
    if isinstance(result.get("test"), dict) and "confusion_matrix" in result["test"]:
        console.print(f"confusion matrix (rows = true, columns = predicted, {job.spec.model.labels}): "
                      f"{result['test']['confusion_matrix']}")
    console.print(f"steps {result.get('steps')}/{result.get('totalSteps')}, best step {result.get('bestStep')}, "
                  f"{result.get('trainSamplesPerSecond', 0):.1f} samples/s")
    console.print(f"training curves: {result['outputUri'].rstrip('/')}/{contract.CURVES_FILE}")
    console.print(f"[bold green]model written to {result['outputUri']}[/] (manifest.json lists every file)")
    return code
