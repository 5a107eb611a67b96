"""`kubetune` command line. Heavy imports (torch) happen inside the commands that need them."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from kubetune import contract
from kubetune.errors import PreemptedError, UserError

if TYPE_CHECKING:
    from kubetune.spec import FineTuneJob


def _validate(args: argparse.Namespace) -> int:
    from kubetune.jobfile import load_job
    from kubetune.memory import device_memory
    from kubetune.preflight import check_local_inputs

    job = load_job(args.file)
    # Relative paths are relative to the manifest's folder, or to --relative-to: in a pod the pre-flight reads
    # the spec from its mount but must resolve paths where the trainer does, in the working directory.
    anchor = Path(args.relative_to, Path(args.file).name) if args.relative_to else args.file
    check_local_inputs(job.spec, anchor)
    device = device_memory(job.spec, args.device_memory)
    if args.deep:
        from kubetune.deepcheck import deep_check, render
        from kubetune.runner import resolve_paths

        report = deep_check(resolve_paths(job, anchor), device)
        if report.problems:
            raise UserError("\n".join(report.problems))
        print(render(report))
        _leave_footprint(job, report.facts)
    else:
        print(_memory_table(job, str(anchor), device))
    print(f"{args.file}: valid FineTuneJob {job.metadata.name!r}" + (" (deep checks passed)" if args.deep else ""))
    return contract.EXIT_OK


def _leave_footprint(job: FineTuneJob, facts: dict[str, Any]) -> None:
    """In a pre-flight pod: what the trainer pods will need (grace period, disk), for the operator to size them."""
    import json
    import os

    from kubetune.footprint import of_plan

    path = os.environ.get(contract.ENV_TERMINATION_LOG)
    if path and "estimate" in facts:
        footprint = of_plan(job.spec, facts["estimate"]["memory"], facts["model"]["config"])
        Path(path).write_text(json.dumps({"footprint": footprint.to_json()}))


def _memory_table(job: FineTuneJob, manifest: str, device: int | None) -> str:
    """The memory plan when the model's config.json is at hand; a job that cannot fit is bad input."""
    from kubetune.memory import plan, read_config, world_size
    from kubetune.preflight import resolve_local
    from kubetune.storage import is_s3

    spec = job.spec
    if is_s3(spec.model.uri):
        return "memory per device: not estimated (the model is in S3: `kubetune validate --deep` reads its config)"
    config = read_config(resolve_local(spec.model.uri, manifest))
    memory = plan(spec, world_size=world_size(spec), device_bytes=device, config=config)
    if not memory.fits:
        raise UserError(memory.advice(spec))
    return memory.table()


def _crd(args: argparse.Namespace) -> int:
    from kubetune.crd import crd_yaml, sweep_crd_yaml

    sys.stdout.write(sweep_crd_yaml() if args.kind == contract.SWEEP_KIND else crd_yaml())
    return contract.EXIT_OK


def _run(args: argparse.Namespace) -> int:
    from kubetune.runner import run_manifest

    return run_manifest(args.file, nproc_per_node=args.nproc_per_node, embedded_s3=args.embedded_s3,
                        dry_run=args.dry_run)


def _sweep(args: argparse.Namespace) -> int:
    from kubetune.sweep.local import run_sweep

    return run_sweep(args.file, parallel=args.parallel)


def _compare(args: argparse.Namespace) -> int:
    from kubetune.compare import compare

    return compare(args.outputs, endpoint=args.endpoint, region=args.region)


def _trainer(args: argparse.Namespace) -> int:
    from kubetune.train.entry import trainer_main

    return trainer_main(args.spec)


def _predict(args: argparse.Namespace) -> int:
    import tempfile

    from kubetune import predict

    storage = predict.storage_for(args.endpoint, args.region)
    with tempfile.TemporaryDirectory(prefix="kubetune-predict-") as cache:
        finished = predict.open_output(args.output_uri, storage, Path(cache))
        texts = predict.read_inputs(args.texts, args.input, finished.spec.data.text_field, sys.stdin)
        rows = predict.predict(finished, texts, args.max_new_tokens)
        if args.texts and not args.output:  # a person typed them: one readable line each
            for row in rows:
                if "label" in row:
                    others = ", ".join(f"{k} {v:.3f}" for k, v in row["probabilities"].items())
                    print(f"{row['label']}\t({others})\t{row['text']}")
                else:
                    print(row["completion"])
            return contract.EXIT_OK
        count = predict.write_jsonl(rows, args.output)
    if args.output:
        print(f"{count} predictions written to {args.output}", file=sys.stderr)
    return contract.EXIT_OK


def _evaluate(args: argparse.Namespace) -> int:
    import json
    import tempfile

    from kubetune import predict
    from kubetune.train.outputs import metric_rows

    storage = predict.storage_for(args.endpoint, args.region)
    with tempfile.TemporaryDirectory(prefix="kubetune-evaluate-") as cache:
        finished = predict.open_output(args.output_uri, storage, Path(cache))
        metrics = predict.evaluate_file(finished, args.data, storage, Path(cache))
    if args.json:
        print(json.dumps(metrics))
        return contract.EXIT_OK
    for name, _, value, _ in metric_rows(None, metrics):
        print(f"{name}\t{value}")
    if "confusion_matrix" in metrics:
        print(f"confusion matrix (rows = true, columns = predicted, {finished.spec.model.labels}): "
              f"{metrics['confusion_matrix']}")
    print(f"examples\t{metrics['examples']}")
    return contract.EXIT_OK


