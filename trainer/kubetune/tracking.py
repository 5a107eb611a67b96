"""spec.tracking.mlflow: the run recorded in MLflow, through its skinny client (`pip install kubetune[tracking]`).

Rank 0 only. Parameters are the resolved spec, flattened; metrics every step (train loss, learning rate) and every
evaluation (eval_*), then the base and fine-tuned test metrics; tags name the job, its namespace, the base model
and data sha256 and the kubetune version; artifacts are the model card, run.json, metrics.json and the curves.
A restarted trainer goes on with the same MLflow run (found by its job and checkpoint identity). Tracking is a
passenger: any failure (no package, no server, a refusal) is logged once and tracking stops; training goes on.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from kubetune import contract
from kubetune.compare import flatten
from kubetune.spec import FineTuneJob, MlflowSpec

log = logging.getLogger("kubetune.tracking")
FLUSH_SECONDS = 5.0  # step metrics go in batches: one request per few seconds, not per step
ARTIFACTS = (contract.MODEL_CARD, contract.RUN_FILE, contract.METRICS_FILE, contract.CURVES_FILE)
# A tracking server that does not answer must not hold training for MLflow's default minutes of retries.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
TAG_RUN = "kubetune.run"  # namespace/job/identity: a restart's run is this one
TAG_PARENT = "kubetune.parent"  # on a parent run: the name its children were given


class Tracker:
    """One MLflow run; every method is a no-op once anything has failed (or when nothing is configured)."""

    def __init__(self, spec: MlflowSpec | None) -> None:
        self.spec = spec
        self.client: Any = None
        self.run_id: str | None = None
        self.pending: list[Any] = []
        self.flushed = time.monotonic()
        self.finished = False

    @property
    def active(self) -> bool:
        return self.run_id is not None

    def _guard(self, what: str, action: Any) -> Any:
        """Run one MLflow call; on any failure say so once and stop tracking."""
        if self.spec is None:
            return None
        try:
            return action()
        except Exception as exc:  # tracking never fails a training run, whatever the client raises
            log.warning("MLflow tracking at %s stopped (%s: %s); training goes on", self.spec.uri, what,
                        str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__)
            self.spec, self.run_id = None, None
            return None

    def start(self, job: FineTuneJob, identity: str, tags: dict[str, str]) -> None:
        self._guard("start", lambda: self._start(job, identity, tags))

    def _start(self, job: FineTuneJob, identity: str, tags: dict[str, str]) -> None:
        for name, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
        try:
            from mlflow.entities import Param
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise ImportError("MLflow's client is not installed: pip install 'kubetune[tracking]'") from None

        assert self.spec is not None
        self.client = MlflowClient(tracking_uri=self.spec.uri)
        experiment = self._experiment()
        key = f"{job.metadata.namespace or 'local'}/{job.metadata.name}/{identity}"
        found = self.client.search_runs([experiment], filter_string=f"tags.`{TAG_RUN}` = '{key}'", max_results=1)
        if found:  # a restart: the same run goes on
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            return
        run_tags = {**tags, TAG_RUN: key}
        if self.spec.parent_run_name:
            run_tags["mlflow.parentRunId"] = self._parent(experiment, self.spec.parent_run_name)
        self.run_id = self.client.create_run(experiment, run_name=job.metadata.name, tags=run_tags).info.run_id
        params = {k: str(v)[:6000] for k, v in flatten(job.model_dump(mode="json", by_alias=True)["spec"]).items()
                  if v is not None}
        items = [Param(k[:250], v) for k, v in sorted(params.items())]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 parameters a request
            self.client.log_batch(self.run_id, params=items[start:start + 100])

    def _experiment(self) -> str:
        assert self.spec is not None
        found = self.client.get_experiment_by_name(self.spec.experiment)
        if found is not None:
            return str(found.experiment_id)
        try:
            return str(self.client.create_experiment(self.spec.experiment))
        except Exception:  # another run created it meanwhile
            return str(self.client.get_experiment_by_name(self.spec.experiment).experiment_id)

    def _parent(self, experiment: str, name: str) -> str:
        """The parent run of this name, created by the first child; children starting together keep the oldest."""
        query = f"tags.`{TAG_PARENT}` = '{name}'"
        runs = self.client.search_runs([experiment], filter_string=query, order_by=["attributes.start_time ASC"])
        if runs:
            return str(runs[0].info.run_id)
        mine = self.client.create_run(experiment, run_name=name, tags={TAG_PARENT: name}).info.run_id
        runs = self.client.search_runs([experiment], filter_string=query, order_by=["attributes.start_time ASC"])
        first = str(runs[0].info.run_id)
        if first != mine:
            self.client.delete_run(mine)
        return first

    def metrics(self, step: int, values: dict[str, Any], now: bool = False) -> None:
        """Numbers only, batched; sent at once with now (evaluations, the end)."""
        if not self.active:
            return
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), stamp, step) for k, v in values.items()
                         if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)]
        if now or time.monotonic() - self.flushed > FLUSH_SECONDS:
            batch, self.pending, self.flushed = self.pending, [], time.monotonic()
            for start in range(0, len(batch), 1000):  # MLflow takes at most 1000 metrics a request
                self._guard("metrics", lambda s=start: self.client.log_batch(self.run_id, metrics=batch[s:s + 1000]))

    def finish(self, step: int, test: dict[str, Any] | None, base: dict[str, Any] | None, reports: Path) -> None:
        """Test metrics (fine-tuned and base), the reports as artifacts, the run FINISHED."""
        if not self.active:
            return
        self.metrics(step, {f"test_{k}": v for k, v in (test or {}).items()}, now=False)
        self.metrics(step, {f"base_test_{k}": v for k, v in (base or {}).items()}, now=True)
        for name in ARTIFACTS:
            if (reports / name).exists():
                self._guard("artifacts", lambda n=name: self.client.log_artifact(self.run_id, str(reports / n)))
        self._guard("finish", lambda: self.client.set_terminated(self.run_id, "FINISHED"))
        self.finished = True

    def close(self, status: str = "FAILED") -> None:
        """At the end of any run that did not finish: what was logged stays, the run says how it ended."""
        if self.active and not self.finished:
            self.metrics(0, {}, now=True)
            self._guard("close", lambda: self.client.set_terminated(self.run_id, status))


def run_tags(job: FineTuneJob, model_sha256: str | None, files: list[dict[str, Any]]) -> dict[str, str]:
    """What a person searches runs by: the job, where, which model and data exactly, which kubetune."""
    from importlib.metadata import version

    tags = {"kubetune.job": job.metadata.name, "kubetune.namespace": job.metadata.namespace or "local",
            "kubetune.model": job.spec.model.uri, "kubetune.version": version("kubetune")}
    if model_sha256:
        tags["kubetune.model.sha256"] = model_sha256
    for entry in files:
        tags[f"kubetune.data.{entry.get('split')}.sha256"] = str(entry.get("sha256"))
    return tags


def tracker_for(job: FineTuneJob, main: bool) -> Tracker:
    """The job's tracker on rank 0; a silent one on other ranks, for dry runs, or when the spec asks for none."""
    spec = job.spec.tracking.mlflow if job.spec.tracking and main and not job.spec.dry_run else None
    return Tracker(spec)
