"""The kubetune Grafana dashboard, built with Grafana's own SDK (grafana-foundation-sdk, a dev dependency).

Three rows: the fleet (jobs by phase, failures, restarts), one job's detail chosen by the $namespace and $job
variables, and the operator's health. Every expression uses contract names only.
"""

from __future__ import annotations

import json
from typing import Any

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders.dashboard import Dashboard, DatasourceVariable, QueryVariable, Row
from grafana_foundation_sdk.builders.prometheus import Dataquery
from grafana_foundation_sdk.builders.stat import Panel as Stat
from grafana_foundation_sdk.builders.timeseries import Panel as Timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import BigValueGraphMode, LegendDisplayMode, LegendPlacement
from grafana_foundation_sdk.models.dashboard import DataSourceRef, VariableRefresh

from kubetune import contract as c

UID = "kubetune-finetunejobs"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
JOB = 'namespace="$namespace", job="$job"'  # one FineTuneJob (the trainer's own job/namespace labels)
RATE = "$__rate_interval"


def _query(expr: str, legend: str = "", ref: str = "A") -> Dataquery:
    return Dataquery().expr(expr).legend_format(legend or "__auto").ref_id(ref).datasource(DATASOURCE)


def _with_queries(panel: Any, queries: list[tuple[str, str]]) -> Any:
    for i, (expr, legend) in enumerate(queries):
        panel = panel.with_target(_query(expr, legend, chr(ord("A") + i)))
    return panel.datasource(DATASOURCE)


def timeseries(title: str, unit: str, queries: list[tuple[str, str]], width: int = 8, description: str = "") -> Any:
    legend = (common_builders.VizLegendOptions().display_mode(LegendDisplayMode.LIST)
              .placement(LegendPlacement.BOTTOM).show_legend(True))
    panel = Timeseries().title(title).unit(unit).span(width).height(8).legend(legend).description(description)
    return _with_queries(panel, queries)


