"""`kubetune` command line. Heavy imports (torch) happen inside the commands that need them."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable, Sequence
from types import FrameType

from kubetune import contract
from kubetune.errors import PreemptedError, UserError


def _validate(args: argparse.Namespace) -> int:
    from kubetune.jobfile import load_job
    from kubetune.preflight import check_local_inputs

    job = load_job(args.file)
    check_local_inputs(job.spec, args.file)
    print(f"{args.file}: valid FineTuneJob {job.metadata.name!r}")
    return contract.EXIT_OK


def _crd(args: argparse.Namespace) -> int:
    from kubetune.crd import crd_yaml

    sys.stdout.write(crd_yaml())
    return contract.EXIT_OK


def _run(args: argparse.Namespace) -> int:
    from kubetune.runner import run_manifest

    return run_manifest(args.file, nproc_per_node=args.nproc_per_node, embedded_s3=args.embedded_s3)


def _trainer(args: argparse.Namespace) -> int:
    from kubetune.train.entry import trainer_main

    return trainer_main(args.spec)


def _operator(args: argparse.Namespace) -> int:
    try:
        from kubetune_operator.main import run
    except ImportError as exc:  # the operator extra is not installed
        raise UserError(f"kubetune operator needs `pip install kubetune[operator]` ({exc})") from None
    return run()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubetune", description="Fine-tune pre-trained models from a manifest.")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a FineTuneJob manifest on this machine")
    run.add_argument("file", help="FineTuneJob YAML")
    run.add_argument("--nproc-per-node", type=int, default=1, help="local training processes (torchrun)")
    run.add_argument("--embedded-s3", action="store_true", help="serve every uri from a local SeaweedFS S3")
    run.set_defaults(handler=_run)

    validate = commands.add_parser("validate", help="check a manifest; exit 2 with one line per problem")
    validate.add_argument("file")
    validate.set_defaults(handler=_validate)

    commands.add_parser("crd", help="print the FineTuneJob CRD").set_defaults(handler=_crd)
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
