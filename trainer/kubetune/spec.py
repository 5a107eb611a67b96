"""The FineTuneJob API (kubetune.io/v1alpha1) as pydantic models.

Defined once: the trainer, `kubetune validate`, the CRD generator and the operator import it.
Importing this module must never import torch.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from kubetune import contract

Task = Literal["sequence-classification", "causal-lm"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]

CLASSIFICATION_METRICS = ("eval_loss", "eval_accuracy", "eval_f1", "eval_precision", "eval_recall")
CAUSAL_LM_METRICS = ("eval_loss", "eval_perplexity")
PREFERENCE_METRICS = ("eval_loss", "eval_preference_accuracy", "eval_reward_margin")
LOWER_IS_BETTER = ("eval_loss", "eval_perplexity")

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def check_uri(value: str) -> str:
    """Accept `s3://bucket/prefix` or a local path; reject keys that could escape their prefix."""
    if not value or not value.strip():
        raise ValueError("must not be empty")
    if value.startswith("s3://"):
        bucket, _, key = value[5:].partition("/")
        if not _BUCKET.match(bucket):
            raise ValueError(f"{value!r}: bucket name {bucket!r} is not a valid S3 bucket name")
        parts = key.rstrip("/").split("/") if key.rstrip("/") else []
        if any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"{value!r}: key segments must not be empty, '.' or '..'")
    elif "://" in value:
        raise ValueError(f"{value!r}: only s3:// URIs and local paths are supported")
    return value


Uri = Annotated[str, AfterValidator(check_uri)]

# What Kubernetes accepts (k8s.io/apimachinery): a non-negative resource quantity (8, 500m, 32Gi, 1e3), a label
# value (63 characters), a label key ([prefix/]name) and a DNS subdomain (priority class names). Each is checked
# here with a message that names the fix, and carried into the CRD as a pattern so the API server checks it too.
QUANTITY = r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+|[kMGTPE]|[KMGTPE]i|m|u|n)?$"
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
LABEL_NAME = r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"
LABEL_KEY = rf"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?{LABEL_NAME}$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"


def _matching(pattern: str, what: str, limit: int | None = None) -> Any:
    def check(value: str) -> str:
        if not re.match(pattern, value) or (limit is not None and len(value) > limit):
            raise ValueError(f"{value!r} is not {what}")
        return value
    return AfterValidator(check)


Quantity = Annotated[str, _matching(QUANTITY, "a Kubernetes quantity (e.g. 8, 500m, 32Gi, 512Mi)"),
                     Field(json_schema_extra={"pattern": QUANTITY})]
LabelValue = Annotated[str, _matching(LABEL_VALUE, "a label value (at most 63 letters, digits, '-', '_' or '.', "
                                      "beginning and ending with a letter or digit)", 63),
                       Field(json_schema_extra={"pattern": LABEL_VALUE, "maxLength": 63})]
DnsSubdomain = Annotated[str, _matching(DNS_SUBDOMAIN, "a DNS subdomain (lowercase letters, digits, '-' and '.')",
                                        253), Field(json_schema_extra={"pattern": DNS_SUBDOMAIN, "maxLength": 253})]
_QUANTITY_FACTORS = {"n": 1e-9, "u": 1e-6, "m": 1e-3, "": 1.0, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
                     "P": 1e15, "E": 1e18, "Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30, "Ti": 2.0**40, "Pi": 2.0**50,
                     "Ei": 2.0**60}


def quantity_value(text: str) -> float:
    """A checked Quantity as a number: 32Gi -> 34359738368.0, 500m -> 0.5, 1e3 -> 1000.0."""
    number, suffix = re.fullmatch(r"([0-9.]+)(.*)", text).groups()  # type: ignore[union-attr]
    if len(suffix) > 1 and suffix[0] in "eE" and suffix[1] != "i":  # an exponent, not the exa suffixes E and Ei
        return float(number + suffix)
    return float(number) * _QUANTITY_FACTORS[suffix]


LABEL_KEYS_RULE: dict[str, Any] = {"rule": f"self.all(k, k.matches(r'{LABEL_KEY}') && size(k) <= 317)",
                   "message": "nodeSelector: keys must be label keys ([prefix/]name)"}


class _Spec(BaseModel):
    """Common config: camelCase in YAML, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", validate_default=True
    )