def _operator(args: argparse.Namespace) -> int:
    try:
        from kubetune_operator.main import run
    except ImportError as exc:  # the operator extra is not installed
        raise UserError(f"kubetune operator needs `pip install kubetune[operator]` ({exc})") from None
    return run()


def _positive_int(text: str) -> int:
    """argparse type: a count of at least 1 (argparse prints the usage error, exit 2)."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of 1 or more, not {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubetune", description="Fine-tune pre-trained models from a manifest.")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a FineTuneJob manifest on this machine")
    run.add_argument("file", help="FineTuneJob YAML")
    run.add_argument("--nproc-per-node", type=_positive_int, default=1, help="local training processes (torchrun)")
    run.add_argument("--embedded-s3", action="store_true", help="serve every uri from a local SeaweedFS S3")
    run.add_argument("--dry-run", action="store_true", help="train briefly on a sample and estimate the full job "
                     "(time, memory, loss trend); publishes a report, not a model")
    run.set_defaults(handler=_run)

    sweep = commands.add_parser("sweep", help="run a FineTuneSweep manifest on this machine: its trials, the best")
    sweep.add_argument("file", help="FineTuneSweep YAML")
    sweep.add_argument("--parallel", type=_positive_int, help="trials at once (default spec.parallelism)")
    sweep.set_defaults(handler=_sweep)

    validate = commands.add_parser("validate", help="check a manifest; exit 2 with one line per problem")
    validate.add_argument("file")
    validate.add_argument("--deep", action="store_true",
                          help="also reach storage with the job's credentials, read the first rows of the data "
                               "and the model's config, and estimate steps and memory")
    validate.add_argument("--device-memory", help="memory of one training device (e.g. 80Gi) to check the "
                                                  "estimate against (default $KUBETUNE_DEVICE_MEMORY; CPU jobs "
                                                  "use resources.memory)")
    validate.add_argument("--relative-to", metavar="DIR", help="resolve relative local paths against DIR instead "
                                                                   "of the manifest's folder")
    validate.set_defaults(handler=_validate)

    crd = commands.add_parser("crd", help="print the FineTuneJob CRD (or the FineTuneSweep one)")
    crd.add_argument("--kind", choices=[contract.KIND, contract.SWEEP_KIND], default=contract.KIND)
    crd.set_defaults(handler=_crd)

    predict = commands.add_parser("predict", help="predict with a finished model (verified against its manifest)")
    predict.add_argument("output_uri", help="the job's output.uri: a local folder or s3://bucket/prefix")
    predict.add_argument("texts", nargs="*", help="texts to classify or prompts to complete")
    predict.add_argument("--input", help="jsonl file of inputs (textField / text / prompt per line)")
    predict.add_argument("--output", help="write jsonl predictions here (default: standard output)")
    predict.add_argument("--max-new-tokens", type=_positive_int, default=64, help="causal LM: tokens to generate")
    predict.set_defaults(handler=_predict)

    evaluate = commands.add_parser("evaluate", help="score a labelled file with the test split's metrics")
    evaluate.add_argument("output_uri", help="the job's output.uri: a local folder or s3://bucket/prefix")
    evaluate.add_argument("--data", required=True, help="labelled data file or folder (local or s3://)")
    evaluate.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    evaluate.set_defaults(handler=_evaluate)
    compare = commands.add_parser("compare", help="hyperparameters, data and metrics of finished runs side by side")
    compare.add_argument("outputs", nargs="+", help="output.uri of each run: local folders or s3://bucket/prefix")
    compare.set_defaults(handler=_compare)
    for sub in (predict, evaluate, compare):
        sub.add_argument("--endpoint", help="S3 endpoint URL for s3:// uris (omit for AWS)")
        sub.add_argument("--region", default="us-east-1", help="S3 region")
    commands.add_parser("operator", help="run the kopf operator").set_defaults(handler=_operator)

    trainer = commands.add_parser("trainer", help="trainer pod entrypoint")
    trainer.add_argument("--spec", default=None, help=f"manifest path (default ${contract.ENV_SPEC_PATH})")
    trainer.set_defaults(handler=_trainer)
    return parser


def _stop_before_training(signum: int, frame: FrameType | None) -> None:
    # Outside training (loading, uploading inputs) there is nothing to checkpoint: stop, asking for a retry.
    raise PreemptedError("SIGTERM before training started; restart to run the job", contract.EXIT_RETRY)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    if args.command in ("run", "trainer"):  # the trainer replaces it with its checkpointing handler
        signal.signal(signal.SIGTERM, _stop_before_training)
    try:
        return handler(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return contract.EXIT_BAD_INPUT
    except PreemptedError as exc:
        print(f"preempted: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted before training started; nothing to resume", file=sys.stderr)
        return contract.EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
