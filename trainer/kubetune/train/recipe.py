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
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import get_linear_schedule_with_warmup

from kubetune import contract, telemetry, tracking
from kubetune.cpus import usable_cpus
from kubetune.data import encode_causal_lm, encode_classification, encode_preference, prepare_data
from kubetune.errors import NotImprovedError, PreemptedError, UserError
from kubetune.spec import LOWER_IS_BETTER, FineTuneJob
from kubetune.storage import Storage, join_uri
from kubetune.train import (
    checkpoint,
    distributed,
    dryrun,
    identity,
    interrupts,
    outputs,
    preference,
    quality,
    sharded_checkpoint,
    sharding,
)
from kubetune.train.batching import batch_to, collate, epoch_batches, length_multiple, model_inputs
from kubetune.train.evaluate import evaluate, prefixed, summed_loss, target_count
from kubetune.train.inputs import fetch_inputs
from kubetune.train.loading import load_model
from kubetune.train.memcheck import check_memory
from kubetune.train.model import (
    build_model,
    check_token_ids,
    frozen_weights_dtype,
    load_tokenizer,
    load_trainable_state,
    max_sequence_length,
    require_cuda_for_qlora,
    trainable_state,
)
from kubetune.train.packing import pack_examples, packing_enabled
from kubetune.train.position import EpochPlan, epoch_plan
from kubetune.train.precision import choose_precision, precision_note
from kubetune.train.progress import Progress
from kubetune.train.speedups import fast_dropout, segment_attention
from kubetune.train.speedups.target_logits import TargetLogits

log = logging.getLogger("kubetune.trainer")


@dataclass
class TrainState:
    """Everything about progress that a checkpoint must carry (besides tensors)."""

    step: int = 0            # optimizer updates done
    epoch: int = 0           # epoch in progress
    samples_in_epoch: int = 0  # examples of this epoch consumed by all ranks together (any world size resumes)
    best_metric: float | None = None
    best_loss: float | None = None  # eval_loss at best_step: breaks ties on the metric
    best_step: int | None = None
    bad_evals: int = 0
    stopped_early: bool = False
    samples_seen: int = 0
    train_seconds: float = 0.0
    train_losses: list[dict[str, float]] = field(default_factory=list)
    validation: list[dict[str, Any]] = field(default_factory=list)
    base_test: dict[str, Any] | None = None
    resumed_from: list[str] = field(default_factory=list)