class ModelSpec(_Spec):
    uri: Uri = Field(description="Base model: s3://bucket/prefix or a local folder in Hugging Face format.")
    task: Task = Field(description="sequence-classification (encoder + head) or causal-lm (decoder).")
    labels: list[str] | None = Field(
        default=None, description="Class names in label-index order; sequence-classification only."
    )

    @model_validator(mode="after")
    def _labels_match_task(self) -> ModelSpec:
        if self.task == "sequence-classification":
            if not self.labels or len(self.labels) < 2:
                raise ValueError("labels: sequence-classification needs at least 2 labels")
            if len(set(self.labels)) != len(self.labels):
                raise ValueError("labels: names must be unique")
        elif self.labels:
            raise ValueError("labels: only sequence-classification takes labels")
        return self


class LoraSpec(_Spec):
    r: int = Field(default=8, ge=1, le=1024, description="LoRA rank.")
    alpha: float = Field(default=16.0, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] | None = Field(
        default=None,
        description="Module names to adapt; default depends on the architecture (query/value, c_attn, ...).",
    )


class PartialSpec(_Spec):
    train_last_layers: int | None = Field(
        default=None, ge=1, description="Train the last N transformer layers (plus the task head)."
    )
    train_modules: list[str] | None = Field(
        default=None, description="Train parameters whose names match any of these regexes (plus the task head)."
    )

    @model_validator(mode="after")
    def _one_choice(self) -> PartialSpec:
        if (self.train_last_layers is None) == (not self.train_modules):
            raise ValueError("set exactly one of trainLastLayers or trainModules")
        for pattern in self.train_modules or []:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"trainModules: {pattern!r} is not a valid regex ({exc})") from None
        return self


class DpoSpec(_Spec):
    beta: float = Field(default=0.1, gt=0.0, le=100.0, allow_inf_nan=False,
                        description="Strength of the pull towards the reference model (DPO's beta; IPO's tau).")
    loss: Literal["sigmoid", "ipo"] = Field(
        default="sigmoid", description="sigmoid: DPO (Rafailov et al. 2023); ipo: IPO (Azar et al. 2023), its "
        "log-ratios averaged per answer token as TRL does.")
    # le, not lt: the API server compares an integer value (0) with int(0.5) for an exclusive maximum and refuses it.
    label_smoothing: float = Field(
        default=0.0, ge=0.0, le=0.5, description="sigmoid only: the share of pairs assumed mislabelled "
        "(conservative DPO): the loss also pulls a little towards the rejected answer (0.5: no preference left).")
    weights: Literal["lora", "full"] = Field(
        default="lora", description="lora: LoRA adapters train (method.lora), the reference is the same model with "
        "them disabled; full: every weight trains, the reference is a frozen copy.")
    precompute_reference: bool = Field(
        default=False, description="Score every example with the reference model once before training and free it "
        "(no frozen copy in memory under weights: full; one forward less per step).")


class MethodSpec(_Spec):
    type: Literal["full", "partial", "lora", "qlora", "dpo"] = Field(
        default="lora",
        description="full: all weights; partial: last layers or chosen modules; lora: PEFT LoRA; "
        "qlora: LoRA on 4-bit base weights (bitsandbytes, CUDA only); dpo: preference tuning of a causal LM on "
        "chosen/rejected answer pairs (method.dpo).",
    )
    lora: LoraSpec = Field(default_factory=LoraSpec, description="LoRA settings (method.type=lora or qlora, "
                           "and dpo with dpo.weights lora).")
    partial: PartialSpec | None = Field(default=None, description="Which weights train (method.type=partial).")
    dpo: DpoSpec = Field(default_factory=DpoSpec, description="Preference tuning settings (method.type=dpo).")

    @model_validator(mode="after")
    def _partial_present(self) -> MethodSpec:
        if self.type == "partial" and self.partial is None:
            raise ValueError("partial: method.type=partial needs partial.trainLastLayers or partial.trainModules")
        return self

    @property
    def weights(self) -> str:
        """Which weights train: the type itself, or for dpo its dpo.weights (lora or full)."""
        return self.dpo.weights if self.type == "dpo" else self.type


