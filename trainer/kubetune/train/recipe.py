"""The fine-tuning recipe: setup, train, save_checkpoint, cleanup (torchtune style, no class towers)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from transformers import get_linear_schedule_with_warmup

from kubetune import contract
from kubetune.data import encode_causal_lm, encode_classification, prepare_data
from kubetune.errors import PreemptedError, UserError
from kubetune.spec import LOWER_IS_BETTER, FineTuneJob
from kubetune.storage import Storage, is_s3
from kubetune.train import checkpoint, distributed, outputs
from kubetune.train.batching import collate, epoch_batches
from kubetune.train.evaluate import evaluate, prefixed
from kubetune.train.inputs import fetch_inputs
from kubetune.train.model import build_model, load_tokenizer, load_trainable_state, trainable_state
from kubetune.train.precision import choose_precision
from kubetune.train.progress import Progress

log = logging.getLogger("kubetune.trainer")


@dataclass
class TrainState:
    """Everything about progress that a checkpoint must carry (besides tensors)."""

    step: int = 0            # optimizer updates done
    epoch: int = 0           # epoch in progress
    batch_in_epoch: int = 0  # micro-batches of this epoch already consumed on each rank
    best_metric: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    stopped_early: bool = False
    samples_seen: int = 0
    train_seconds: float = 0.0
    train_losses: list[dict[str, float]] = field(default_factory=list)
    validation: list[dict[str, Any]] = field(default_factory=list)
    base_test: dict[str, Any] | None = None
    resumed_from: list[str] = field(default_factory=list)


def _spec_identity(job: FineTuneJob) -> str:
    """What decides the training trajectory; a checkpoint of another one is not ours.

    The world size is part of it: the saved data position is per-rank batches of that sharding.
    """
    keys = ("model", "method", "data", "hyperparameters")
    dumped = job.spec.model_dump(mode="json", by_alias=True)
    return json.dumps({**{k: dumped[k] for k in keys}, "worldSize": distributed.world_size()}, sort_keys=True)


class FineTuneRecipe:
    def __init__(self, job: FineTuneJob, work_dir: Path) -> None:
        self.job = job
        self.spec = job.spec
        self.work_dir = work_dir
        self.storage = Storage(job.spec.storage)
        self.is_main = distributed.is_main()
        self.preempt_requested = False
        self.last_checkpoint: str | None = None
        self.state = TrainState()
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.test_metrics: dict[str, Any] | None = None

    # ---- setup -------------------------------------------------------------------------------
    def setup(self) -> None:
        spec, hp = self.spec, self.spec.hyperparameters
        self.started_at = outputs.now()
        distributed.init()
        signal.signal(signal.SIGTERM, self._on_sigterm)
        self.device = distributed.device()
        self.precision = choose_precision(hp.precision, self.device)
        torch.manual_seed(hp.seed)

        inputs = fetch_inputs(self.storage, spec, self.work_dir / "inputs")
        self.tokenizer = load_tokenizer(inputs.model, spec.model.uri)
        self.data = prepare_data(spec, inputs.data)
        self.data.report["objects"] = inputs.objects
        encode = encode_classification if spec.model.task == "sequence-classification" else encode_causal_lm
        self.train_set = encode(self.data.train, self.tokenizer, spec.data.max_seq_length)
        self.validation_set = encode(self.data.validation, self.tokenizer, spec.data.max_seq_length)
        self.test_set = encode(self.data.test, self.tokenizer, spec.data.max_seq_length)

        torch.manual_seed(hp.seed)  # the new head's init must not depend on what ran before
        self.model, self.counts = build_model(spec, inputs.model)
        self.model.to(self.device)
        self.ddp: nn.Module = self.model
        if distributed.is_distributed():
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=device_ids)

        world = distributed.world_size()
        self.lengths = [len(e["input_ids"]) for e in self.train_set]
        batches = len(epoch_batches(self.lengths, hp.batch_size, hp.seed, 0, world, distributed.rank()))
        if batches == 0:
            raise UserError(f"spec.data.train: {len(self.train_set)} training examples are too few for "
                            f"batchSize {hp.batch_size} on {world} processes")
        self.steps_per_epoch = math.ceil(batches / hp.gradient_accumulation_steps)
        self.total_steps = hp.max_steps or self.steps_per_epoch * hp.epochs
        self.global_batch = hp.batch_size * hp.gradient_accumulation_steps * world

        decay = [p for n, p in self.model.named_parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for n, p in self.model.named_parameters() if p.requires_grad and p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=spec.learning_rate(),
        )
        warmup = int(hp.warmup_ratio * self.total_steps)
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, warmup, self.total_steps)
        self.scaler = self.precision.grad_scaler()
        self._resume()
        log.info(
            "model %s | %s | trainable %s of %s parameters (%.2f%%) | precision %s | device %s | world %d | "
            "global batch %d (%d x %d accumulation x %d processes) | %d steps",
            spec.model.uri, spec.method.type, f"{self.counts.trainable:,}", f"{self.counts.total:,}",
            self.counts.percent, self.precision.name, self.device, world, self.global_batch, hp.batch_size,
            hp.gradient_accumulation_steps, world, self.total_steps,
        )

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        # Only set a flag: the loop saves a checkpoint at the next update boundary, on every rank together.
        self.preempt_requested = True
        self.sigterm_at = time.monotonic()

    def _resume(self) -> None:
        root = self.spec.checkpoint_uri()
        found = checkpoint.find_latest(self.storage, root, self.work_dir / "resume") if self.is_main else None
        name: str | None = distributed.broadcast_object(found[0] if found else None)
        if name is None:
            return
        # Local checkpoints are read in place; S3 ones are fetched once per node into the work dir.
        path = self.work_dir / "resume" / name.rstrip("/").rsplit("/", 1)[-1] if is_s3(name) else Path(name)
        if not self.is_main and distributed.local_rank() == 0 and is_s3(name):
            self.storage.fetch(name, path)
        distributed.barrier()
        saved = checkpoint.load(path)
        if saved.get("identity") != _spec_identity(self.job):
            if self.is_main:
                log.warning("ignoring checkpoint %s: it was made for a different spec or process count", name)
            return
        load_trainable_state(self.model, saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.scaler.load_state_dict(saved["scaler"])
        self.state = TrainState(**saved["train_state"])
        self.best_weights = saved.get("best_weights")
        if self.best_weights is None and self.state.best_step == self.state.step:
            self.best_weights = trainable_state(self.model)
        ranks = saved["rng"]
        checkpoint.set_rng_state(ranks[distributed.rank() % len(ranks)])
        self.state.resumed_from.append(name)
        self.last_checkpoint = name
        log.info("resumed from %s at step %d (epoch %d, batch %d)", name, self.state.step, self.state.epoch,
                 self.state.batch_in_epoch)

    # ---- train -------------------------------------------------------------------------------
    def train(self) -> None:
        spec, state = self.spec, self.state
        progress = Progress(self.total_steps, state.step, enabled=self.is_main)
        try:
            if state.step == 0 and state.base_test is None and self.test_set:
                state.base_test = self._evaluate(self.test_set)
                progress.message(f"base model on the test split: {_summary(state.base_test)}")
            while not self._finished():
                self._train_epoch(progress)
            if not state.validation or state.validation[-1]["step"] != state.step:
                self._validate(progress)  # max_steps can end mid-epoch: judge the final weights too
        finally:
            progress.close()
        if self.state.step != _step_of(self.last_checkpoint):
            self.save_checkpoint()
        if self.best_weights is not None and state.best_step != state.step:
            load_trainable_state(self.model, self.best_weights)
            log.info("restored the best model from step %s (%s = %.4f)", state.best_step,
                     spec.evaluation.metric, state.best_metric)
        if self.test_set:
            self.test_metrics = self._evaluate(self.test_set)

    def _finished(self) -> bool:
        return self.state.stopped_early or self.state.step >= self.total_steps

    def _train_epoch(self, progress: Progress) -> None:
        hp, state = self.spec.hyperparameters, self.state
        world, accum = distributed.world_size(), hp.gradient_accumulation_steps
        batches = epoch_batches(self.lengths, hp.batch_size, hp.seed, state.epoch, world, distributed.rank())
        self.ddp.train()
        for update in range(state.batch_in_epoch // accum, self.steps_per_epoch):
            if self._finished():
                return
            started = time.monotonic()
            group = batches[update * accum : (update + 1) * accum]
            loss, samples = self._update(group)
            state.step += 1
            state.batch_in_epoch = (update + 1) * accum
            state.samples_seen += samples * world
            elapsed = time.monotonic() - started
            state.train_seconds += elapsed
            # One all-reduce per step: the global mean loss and whether any rank was asked to stop.
            totals = distributed.all_reduce_sum(torch.tensor([loss, 1.0, float(self.preempt_requested)]))
            mean_loss = float(totals[0] / totals[1])
            state.train_losses.append({"step": state.step, "loss": mean_loss})
            progress.update(state.step, state.epoch + state.batch_in_epoch / max(len(batches), 1), mean_loss,
                            samples * world / max(elapsed, 1e-9))
            if self.spec.evaluation.every_steps and state.step % self.spec.evaluation.every_steps == 0:
                self._validate(progress)
            if totals[2] > 0:
                self._preempt()
            if state.step % self.spec.checkpoint.every_steps == 0:
                self.save_checkpoint()
        state.epoch += 1
        state.batch_in_epoch = 0
        if not self.spec.evaluation.every_steps:
            self._validate(progress)
        if state.step != _step_of(self.last_checkpoint):
            self.save_checkpoint()

    def _update(self, group: list[list[int]]) -> tuple[float, int]:
        """One optimizer step over a group of micro-batches (gradient accumulation)."""
        hp = self.spec.hyperparameters
        total_loss, samples = 0.0, 0
        for i, indices in enumerate(group):
            batch = {k: v.to(self.device) for k, v in collate([self.train_set[j] for j in indices],
                                                               self.tokenizer.pad_token_id).items()}
            sync = i == len(group) - 1 or not isinstance(self.ddp, DistributedDataParallel)
            # Under DDP, only the last micro-batch of a group all-reduces gradients.
            context = contextlib.nullcontext() if sync else self.ddp.no_sync()  # type: ignore[operator]
            with context:
                with self.precision.autocast():
                    loss = self.ddp(**batch).loss / len(group)
                self.scaler.scale(loss).backward()
            total_loss += loss.item()
            samples += len(indices)
        if hp.max_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                           hp.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total_loss, samples

    def _evaluate(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        return evaluate(self.model, examples, self.spec.model.task, self.spec.model.labels or [],
                        self.spec.hyperparameters.batch_size, self.tokenizer.pad_token_id, self.precision,
                        self.device)

    def _validate(self, progress: Progress) -> None:
        """Validation, best-model tracking and early stopping on spec.evaluation.metric."""
        if not self.validation_set:
            return
        ev, state = self.spec.evaluation, self.state
        metrics = prefixed(self._evaluate(self.validation_set), "eval")
        state.validation.append({"step": state.step, "epoch": state.epoch, **metrics})
        value = metrics[ev.metric]
        lower = ev.metric in LOWER_IS_BETTER
        improved = state.best_metric is None or (value < state.best_metric if lower else value > state.best_metric)
        if improved:
            state.best_metric, state.best_step, state.bad_evals = value, state.step, 0
            self.best_weights = trainable_state(self.model)
        else:
            state.bad_evals += 1
        progress.message(f"step {state.step}: {_summary(metrics)}" + ("  (best)" if improved else ""))
        if ev.early_stopping_patience and state.bad_evals >= ev.early_stopping_patience:
            state.stopped_early = True
            progress.message(f"early stopping: no better {ev.metric} in {state.bad_evals} evaluations")

    def _preempt(self) -> None:
        self.save_checkpoint()
        took = time.monotonic() - getattr(self, "sigterm_at", time.monotonic())
        grace = float(os.environ.get(contract.ENV_GRACE_SECONDS, contract.DEFAULT_GRACE_SECONDS))
        if took > grace and self.is_main:
            log.warning("the checkpoint after SIGTERM took %.1fs, longer than the %.0fs grace period: raise "
                        "terminationGracePeriodSeconds or lower batchSize x gradientAccumulationSteps", took, grace)
        raise PreemptedError(f"SIGTERM: saved {self.last_checkpoint} at step {self.state.step}; restart to resume")

    # ---- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        rng = distributed.gather_objects(checkpoint.rng_state())
        if self.is_main:
            state = {
                "step": self.state.step,
                "model": trainable_state(self.model),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "rng": rng,
                "train_state": asdict(self.state),
                # When the best model is the current one, the weights above already are it (saves a copy).
                "best_weights": self.best_weights if self.state.best_step != self.state.step else None,
                "identity": _spec_identity(self.job),
                "spec": self.job.model_dump(mode="json", by_alias=True),
            }
            uri = checkpoint.save(self.storage, self.spec.checkpoint_uri(), state, self.work_dir / "staging",
                                  self.spec.checkpoint.keep_last)
            log.info("checkpoint %s", uri)
        else:
            uri = None
        self.last_checkpoint = distributed.broadcast_object(uri)
        distributed.barrier()

    # ---- outputs -----------------------------------------------------------------------------
    def write_outputs(self) -> dict[str, Any]:
        """Rank 0 writes and publishes every output; returns the run summary."""
        state, spec = self.state, self.spec
        metrics = {
            "task": spec.model.task,
            "metric": spec.evaluation.metric,
            "test": self.test_metrics,
            "baseTest": state.base_test,
            "validation": state.validation,
            "trainLoss": state.train_losses,
            "bestStep": state.best_step,
            "bestMetric": state.best_metric,
            "stoppedEarly": state.stopped_early,
            "steps": state.step,
            "totalSteps": self.total_steps,
            "epochsCompleted": state.epoch,
            "globalBatchSize": self.global_batch,
            "trainableParameters": self.counts.trainable,
            "totalParameters": self.counts.total,
            "trainSamplesPerSecond": state.samples_seen / max(state.train_seconds, 1e-9),
            "trainSeconds": state.train_seconds,
        }
        if self.is_main:
            job = self.job.model_dump(mode="json", by_alias=True, exclude_none=True)
            run = {
                "job": self.job.metadata.name,
                "spec": job["spec"],
                "data": self.data.report,
                "packages": outputs.package_versions(),
                "seed": spec.hyperparameters.seed,
                "hardware": outputs.hardware(self.device, self.precision.name, distributed.world_size()),
                "resumedFrom": state.resumed_from,
                "lastCheckpoint": self.last_checkpoint,
                "startedAt": self.started_at,
                "finishedAt": outputs.now(),
            }
            staging = self.work_dir / "output"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            folders = outputs.save_model(self.model, self.tokenizer, spec.method.type, spec.output.merge_adapter,
                                         staging)
            outputs.write_reports(staging, metrics, run, job, folders)
            outputs.publish_outputs(self.storage, staging, spec.output.uri)
            log.info("model written to %s", spec.output.uri)
        distributed.barrier()
        return {"outputUri": spec.output.uri, "lastCheckpoint": self.last_checkpoint, **metrics}

    def cleanup(self) -> None:
        distributed.shutdown()


def _summary(metrics: dict[str, Any]) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))


def _step_of(checkpoint_uri: str | None) -> int:
    return int(checkpoint_uri.rstrip("/").rsplit("-", 1)[-1]) if checkpoint_uri else -1