def stat(title: str, unit: str, queries: list[tuple[str, str]], width: int = 4, description: str = "") -> Any:
    panel = (Stat().title(title).unit(unit).span(width).height(4).graph_mode(BigValueGraphMode.NONE)
             .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"])).description(description))
    return _with_queries(panel, queries)


class Section:
    """A row and the panels below it; expanded rows keep their panels at the top level (Grafana's model)."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.panels: list[Any] = []

    def with_panel(self, panel: Any) -> Section:
        self.panels.append(panel)
        return self

    def add_to(self, dashboard: Dashboard) -> Dashboard:
        dashboard = dashboard.with_row(Row(self.title).collapsed(False))
        for panel in self.panels:
            dashboard = dashboard.with_panel(panel)
        return dashboard


def fleet_row() -> Section:
    return (
        Section("Fleet")
        .with_panel(stat("FineTuneJobs", "short", [(f"sum({c.METRIC_OP_JOBS})", "jobs")]))
        .with_panel(stat("Failed (24h)", "short",
                         [(f"sum(increase({c.METRIC_OP_FAILURES}[24h])) or vector(0)", "failed")]))
        .with_panel(stat("Gang restarts (24h)", "short",
                         [(f"sum(increase({c.METRIC_OP_RESTARTS}[24h])) or vector(0)", "restarts")]))
        .with_panel(timeseries("Jobs by phase", "short", [(f"sum by (phase) ({c.METRIC_OP_JOBS})", "{{phase}}")],
                               width=12))
        .with_panel(timeseries("Trainers by state", "short",
                               [(f"sum by (state) ({c.METRIC_STATE} == 1)", "{{state}}")], width=12,
                               description="Trainer processes (rank 0) in each state."))
        .with_panel(timeseries("Failures by reason", "short",
                               [(f"sum by (namespace, reason) (increase({c.METRIC_OP_FAILURES}[1h]))",
                                 "{{namespace}} {{reason}}")], width=12,
                               description="FineTuneJobs that ended Failed in the last hour, by failure reason."))
        .with_panel(timeseries("Gang restarts by reason", "short",
                               [(f"sum by (namespace, job, reason) (increase({c.METRIC_OP_RESTARTS}[1h]))",
                                 "{{namespace}}/{{job}} {{reason}}")], width=12))
        .with_panel(timeseries("Training throughput by job", "short",
                               [(f"sum by (namespace, job) (rate({c.METRIC_SAMPLES}[{RATE}]))",
                                 "{{namespace}}/{{job}}")], width=12, description="Samples per second."))
    )


def job_row() -> Section:
    return (
        Section("Job: $namespace/$job")
        .with_panel(stat("State", "none", [(f"{c.METRIC_STATE}{{{JOB}}} == 1", "{{state}}")],
                         description="The trainer's current state (rank 0)."))
        .with_panel(stat("Progress", "percentunit", [(f"{c.METRIC_PROGRESS}{{{JOB}}}", "progress")]))
        .with_panel(stat("ETA", "s", [(f"{c.METRIC_ETA}{{{JOB}}}", "eta")]))
        .with_panel(stat("Step", "none", [(f"{c.METRIC_STEP}{{{JOB}}}", "step"),
                                          (f"{c.METRIC_TOTAL_STEPS}{{{JOB}}}", "total")]))
        .with_panel(stat("Epoch", "none", [(f"{c.METRIC_EPOCH}{{{JOB}}}", "epoch")]))
        .with_panel(stat("Resumes", "short", [(f"{c.METRIC_RESUMES}{{{JOB}}}", "resumes")]))
        .with_panel(timeseries("Loss: train vs eval", "none", [(f"{c.METRIC_TRAIN_LOSS}{{{JOB}}}", "train"),
                                                               (f"{c.METRIC_EVAL_LOSS}{{{JOB}}}", "eval")]))
        .with_panel(timeseries("Evaluation metrics", "none",
                               [(f'{c.METRIC_EVAL}{{{JOB}, metric!~"test_.*"}}', "{{metric}}")],
                               description="Validation metrics; test_* series appear when the test split is scored."))
        .with_panel(timeseries("Learning rate", "none", [(f"{c.METRIC_LEARNING_RATE}{{{JOB}}}", "lr")]))
        .with_panel(timeseries("Throughput", "short", [
            (f"sum(rate({c.METRIC_SAMPLES}{{{JOB}}}[{RATE}]))", "samples/s"),
            (f"sum(rate({c.METRIC_TOKENS}{{{JOB}}}[{RATE}]))", "tokens/s")]))
        .with_panel(timeseries("Step time per rank", "s", [
            (f"histogram_quantile(0.5, sum by (le, rank) (rate({c.METRIC_STEP_SECONDS}_bucket{{{JOB}}}[{RATE}])))",
             "p50 rank {{rank}}"),
            (f"histogram_quantile(0.95, sum by (le, rank) (rate({c.METRIC_STEP_SECONDS}_bucket{{{JOB}}}[{RATE}])))",
             "p95 rank {{rank}}")]))
        .with_panel(timeseries("Memory per rank", "bytes", [
            (f"{c.METRIC_MEMORY}{{{JOB}}}", "in use rank {{rank}}"),
            (f"{c.METRIC_MEMORY_PEAK}{{{JOB}}}", "peak rank {{rank}}")],
            description="CUDA memory allocated on GPUs, process RSS on CPU."))
        .with_panel(timeseries("Checkpoint save time", "s", [
            (f"{c.METRIC_CHECKPOINT_SECONDS}_sum{{{JOB}}} / {c.METRIC_CHECKPOINT_SECONDS}_count{{{JOB}}}", "mean"),
            (f"{c.METRIC_LAST_CHECKPOINT_STEP}{{{JOB}}}", "last checkpoint step")]))
        .with_panel(timeseries("Data transfer", "Bps", [
            (f"sum(rate({c.METRIC_DOWNLOADED}{{{JOB}}}[{RATE}]))", "downloaded"),
            (f"sum(rate({c.METRIC_UPLOADED}{{{JOB}}}[{RATE}]))", "uploaded")]))
        .with_panel(timeseries("Data transferred (total)", "bytes", [
            (f"sum({c.METRIC_DOWNLOADED}{{{JOB}}})", "downloaded"),
            (f"sum({c.METRIC_UPLOADED}{{{JOB}}})", "uploaded")]))
        .with_panel(stat("Test results", "none", [(f'{c.METRIC_EVAL}{{{JOB}, metric=~"test_.*"}}', "{{metric}}")],
                         width=8, description="The test split, scored once at the end of training."))
    )


def operator_row() -> Section:
    reconcile = f"{c.METRIC_OP_RECONCILE_SECONDS}_bucket"
    return (
        Section("Operator")
        .with_panel(stat("Reconciles/s", "short", [(f"sum(rate({c.METRIC_OP_RECONCILE_SECONDS}_count[{RATE}]))",
                                                    "reconciles/s")]))
        .with_panel(timeseries("Reconcile duration", "s", [
            (f"histogram_quantile(0.5, sum by (le) (rate({reconcile}[{RATE}])))", "p50"),
            (f"histogram_quantile(0.99, sum by (le) (rate({reconcile}[{RATE}])))", "p99")]))
        .with_panel(timeseries("API errors by kind", "short",
                               [(f"sum by (kind) (rate({c.METRIC_OP_API_ERRORS}[{RATE}]))", "{{kind}}")], width=6))
        .with_panel(timeseries("Children created by kind", "short",
                               [(f"sum by (kind) (increase({c.METRIC_OP_CHILDREN}[1h]))", "{{kind}}")], width=6))
    )


def build() -> dict[str, Any]:
    """The dashboard as Grafana's JSON model (a plain dict, ready to dump)."""
    dashboard = (
        Dashboard("kubetune: fine-tuning jobs")
        .uid(UID)
        .tags(["kubetune", "generated"])
        .description("FineTuneJobs on this cluster: fleet, one job in detail, the operator. Generated by "
                     "`make monitoring` from kubetune/monitoring/dashboard.py; do not edit by hand.")
        .refresh("30s")
        .time("now-6h", "now")
        .with_variable(DatasourceVariable("datasource").label("Data source").type("prometheus"))
        .with_variable(QueryVariable("namespace").label("Namespace").datasource(DATASOURCE)
                       .query(f"label_values({c.METRIC_STEP}, namespace)")
                       .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED))
        .with_variable(QueryVariable("job").label("FineTuneJob").datasource(DATASOURCE)
                       .query(f'label_values({c.METRIC_STEP}{{namespace="$namespace"}}, job)')
                       .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED))
    )
    for section in (fleet_row(), job_row(), operator_row()):
        dashboard = section.add_to(dashboard)
    encoded: dict[str, Any] = json.loads(json.dumps(dashboard.build(), cls=JSONEncoder))
    return encoded


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"