class SplitSpec(_Spec):
    train: float = Field(default=0.70, gt=0.0, le=1.0, description="Fraction of rows for training.")
    validation: float = Field(default=0.15, ge=0.0, lt=1.0, description="Fraction for validation.")
    test: float = Field(default=0.15, ge=0.0, lt=1.0, description="Fraction for the final test.")
    seed: int = Field(default=42, description="Seed of the shuffle before splitting.")

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitSpec:
        if not math.isclose(self.train + self.validation + self.test, 1.0, abs_tol=1e-6):
            raise ValueError("fractions must sum to 1.0")
        return self


class CleaningSpec(_Spec):
    dedupe: bool = Field(default=True, description="Drop exact duplicate rows (after trimming).")
    drop_empty: bool = Field(default=True, description="Drop rows whose input or target is empty.")


class DataSpec(_Spec):
    train: Uri = Field(description="Training data: a file or a folder/prefix of files.")
    validation: Uri | None = Field(default=None, description="Validation data; split from train when absent.")
    test: Uri | None = Field(default=None, description="Test data; split from train when absent.")
    format: Literal["auto", "jsonl", "csv", "parquet"] = Field(
        default="auto", description="File format; auto picks by extension."
    )
    text_field: str = Field(default="text", description="Classification input column.")
    label_field: str = Field(default="label", description="Classification label column (name or index).")
    prompt_field: str = Field(default="prompt", description="Causal LM prompt column.")
    completion_field: str = Field(default="completion", description="Causal LM completion column.")
    messages_field: str = Field(default="messages", description="Causal LM chat column: [{role, content}].")
    chosen_field: str = Field(default="chosen", description="dpo: the preferred answer column (text, or an "
                              "assistant message after the shared messagesField history).")
    rejected_field: str = Field(default="rejected", description="dpo: the dispreferred answer column.")
    split: SplitSpec = Field(default_factory=SplitSpec, description="Seeded split used when files are absent.")
    cleaning: CleaningSpec = Field(default_factory=CleaningSpec, description="Row cleaning before the split.")
    max_seq_length: int = Field(default=256, ge=8, le=32768, description="Tokens per example (truncated).")
    packing: bool | None = Field(
        default=None,
        description="Causal LM: concatenate examples into full rows, attention kept within each example; "
        "null = on for causal-lm.",
    )