class FineTuneRecipe:
    def __init__(self, job: FineTuneJob, work_dir: Path) -> None:
        self.job = job
        self.spec = job.spec
        self.work_dir = work_dir
        self.storage = Storage(job.spec.storage)
        self.is_main = distributed.is_main()
        self.last_checkpoint: str | None = None
        self.state = TrainState()
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.test_metrics: dict[str, Any] | None = None
        self.step_times: list[tuple[float, int]] = []
        # Unserved until setup() starts the endpoint; lets the loop's pieces run on their own (tests, tools).
        self.metrics = telemetry.TrainerMetrics(job.metadata.name, job.metadata.namespace or "local")
        self.published: dict[str, Any] | None = None  # the metrics of an identical finished run: nothing to do
        self.dpo = job.spec.method.dpo if job.spec.method.type == "dpo" else None  # preference tuning
        self.tracker = tracking.Tracker(None)  # MLflow, once setup knows the run (spec.tracking)

    # ---- setup -------------------------------------------------------------------------------
    def setup(self) -> None:
        spec, hp = self.spec, self.spec.hyperparameters
        self.started_at = outputs.now()
        distributed.init()
        self.metrics = telemetry.start(self.job.metadata.name, self.job.metadata.namespace,  # observability
                                       rank=distributed.rank(), local_rank=distributed.local_rank())
        self.device = distributed.device()
        if self.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:  # torchrun workers have it set
            torch.set_num_threads(usable_cpus())  # torch's default ignores a pod's CPU limit
        self.precision = choose_precision(hp.precision, self.device)
        note = precision_note(hp.precision, self.precision)
        if note and self.is_main:
            log.warning("%s", note)
        require_cuda_for_qlora(spec, self.device)  # bad input on a machine without CUDA, before any download
        if self.device.type == "cuda":  # observability: what the caching allocator holds (what runs out)
            self.metrics.set_memory_source(lambda: torch.cuda.memory_reserved(self.device),
                                           lambda: torch.cuda.max_memory_reserved(self.device))
        torch.manual_seed(hp.seed)

        inputs = fetch_inputs(self.storage, spec, self.work_dir / "inputs")
        self.tokenizer = load_tokenizer(inputs.model, spec.model.uri)
        self.data = prepare_data(spec, inputs.data)
        self.data.report["objects"] = inputs.objects
        self.model_dir = inputs.model  # qlora's merged/ is rebuilt from the base's own weights
        # Exit 2 here when the job cannot fit, counted for the precision just resolved for this device.
        self.memory = check_memory(spec, inputs.model, self.device, self.precision.name)
        if self.is_main:
            log.info("%s", self.memory.table())
        self.strategy = self.memory.strategy  # ddp or fsdp: the spec's, or for auto what the estimate says fits
        if self.strategy == "fsdp" and spec.method.weights == "qlora":
            raise UserError("hyperparameters.strategy: fsdp does not shard qlora's 4-bit weights; use ddp (each GPU "
                            "holds the 4-bit base), more memory per GPU, or method.type lora with fsdp")
        self.identity = identity.training_identity(self.job, inputs.model_sha256, self.data.report["files"],
                                                   distributed.world_size(), self.strategy)
        self.checkpoint_root = join_uri(spec.checkpoint_uri(), identity.digest(self.identity))
        if not spec.dry_run and self._finished_before():
            return
        self.tracker = tracking.tracker_for(self.job, self.is_main)
        self.tracker.start(self.job, identity.digest(self.identity),
                           tracking.run_tags(self.job, inputs.model_sha256, self.data.report["files"]))
        max_length = max_sequence_length(spec.data.max_seq_length, inputs.model, self.tokenizer)
        self.max_length = max_length  # batches padded for the GPU stop here too: past it, positions run out
        self.train_set = self._encode("training", self.data.train, max_length)
        self.stop_ids: frozenset[int] = getattr(self.train_set, "stop_ids", frozenset())  # generation stops on them
        self.packed = packing_enabled(spec.data.packing, spec.model.task) and self.dpo is None
        if self.packed:  # training rows only: evaluation scores examples one by one, packed or not
            self.train_set = pack_examples(self.train_set, max_length)
        self.validation_set = self._encode("validation", self.data.validation, max_length)
        self.test_set = self._encode("test", self.data.test, max_length)
        check_token_ids(inputs.model, spec.model.uri, self.tokenizer, self.train_set, self.validation_set,
                        self.test_set)  # before loading the weights: seconds, not minutes, into the job
        if spec.dry_run:
            self._shrink_for_dry_run(spec.dry_run)

        torch.manual_seed(hp.seed)  # the new head's init must not depend on what ran before
        self.model, self.counts, full_state = load_model(spec, inputs.model, self.tokenizer.pad_token_id,
                                                         gradient_checkpointing=self.memory.gradient_checkpointing,
                                                         frozen_dtype=frozen_weights_dtype(
                                                             spec.method.weights, self.strategy, self.precision),
                                                         precision=self.precision)
        self.loaded_weights = full_state is not None or not distributed.is_distributed()  # read from disk here
        # partial.trainModules may select parameters the forward never uses: DDP must then look for them.
        by_pattern = spec.method.type == "partial" and bool(spec.method.partial and spec.method.partial.train_modules)
        self.ddp: nn.Module = sharding.wrap(self.model, full_state, self.strategy, self.device, self.precision,
                                            hp.offload_optimizer, find_unused=by_pattern)
        del full_state  # rank 0's loaded weights now live in the shards (fsdp) or the replica (ddp)
        if self.dpo is not None:
            self.reference = self._reference(inputs.model)

        world = distributed.world_size()
        self.lengths = [len(e["input_ids"]) for e in self.train_set]
        batches = len(epoch_batches(self.lengths, hp.batch_size, hp.seed, 0, world, distributed.rank()))
        if batches == 0:
            raise UserError(f"spec.data.train: {len(self.train_set)} training examples are too few for "
                            f"batchSize {hp.batch_size} on {world} processes")
        self.steps_per_epoch = math.ceil(batches / hp.gradient_accumulation_steps)
        self.total_steps = hp.max_steps or self.steps_per_epoch * hp.epochs
        if spec.dry_run:
            self.total_steps = min(self.total_steps, spec.dry_run.max_steps)
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
        if not spec.dry_run:  # a dry run measures a fresh start and leaves the job's checkpoints alone
            self._resume()
            self._fit_schedule()
        self.metrics.set_total_steps(self.total_steps, self.state.step)  # observability
        log.info(
            "model %s | %s | trainable %s of %s parameters (%.2f%%) | precision %s | device %s | world %d %s | "
            "global batch %d (%d x %d accumulation x %d processes) | %d steps",
            spec.model.uri, spec.method.type, f"{self.counts.trainable:,}", f"{self.counts.total:,}",
            self.counts.percent, self.precision.name, self.device, world, self.strategy, self.global_batch,
            hp.batch_size,
            hp.gradient_accumulation_steps, world, self.total_steps,
        )

    def _shrink_for_dry_run(self, dry: Any) -> None:
        """Keep what the full job would do (for the estimate), then train and validate on a sample."""
        hp, world = self.spec.hyperparameters, distributed.world_size()
        lengths = [len(e["input_ids"]) for e in self.train_set]
        accum = hp.gradient_accumulation_steps
        full_batches = len(epoch_batches(lengths, hp.batch_size, hp.seed, 0, world, distributed.rank()))
        full_steps = hp.max_steps or math.ceil(full_batches / accum) * hp.epochs
        # A step costs about its padded tokens: count the full job's on this rank, batch by batch.
        batches = [b for epoch in range(math.ceil(full_steps * accum / max(full_batches, 1)))
                   for b in epoch_batches(lengths, hp.batch_size, hp.seed, epoch, world, distributed.rank())]
        every = self.spec.evaluation.every_steps
        self.dry_full = {"steps": full_steps, "validation": len(self.validation_set), "test": len(self.test_set),
                         "evaluations": full_steps // every + 1 if every else hp.epochs,
                         "paddedTokens": sum(_padded(b, lengths) for b in batches[: full_steps * accum])}
        minimum = hp.batch_size * hp.gradient_accumulation_steps * world
        self.train_set = dryrun.sample(self.train_set, dry.fraction, minimum, hp.seed)
        self.validation_set = dryrun.sample(self.validation_set, dry.fraction, hp.batch_size, hp.seed)
        self.test_set = []  # no test results: a dry run is not a model to judge

    def _finished_before(self) -> bool:
        """A rerun of a finished job with the same inputs and spec: its verified output stands, nothing is rewritten."""
        found: tuple[str, dict[str, Any]] | None = None
        if self.is_main:
            newest = next(iter(checkpoint.complete(self.storage, self.checkpoint_root)), None)
            published = identity.finished_output(self.storage, self.job, newest, self.work_dir / "published")
            found = (newest, published) if newest and published else None
        found = distributed.broadcast_object(found, io=True)
        if found is None:
            return False
        self.last_checkpoint, self.published = found
        self.state.step = self.published.get("steps", _step_of(self.last_checkpoint))
        if self.is_main:
            log.info("already finished at step %d; outputs verified, nothing to do", self.state.step)
        return True

    def _resume(self) -> None:
        # Local checkpoints are read in place; of S3 ones each node fetches what its ranks read into the work dir.
        found = checkpoint.find_latest(self.storage, self.checkpoint_root, self.work_dir / "resume",
                                       needs=self._shards_to_read)
        if found is None:
            return
        name, path = found
        saved = checkpoint.load(path)
        if saved.get("identity") != self.identity:  # its prefix says it is ours: only a copied-in folder lies
            if self.is_main:
                log.warning("ignoring checkpoint %s: it was made for other inputs, spec or process count", name)
            return
        layout = set(saved.get("train_state", {})) - {f.name for f in fields(TrainState)}
        if saved.get("format") != checkpoint.FORMAT_VERSION or layout:
            # Written by another kubetune version (e.g. an upgrade between preemption and retry): its fields
            # cannot be read as this trainer's, and guessing would resume at a wrong data position.
            if self.is_main:
                log.warning("ignoring checkpoint %s: written by another kubetune version (checkpoint format %s, "
                            "fields this trainer does not know: %s); training starts over", name,
                            saved.get("format"), ", ".join(sorted(layout)) or "none")
            return
        if saved.get("sharded"):
            self.best_weights = sharded_checkpoint.load(path, self.model, self.optimizer, saved)
        else:
            load_trainable_state(self.model, saved["model"])
            self.optimizer.load_state_dict(saved["optimizer"])
            self.best_weights = saved.get("best_weights")
        self.scheduler.load_state_dict(saved["scheduler"])
        self.scaler.load_state_dict(saved["scaler"])
        self.state = TrainState(**saved["train_state"])
        if self.best_weights is None and self.state.best_step == self.state.step:
            self.best_weights = trainable_state(self.model)
        ranks = saved["rng"]
        checkpoint.set_rng_state(ranks[distributed.rank() % len(ranks)])
        self.state.resumed_from.append(name)
        self.last_checkpoint = name
        self.metrics.resumes.inc()  # observability
        self.metrics.last_checkpoint_step.set(self.state.step)
        log.info("resumed from %s at step %d (epoch %d, %d examples in)", name, self.state.step, self.state.epoch,
                 self.state.samples_in_epoch)

    def _shards_to_read(self, path: Path) -> list[str]:
        """The shard files this rank reads from the checkpoint at path (a DDP checkpoint is its state.pt)."""
        saved = checkpoint.load(path)  # memory-mapped: reading a key or two reads no more
        if not saved.get("sharded") or saved.get("format") != checkpoint.FORMAT_VERSION:
            return []  # another version's is set aside by _resume, unread
        return sharded_checkpoint.needed_files(path, self.model, self.optimizer, saved["hasBest"])

    def _fit_schedule(self) -> None:
        """Resumed on another world size, the remaining epochs take another number of steps: end the LR schedule
        (and the run) where the data ends."""
        hp, state = self.spec.hyperparameters, self.state
        if hp.max_steps or state.step == 0:
            return
        left = len(self._plan().consumed) if state.epoch < hp.epochs else 0
        total = state.step + left + max(hp.epochs - state.epoch - 1, 0) * self.steps_per_epoch
        if total == self.total_steps:
            return
        saved = self.scheduler.state_dict()
        self.total_steps = total
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, int(hp.warmup_ratio * total), total)
        self.scheduler.load_state_dict(saved)
        for group, base, factor in zip(self.optimizer.param_groups, self.scheduler.base_lrs,
                                       self.scheduler.lr_lambdas, strict=True):
            group["lr"] = base * factor(self.scheduler.last_epoch)  # the new schedule's rate for this step

    def _plan(self) -> EpochPlan:
        hp = self.spec.hyperparameters
        return epoch_plan(self.lengths, hp.batch_size, hp.seed, self.state.epoch, distributed.world_size(),
                          distributed.rank(), hp.gradient_accumulation_steps, self.state.samples_in_epoch)

    # ---- train -------------------------------------------------------------------------------
    def train(self) -> None:
        if self.published is not None:
            return
        spec, state = self.spec, self.state
        progress = Progress(self.total_steps, state.step, enabled=self.is_main)
        try:
            if state.step == 0 and state.base_test is None and self.test_set:
                self.metrics.set_state("evaluating")  # observability
                state.base_test = self._evaluate(self.test_set)
                progress.message(f"base model on the test split: {_summary(state.base_test)}")
            self.metrics.set_state("training")  # observability
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
            self.metrics.set_state("evaluating")  # observability
            self.test_metrics = self._evaluate(self.test_set)
            self.metrics.record_evaluation(self.test_metrics, "test")

    def _finished(self) -> bool:
        return self.state.stopped_early or self.state.step >= self.total_steps

    def _train_epoch(self, progress: Progress) -> None:
        hp, state = self.spec.hyperparameters, self.state
        world, accum = distributed.world_size(), hp.gradient_accumulation_steps
        plan = self._plan()
        batches, epoch_size = plan.batches, max(len(self.lengths), 1)
        self.ddp.train()
        for update, consumed in enumerate(plan.consumed):
            if self._finished():
                return
            started = time.monotonic()
            group = batches[update * accum : (update + 1) * accum]
            loss, targets, samples = self._update(group)
            state.step += 1
            state.samples_in_epoch = consumed
            state.samples_seen += samples * world
            elapsed = time.monotonic() - started
            state.train_seconds += elapsed
            self.step_times.append((elapsed, sum(_padded(b, self.lengths) for b in group)))  # for a dry run
            # One all-reduce per step: the global mean loss and whether any rank was asked to stop.
            stop = float(interrupts.requested() is not None)
            totals = distributed.all_reduce_sum(torch.tensor([loss, targets, stop]))
            mean_loss = float(totals[0] / totals[1])
            row: dict[str, float] = {"step": state.step, "loss": mean_loss}
            if self.dpo is not None:  # the step's preference metrics over the global batch
                step_metrics = preference.means(distributed.all_reduce_sum(self.step_sums))
                del step_metrics["loss"]
                row.update(step_metrics)
                self.metrics.record_evaluation(step_metrics, "train")  # observability
            state.train_losses.append(row)
            self.metrics.record_step(  # observability: O(1) updates, nothing held across the step
                step=state.step, total=self.total_steps,
                epoch=state.epoch + consumed / epoch_size,
                loss=mean_loss, learning_rate=self.scheduler.get_last_lr()[0], samples=samples * world,
                tokens=sum(self.lengths[j] for indices in group for j in indices) * world, seconds=elapsed)
            progress.update(state.step, state.epoch + consumed / epoch_size, mean_loss,
                            samples * world / max(elapsed, 1e-9))
            self.tracker.metrics(state.step, {"learning_rate": self.scheduler.get_last_lr()[0],
                                              **{f"train_{k}": v for k, v in row.items() if k != "step"}})
            if self.spec.evaluation.every_steps and state.step % self.spec.evaluation.every_steps == 0:
                self._validate(progress)
            if totals[2] > 0:
                self._preempt()
            if state.step % self.spec.checkpoint.every_steps == 0:
                self.save_checkpoint()
        state.epoch += 1
        state.samples_in_epoch = 0
        if not self.spec.evaluation.every_steps:
            self._validate(progress)
        if state.step != _step_of(self.last_checkpoint):
            self.save_checkpoint()

    def _encode(self, split: str, records: list[dict[str, Any]], max_length: int) -> list[dict[str, Any]]:
        """Token ids of one split; for causal LM, an example truncation leaves without a target is dropped, and
        a split left with none is bad input (training without evaluation, or no test metrics, is not what the
        job asked for)."""
        if self.spec.model.task == "sequence-classification":
            return encode_classification(records, self.tokenizer, max_length)
        pairs = self.spec.method.type == "dpo"
        encoded = (encode_preference if pairs else encode_causal_lm)(records, self.tokenizer, max_length)
        left = "no two different answers " if pairs else "no completion token "
        if encoded.dropped and not encoded:
            raise UserError(f"spec.data.maxSeqLength: {max_length} tokens leave {left}in any of the "
                            f"{encoded.dropped} {split} examples (prompts or earlier turns fill them); raise "
                            "maxSeqLength or shorten them")
        if encoded.dropped and self.is_main:
            log.warning("spec.data.maxSeqLength: %d of the %d %s examples keep %safter truncation to %d tokens and "
                        "are left out", encoded.dropped, len(records), split, left, max_length)
        self.data.report.setdefault("droppedByTruncation", {})[split] = encoded.dropped
        return encoded

    def _update(self, group: list[list[int]]) -> tuple[float, float, int]:
        """One optimizer step over a group of micro-batches (gradient accumulation)."""
        hp = self.spec.hyperparameters
        loss_sum, targets, samples = (self._accumulate_pairs if self.dpo else self._accumulate)(group)
        if hp.max_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                           hp.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum, targets, samples

    def _accumulate_pairs(self, group: list[list[int]]) -> tuple[float, float, int]:
        """DPO's gradients over a group: per micro-batch one forward of its chosen and rejected sides (and the
        reference's); every pair of the global batch weighs alike. Returns this rank's loss sum and pair count
        twice (targets and examples); the step's metric sums wait in self.step_sums."""
        pad, multiple = self.tokenizer.pad_token_id, length_multiple(self.device)
        pairs = float(sum(len(indices) for indices in group))
        scale = distributed.world_size() / max(float(distributed.all_reduce_sum(torch.tensor([pairs]))[0]), 1.0)
        totals = torch.zeros(len(preference.SUMS) + 1, dtype=torch.float64)
        for i, indices in enumerate(group):
            examples = [self.train_set[j] for j in indices]
            batch = batch_to(preference.collate_pairs(examples, pad, multiple, self.max_length), self.device)
            reference = self.reference.logps(batch, self.precision.autocast, examples)
            context = contextlib.nullcontext() if i == len(group) - 1 else sharding.no_sync(self.ddp)
            with context, fast_dropout.enabled():
                with self.precision.autocast():
                    logits = self.ddp(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                policy, counts = preference.sequence_logps(logits, batch["labels"])
                terms = preference.pair_terms(policy, reference, counts, self.dpo)  # type: ignore[arg-type]
                self.scaler.scale(terms["loss"].sum() * scale).backward()
            totals += preference.sums(terms).cpu()
        self.step_sums = totals
        return float(totals[0]), pairs, int(pairs)

    def _reference(self, model_dir: Path) -> preference.Reference:
        """LoRA: the trained model with its adapters off; full: a frozen copy of the starting model, or (with
        precomputeReference) one used once to score every pair and freed."""
        dpo, hp = self.spec.method.dpo, self.spec.hyperparameters
        frozen = None
        if dpo.weights == "full":
            if self.strategy == "fsdp" and not dpo.precompute_reference:
                raise UserError("spec.method.dpo.precomputeReference: full-weight dpo under fsdp needs it true (the "
                                "frozen reference copy is not sharded)")
            frozen = build_model(self.spec, model_dir, self.tokenizer.pad_token_id)[0].requires_grad_(False)
            half = self.device.type == "cuda" and self.precision.dtype != torch.float32
            frozen.to(self.device, dtype=self.precision.dtype if half else None)  # the plan counts it so
        reference = preference.Reference(self.model, frozen)
        if dpo.precompute_reference:
            reference.precompute([self.train_set, self.validation_set, self.test_set], hp.batch_size,
                                 self.tokenizer.pad_token_id, length_multiple(self.device), self.max_length,
                                 self.device, self.precision.autocast)
            reference.model = self.model  # the frozen copy, if any, is garbage now
        return reference

    def _accumulate(self, group: list[list[int]]) -> tuple[float, float, int]:
        """Gradients of the group's loss, every target of the global batch weighted alike (however micro-batches
        and ranks split them): loss sums over the global target count. Returns this rank's loss sum, targets
        and examples."""
        task = self.spec.model.task
        multiple = length_multiple(self.device)
        batches = [collate([self.train_set[j] for j in indices], self.tokenizer.pad_token_id, multiple,
                           self.max_length) for indices in group]
        targets = float(sum(target_count(b["labels"], task) for b in batches))
        global_targets = float(distributed.all_reduce_sum(torch.tensor([targets]))[0])
        scale = distributed.world_size() / max(global_targets, 1.0)  # DDP averages gradients over ranks
        total_loss, samples = torch.zeros((), device=self.device), 0
        for i, cpu_batch in enumerate(batches):
            batch = batch_to(cpu_batch, self.device)
            # Under DDP and FSDP, only the last micro-batch of a group reduces gradients.
            context = contextlib.nullcontext() if i == len(batches) - 1 else sharding.no_sync(self.ddp)
            # Backward too: gradient checkpointing recomputes the forward (same dropout masks, same attention).
            with context, fast_dropout.enabled(), segment_attention.within(self.model, cpu_batch, self.device):
                with self.precision.autocast(), TargetLogits(self.model, task, cpu_batch["labels"],
                                                             batch["labels"]) as selection:
                    logits = self.ddp(**model_inputs(batch)).logits
                loss = summed_loss(logits, selection.labels_for(logits), task)
                self.scaler.scale(loss * scale).backward()
            total_loss += loss.detach()  # stays on the device: one host sync per step, not per micro-batch
            samples += sum(self.train_set[j].get("examples", 1) for j in group[i])
        return float(total_loss), targets, samples

    def _evaluate(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if self.dpo is not None:
            return preference.evaluate_pairs(self.model, self.reference, examples, self.dpo,
                                             self.spec.hyperparameters.batch_size, self.tokenizer.pad_token_id,
                                             self.precision.autocast, self.device, length_multiple(self.device),
                                             self.max_length)
        return evaluate(self.model, examples, self.spec.model.task, self.spec.model.labels or [],
                        self.spec.hyperparameters.batch_size, self.tokenizer.pad_token_id, self.precision,
                        self.device, self.max_length)

    def _validate(self, progress: Progress) -> None:
        """Validation, best-model tracking and early stopping on spec.evaluation.metric."""
        if not self.validation_set:
            return
        ev, state = self.spec.evaluation, self.state
        self.metrics.set_state("evaluating")  # observability
        metrics = prefixed(self._evaluate(self.validation_set), "eval")
        self.metrics.record_evaluation(metrics, "eval")
        self.tracker.metrics(self.state.step, metrics, now=True)
        self.metrics.set_state("training")
        state.validation.append({"step": state.step, "epoch": state.epoch, **metrics})
        value, loss = metrics[ev.metric], metrics["eval_loss"]
        sign = 1 if ev.metric in LOWER_IS_BETTER else -1
        # Ties on the metric go to the lower validation loss, and a full tie to the later, more trained, step.
        rank = (sign * value, loss)
        best = None if state.best_metric is None else (sign * state.best_metric, _or_inf(state.best_loss))
        improved = best is None or rank < best
        if best is None or rank <= best:
            state.best_metric, state.best_loss, state.best_step = value, loss, state.step
            self.best_weights = trainable_state(self.model)
        state.bad_evals = 0 if improved else state.bad_evals + 1
        best_now = "  (best)" if state.best_step == state.step else ""
        progress.message(f"step {state.step}: {_summary(metrics)}{best_now}")
        if ev.early_stopping_patience and state.bad_evals >= ev.early_stopping_patience:
            state.stopped_early = True
            progress.message(f"early stopping: no better {ev.metric} in {state.bad_evals} evaluations")

    def _preempt(self) -> None:
        # A signal reached some rank (SIGTERM or Ctrl-C): checkpoint on every rank together, then stop.
        self.save_checkpoint()
        signum = interrupts.requested() or signal.SIGTERM
        raise PreemptedError(interrupts.stop_message(signum, self.state.step, self.last_checkpoint),
                             interrupts.exit_code(signum))

    # ---- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        if self.spec.dry_run:
            return  # a dry run's weights are worth nothing later, and its data is only a sample
        started = time.monotonic()  # observability
        rng = distributed.gather_objects(checkpoint.rng_state())
        state = {
            "step": self.state.step,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng,
            "train_state": asdict(self.state),
            "identity": self.identity,
            "spec": self.job.model_dump(mode="json", by_alias=True),
        }
        # When the best model is the current one, the weights saved already are it (saves a copy).
        best = self.best_weights if self.state.best_step != self.state.step else None
        staging, keep = self.work_dir / "staging", self.spec.checkpoint.keep_last
        uri: str | None = None
        if self.strategy == "fsdp":  # every rank writes its shards
            uri = sharded_checkpoint.save(self.storage, self.checkpoint_root, self.model, self.optimizer, best, state,
                                          staging, keep)
        elif self.is_main:
            state.update(model=trainable_state(self.model), optimizer=self.optimizer.state_dict(), best_weights=best)
            uri = checkpoint.save(self.storage, self.checkpoint_root, state, staging, keep)
        if self.is_main:
            log.info("checkpoint %s", uri)
            self.metrics.record_checkpoint(self.state.step, time.monotonic() - started)  # observability
        self.last_checkpoint = distributed.broadcast_object(uri, io=True)  # rank 0 may upload for long (ddp)
        distributed.barrier(io=True)

    # ---- outputs -----------------------------------------------------------------------------
    def write_outputs(self) -> dict[str, Any]:
        """Rank 0 writes and publishes every output; returns the run summary."""
        state, spec = self.state, self.spec
        if self.published is not None:
            return {"outputUri": spec.output.uri, "lastCheckpoint": self.last_checkpoint, "alreadyFinished": True,
                    **self.published}
        if spec.dry_run:
            return self._write_dry_run_report()
        verdict = quality.compare(quality.quality_metric(spec), state.base_test, self.test_metrics,
                                  spec.evaluation.min_improvement)
        metrics: dict[str, Any] = {
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
            "quality": verdict,
        }
        # Every rank knows (the test metrics are all-reduced): none gathers or saves a rejected model.
        if spec.evaluation.min_improvement is not None and not (verdict and verdict["improved"]):
            return self._write_rejected_report(metrics)
        self.metrics.set_state("uploading")  # observability
        memory = distributed.gather_objects({"rank": distributed.rank(), "loadedWeights": self.loaded_weights,
                                             **sharding.state_bytes(self.model, self.optimizer)})
        adapter_only = spec.method.weights in ("lora", "qlora") and not spec.output.merge_adapter
        # Every rank joins the gather (fsdp); only the adapter's weights when the adapter is all that is saved.
        model = sharding.full_model(self.model, self._empty_model, trained_only=adapter_only)
        if self.is_main:
            job = self.job.model_dump(mode="json", by_alias=True, exclude_none=True)
            # memoryPerRank, measured: the bytes of weights and optimizer state each rank held
            run = {**self._run_report(), "memoryPerRank": memory}
            staging = self.work_dir / "output"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            folders = outputs.save_model(model, self.tokenizer, spec.method.weights, spec.output.merge_adapter,
                                         staging, base_dir=self.model_dir, stop_ids=self.stop_ids)
            example = self.data.train[0] if self.data.train else None  # for the model card's snippets
            outputs.write_reports(staging, metrics, run, job, folders, example)
            self.tracker.finish(state.step, self.test_metrics, state.base_test, staging)
            outputs.publish_outputs(self.storage, staging, spec)
            log.info("model written to %s", spec.output.uri)
        distributed.barrier(io=True)  # rank 0 merges, saves and uploads
        return {"outputUri": spec.output.uri, "lastCheckpoint": self.last_checkpoint, **metrics}

    def _run_report(self) -> dict[str, Any]:
        """run.json: what went in (spec, data, packages, hardware, memory) and when."""
        spec = self.spec
        return {
            "job": self.job.metadata.name,
            "spec": self.job.model_dump(mode="json", by_alias=True, exclude_none=True)["spec"],
            "data": self.data.report,
            "packages": outputs.package_versions(),
            "seed": spec.hyperparameters.seed,
            "hardware": outputs.hardware(self.device, self.precision.name, distributed.world_size()),
            "memory": self.memory.to_dict(),
            "strategy": self.strategy,
            "resumedFrom": self.state.resumed_from,
            "lastCheckpoint": self.last_checkpoint,
            "startedAt": self.started_at,
            "finishedAt": outputs.now(),
        }

    def _write_rejected_report(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """minImprovement missed: the report and curves go to <output>/not-improved/, no model anywhere; exit 3."""
        spec = self.spec
        uri = join_uri(spec.output.uri, contract.NOT_IMPROVED_DIR)
        verdict = metrics["quality"] or {"metric": quality.quality_metric(spec), "minImprovement":
                                         spec.evaluation.min_improvement, "improved": False}
        if self.is_main:
            staging = self.work_dir / "output"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            job = self.job.model_dump(mode="json", by_alias=True, exclude_none=True)
            outputs.write_reports(staging, metrics, self._run_report(), job, [], None)
            outputs.publish_outputs(self.storage, staging, spec, folder=contract.NOT_IMPROVED_DIR)
        distributed.barrier(io=True)  # rank 0 uploads the report
        if metrics["quality"] is None:
            message = (f"spec.evaluation.minImprovement: no test results to compare base and fine-tuned on; "
                       f"nothing was published; the report is in {uri}")
        else:
            message = quality.not_improved_message(metrics["quality"], uri)
        raise NotImprovedError(message, {"outputUri": spec.output.uri, "reportUri": uri,
                                         "lastCheckpoint": self.last_checkpoint, **metrics, "quality": verdict})

    def _empty_model(self) -> nn.Module:
        return build_model(self.spec, self.model_dir, self.tokenizer.pad_token_id,
                           empty_like=list(getattr(self.model, "kubetune_new_modules", [])))[0]

    def _write_dry_run_report(self) -> dict[str, Any]:
        started = time.monotonic()
        validation = self._evaluate(self.validation_set) if self.validation_set else None
        full = self.dry_full
        result = dryrun.report(
            step_seconds=[t for t, _ in self.step_times], step_tokens=[n for _, n in self.step_times],
            losses=[row["loss"] for row in self.state.train_losses], full_steps=full["steps"],
            full_tokens=full["paddedTokens"], samples_per_second=self.state.samples_seen / self.state.train_seconds,
            eval_seconds=time.monotonic() - started,
            eval_examples=len(self.validation_set),
            full_eval_examples=full["validation"] * full["evaluations"] + 2 * full["test"],
            peak_bytes=dryrun.peak_memory_bytes(self.device), validation=validation)
        uri = join_uri(self.spec.output.uri, dryrun.DRY_RUN_DIR)
        if self.is_main:
            staging = self.work_dir / "dry-run"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            (staging / dryrun.REPORT_FILE).write_text(json.dumps(result, indent=2, default=str))
            self.storage.publish(staging, uri, extra={"kind": "dry-run"})
            shutil.rmtree(staging, ignore_errors=True)
            log.info("%s", dryrun.describe(result))
        distributed.barrier(io=True)
        return {"outputUri": uri, "dryRun": result, "steps": self.state.step, "totalSteps": self.total_steps}

    def cleanup(self) -> None:
        self.tracker.close()  # a run that did not finish says so in MLflow
        distributed.shutdown()


def _summary(metrics: dict[str, Any]) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))


def _padded(batch: list[int], lengths: list[int]) -> int:
    """Tokens a batch computes on, padding included (batches pad to their longest example)."""
    return len(batch) * max(lengths[i] for i in batch)


def _or_inf(value: float | None) -> float:
    return math.inf if value is None else value


def _step_of(checkpoint_uri: str | None) -> int:
    return int(checkpoint_uri.rstrip("/").rsplit("-", 1)[-1]) if checkpoint_uri else -1