class HyperparametersSpec(_Spec):
    learning_rate: float | None = Field(
        default=None, gt=0.0, le=1.0,
        description="Peak learning rate (AdamW). Default by method and task: lora 1e-3 (classification) / "
        "2e-4 (causal LM), partial 1e-4 / 5e-5, full 2e-5 / 1e-5, dpo 5e-6 (lora) / 1e-6 (full).",
    )
    batch_size: int = Field(default=16, ge=1, le=65536, description="Examples (dpo: pairs) per device per micro-step.")
    gradient_accumulation_steps: int = Field(default=1, ge=1, le=4096, description="Micro-steps per update.")
    epochs: int = Field(default=3, ge=1, le=10000, description="Passes over the training data.")
    max_steps: int | None = Field(default=None, ge=1, description="Stop after this many updates (overrides epochs).")
    warmup_ratio: float = Field(default=0.0, ge=0.0, le=1.0, description="Fraction of updates with linear warmup.")
    weight_decay: float = Field(default=0.0, ge=0.0, le=1.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(default=1.0, ge=0.0, description="Gradient clipping norm; 0 disables.")
    precision: Precision = Field(
        default="auto", description="auto picks bf16 where the hardware runs it well, else fp16 (GPU) or fp32."
    )
    seed: int = Field(default=42, description="Seed for weights, data order and dropout.")
    strategy: Literal["auto", "ddp", "fsdp"] = Field(
        default="auto",
        description="ddp replicates the model on every process; fsdp shards weights, gradients and optimizer "
        "state; auto picks fsdp when the memory estimate says a replica will not fit.",
    )
    offload_optimizer: bool = Field(default=False, description="fsdp: keep optimizer state in host memory.")
    gradient_checkpointing: bool | None = Field(
        default=None,
        description="Recompute activations in backward; null = on when the estimate says they will not fit.",
    )


# Published practice: BERT fine-tuning 2e-5..5e-5 (Devlin et al.), LLM full fine-tuning ~1e-5, LoRA about
# ten times higher (QLoRA: 2e-4 for LLMs; LoRA paper: 4e-4..5e-4 for RoBERTa over many epochs). Small
# encoders with a fresh head over a few epochs need the top of that range: on the shipped reviews,
# MiniLM + LoRA stays at chance after 2 epochs at 5e-4 and reaches 0.81 test accuracy in 3 at 1e-3.
DEFAULT_LEARNING_RATES = {
    ("lora", "sequence-classification"): 1e-3, ("lora", "causal-lm"): 2e-4,
    ("partial", "sequence-classification"): 1e-4, ("partial", "causal-lm"): 5e-5,
    ("full", "sequence-classification"): 2e-5, ("full", "causal-lm"): 1e-5,
    ("qlora", "sequence-classification"): 1e-3, ("qlora", "causal-lm"): 2e-4,
    # DPO moves a tuned model a little: TRL's default 1e-6 for full weights, LoRA about ten times higher.
    ("dpo", "lora"): 5e-6, ("dpo", "full"): 1e-6,
}


class EvaluationSpec(_Spec):
    every_steps: int | None = Field(default=None, ge=1, description="Validate every N updates; null = per epoch.")
    metric: str = Field(default="eval_loss", description="Selects the best model and drives early stopping.")
    early_stopping_patience: int | None = Field(
        default=3, ge=0, description="Evaluations without improvement before stopping; 0 or null disables."
    )
    min_improvement: float | None = Field(
        default=None, ge=0.0, allow_inf_nan=False,
        description="Publish only if the fine-tuned model beats the base on the test split by at least this, in "
        "the quality metric's units (classification: evaluation.metric, or accuracy for eval_loss; causal LM: "
        "loss, or perplexity for eval_perplexity); otherwise nothing is published and the trainer exits 3. "
        "null = publish anyway, with a warning when the model is not better.",
    )


class CheckpointSpec(_Spec):
    uri: Uri | None = Field(default=None, description="Where checkpoints go; default <output.uri>/checkpoints/.")
    every_steps: int = Field(default=100, ge=1, description="Checkpoint every N updates (and at each epoch end).")
    keep_last: int = Field(default=2, ge=1, description="Complete checkpoints to keep.")


class OutputSpec(_Spec):
    uri: Uri = Field(description="Where the fine-tuned model goes: s3://bucket/prefix or a local folder.")
    merge_adapter: bool = Field(default=True, description="Also write merged/ (LoRA folded into the weights).")


class StorageSpec(_Spec):
    endpoint: str | None = Field(default=None, description="S3 endpoint URL; omit for AWS.")
    region: str = Field(default="us-east-1", description="S3 region.")
    secret_ref: str | None = Field(
        default=None, description="Secret holding AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY."
    )

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"{value!r} must be an http:// or https:// URL")
        return value


class ResourcesSpec(_Spec):
    nodes: int = Field(default=1, ge=1, le=1024, description="Pods (torchrun nodes).")
    gpus_per_node: int = Field(default=1, ge=0, le=64, description="GPUs per pod; 0 trains on CPU.")
    cpu: Quantity = Field(default="8", description="CPU request per pod (a quantity: 8, 500m).")
    memory: Quantity = Field(default="32Gi", description="Memory request per pod (a quantity: 32Gi, 512Mi).")
    node_selector: dict[str, LabelValue] = Field(
        default_factory=dict, description="Pod nodeSelector.",
        json_schema_extra={"x-kubernetes-validations": [LABEL_KEYS_RULE], "maxProperties": 64})
    tolerations: list[dict[str, Any]] = Field(default_factory=list, description="Pod tolerations.")
    priority_class_name: DnsSubdomain | None = Field(default=None, description="Pod priorityClassName.")
    guaranteed: bool = Field(
        default=False, description="Limits equal to requests, cpu included: Guaranteed QoS, which the kubelet's "
        "static CPU and topology managers need to give a pod whole cores next to its GPUs (use a whole-number cpu). "
        "false: cpu is a request only (Burstable QoS).")
    shm_size: Quantity | None = Field(
        default=None, description="Size of /dev/shm, which NCCL uses: memory-backed and counted in resources.memory; "
        "past it a write fails ('no space left on device') instead of the pod being OOMKilled. null = a quarter of "
        "resources.memory.")
    ephemeral_storage: Quantity | None = Field(
        default=None, description="Local disk per pod for the work volume (model and data downloads, checkpoint "
        "staging, outputs, temporary files): the pod's ephemeral-storage request and the volume's size limit (past "
        "it the kubelet evicts the pod). null = no size limit, and a request of what the pre-flight estimates from "
        "the model's size.")

    @field_validator("node_selector")
    @classmethod
    def _label_keys(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            name = key.rsplit("/", 1)[-1]
            if not re.match(LABEL_KEY, key) or len(name) > 63 or len(key) - len(name) > 254:
                raise ValueError(f"{key!r} is not a label key ([prefix/]name, the name at most 63 characters)")
        return value

    @model_validator(mode="after")
    def _shm_within_memory(self) -> ResourcesSpec:
        if self.shm_size is not None and quantity_value(self.shm_size) >= quantity_value(self.memory):
            raise ValueError(f"shmSize: {self.shm_size} is not below resources.memory {self.memory}: /dev/shm counts "
                             "in the pod's memory, so leave the trainer room")
        return self


class RunPolicySpec(_Spec):
    backoff_limit: int = Field(default=3, ge=0, description="Retries of a failed pod (bad input never retries).")
    active_deadline_seconds: int | None = Field(default=None, ge=1, description="Wall-clock limit of the job.")
    ttl_seconds_after_finished: int | None = Field(
        default=None, ge=0, description="Seconds after the end to delete the job and its children; a job whose "
        "model is served (deploy.kserve) is kept: delete it to stop serving.")
    suspend: bool = Field(default=False, description="Hold the job without running pods.")
    queue_name: LabelValue | None = Field(default=None, description="Kueue LocalQueue (kueue.x-k8s.io/queue-name).")
    max_free_restarts: int | None = Field(
        default=20, ge=0, description="Restarts after a disruption (eviction, preemption, a checkpoint on SIGTERM), "
        "which do not spend backoffLimit; one more fails the job. null = no cap.")
    termination_grace_period_seconds: int | None = Field(
        default=None, ge=contract.GRACE_MARGIN_SECONDS + 5, le=86400,
        description="Seconds a pod gets after SIGTERM (eviction, preemption, a node drain) to checkpoint and exit; "
        f"the trainer's own budget is {contract.GRACE_MARGIN_SECONDS} s less. null = from the pre-flight's estimate "
        "of the checkpoint each pod uploads, at 100 MB/s; "
        f"{contract.DEFAULT_GRACE_SECONDS + contract.GRACE_MARGIN_SECONDS} without one.")


class DryRunSpec(_Spec):
    fraction: float = Field(default=0.05, gt=0.0, le=1.0, description="Share of the examples to train on.")
    max_steps: int = Field(default=20, ge=1, le=10000, description="Updates to measure.")


class KServeSpec(_Spec):
    service_account_name: str | None = Field(
        default=None, description="ServiceAccount whose Secret KServe uses to read output.uri (S3 credentials)."
    )
    gpus: int = Field(default=0, ge=0, le=16, description="GPUs of the predictor pod.")
    cpu: str = Field(default="1", description="CPU request of the predictor pod.")
    memory: str = Field(default="4Gi", description="Memory request (and limit) of the predictor pod.")
    min_replicas: int | None = Field(default=None, ge=0, description="Predictor minReplicas (0 scales to zero).")


class DeploySpec(_Spec):
    kserve: KServeSpec | None = Field(
        default=None,
        description="Serve merged/ with a KServe InferenceService (Hugging Face runtime) once the job succeeded.",
    )


class MlflowSpec(_Spec):
    uri: str = Field(description="MLflow tracking server (http://mlflow.mlops:5000) or a local folder.")
    experiment: str = Field(default="kubetune", min_length=1, description="Experiment the run goes in (created "
                            "when missing).")
    secret_ref: DnsSubdomain | None = Field(
        default=None, description="Secret with MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or "
        "MLFLOW_TRACKING_TOKEN (each optional).")
    parent_run_name: str | None = Field(
        default=None, description="Nest the run under the experiment's parent run of this name (created when "
        "missing); a FineTuneSweep sets it to its own name, so its trials are child runs of one parent.")

    @field_validator("uri")
    @classmethod
    def _tracking_uri(cls, value: str) -> str:
        if not value.strip() or ("://" in value and not re.match(r"^(https?|file)://", value)):
            raise ValueError(f"{value!r}: an http(s):// URL of a tracking server, or a local folder")
        return value


class TrackingSpec(_Spec):
    mlflow: MlflowSpec | None = Field(default=None, description="Log parameters, metrics, tags and artifacts to "
                                      "MLflow (needs kubetune[tracking]); a tracking failure never fails the run.")


class FineTuneJobSpec(_Spec):
    model: ModelSpec = Field(description="The pre-trained model and task.")
    method: MethodSpec = Field(default_factory=MethodSpec, description="Which weights train.")
    data: DataSpec = Field(description="Where the data is and how it is read, cleaned and split.")
    hyperparameters: HyperparametersSpec = Field(default_factory=HyperparametersSpec, description="Optimization.")
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec, description="Validation and early stopping.")
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec, description="Checkpoints for resume.")
    output: OutputSpec = Field(description="Where the results go.")
    storage: StorageSpec = Field(default_factory=StorageSpec, description="S3-compatible object storage.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Pods and what they get.")
    run_policy: RunPolicySpec = Field(default_factory=RunPolicySpec, description="Retries, deadlines, queueing.")
    image: str | None = Field(default=None, description="Trainer image; default is the operator's.")
    image_pull_secrets: list[DnsSubdomain] = Field(
        default_factory=list, description="Secrets (docker-registry, in the job's namespace) for pulling the image, "
        "besides the operator's own.", json_schema_extra={"maxItems": 16})
    deploy: DeploySpec | None = Field(default=None, description="What to do with the model once it is written.")
    tracking: TrackingSpec | None = Field(default=None, description="Where the run is also recorded (MLflow).")
    dry_run: DryRunSpec | None = Field(
        default=None, description="Train briefly on a sample and report throughput, full-job time, memory and "
        "loss trend instead of producing a model (kubetune run --dry-run sets it).",
    )

    @model_validator(mode="after")
    def _metric_fits_task(self) -> FineTuneJobSpec:
        allowed: tuple[str, ...] = (CLASSIFICATION_METRICS if self.model.task == "sequence-classification"
                                    else CAUSAL_LM_METRICS)
        if self.method.type == "dpo":
            allowed = PREFERENCE_METRICS
        if self.evaluation.metric not in allowed:
            what = "method.type dpo" if self.method.type == "dpo" else f"task {self.model.task}"
            raise ValueError(
                f"evaluation.metric: {self.evaluation.metric!r} is not one of {', '.join(allowed)} for {what}"
            )
        return self

    @model_validator(mode="after")
    def _dpo_fits_task(self) -> FineTuneJobSpec:
        if self.method.type == "dpo" and self.model.task != "causal-lm":
            raise ValueError(f"method.type: dpo tunes causal LMs (model.task causal-lm), not {self.model.task}")
        if self.method.type == "dpo" and self.data.packing:
            raise ValueError("data.packing: dpo keeps each chosen/rejected pair whole in one micro-batch; set it to "
                             "false or leave it out")
        return self

    @model_validator(mode="after")
    def _gate_needs_a_test_split(self) -> FineTuneJobSpec:
        if self.evaluation.min_improvement is not None and not self.data.test and self.data.split.test == 0:
            raise ValueError("evaluation.minImprovement: the gate compares base and fine-tuned on the test split, "
                             "and this job has none: give data.test or a data.split.test above 0")
        return self

    @model_validator(mode="after")
    def _packing_fits_task(self) -> FineTuneJobSpec:
        if self.data.packing and self.model.task != "causal-lm":
            raise ValueError("data.packing: only causal-lm packs examples; set it to false or leave it out "
                             f"for task {self.model.task}")
        return self

    @model_validator(mode="after")
    def _default_learning_rate(self) -> FineTuneJobSpec:
        if self.hyperparameters.learning_rate is None:
            self.hyperparameters.learning_rate = DEFAULT_LEARNING_RATES[self._rate_key()]
        return self

    @model_validator(mode="after")
    def _deploy_needs_merged(self) -> FineTuneJobSpec:
        adapter_only = self.method.weights in ("lora", "qlora") and not self.output.merge_adapter
        if self.deploy and self.deploy.kserve and adapter_only:
            raise ValueError("deploy.kserve: serving needs merged/: set output.mergeAdapter to true")
        return self

    @model_validator(mode="after")
    def _qlora_needs_a_gpu(self) -> FineTuneJobSpec:
        if self.method.type == "qlora" and self.resources.gpus_per_node == 0:
            raise ValueError("method.type: qlora runs on CUDA GPUs only (bitsandbytes 4-bit weights) and "
                             "resources.gpusPerNode is 0: use method.type lora on CPU, or ask for a GPU")
        return self

    def learning_rate(self) -> float:
        """The peak learning rate in force: the spec's, else the method's default (filled in at validation)."""
        return self.hyperparameters.learning_rate or DEFAULT_LEARNING_RATES[self._rate_key()]

    def _rate_key(self) -> tuple[str, str]:
        return ("dpo", self.method.dpo.weights) if self.method.type == "dpo" else (self.method.type, self.model.task)

    def checkpoint_uri(self) -> str:
        return self.checkpoint.uri or self.output.uri.rstrip("/") + "/checkpoints/"


class Metadata(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(description="Job name (DNS label).")
    namespace: str | None = None

    @field_validator("name")
    @classmethod
    def _dns_label(cls, value: str) -> str:
        if len(value) > 63 or not _DNS_LABEL.match(value):
            raise ValueError(f"{value!r} must be a DNS label: lowercase letters, digits and '-', at most 63")
        return value


class Resource(BaseModel):
    """A kubetune object as written: each kind narrows `kind` and `spec` (FineTuneJob, FineTuneSweep)."""

    model_config = ConfigDict(populate_by_name=True, extra="forbid")
    api_version: Literal["kubetune.io/v1alpha1"] = Field(alias="apiVersion")
    kind: str
    metadata: Metadata
    spec: Any
    status: dict[str, Any] | None = None


class FineTuneJob(Resource):
    kind: Literal["FineTuneJob"]
    spec: FineTuneJobSpec
