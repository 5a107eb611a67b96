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

Task = Literal["sequence-classification", "causal-lm"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]

CLASSIFICATION_METRICS = ("eval_loss", "eval_accuracy", "eval_f1", "eval_precision", "eval_recall")
CAUSAL_LM_METRICS = ("eval_loss", "eval_perplexity")
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


class MethodSpec(_Spec):
    type: Literal["full", "partial", "lora", "qlora"] = Field(
        default="lora",
        description="full: all weights; partial: last layers or chosen modules; lora: PEFT LoRA; "
        "qlora: LoRA on 4-bit base weights (bitsandbytes, CUDA only).",
    )
    lora: LoraSpec = Field(default_factory=LoraSpec, description="LoRA settings (method.type=lora or qlora).")
    partial: PartialSpec | None = Field(default=None, description="Which weights train (method.type=partial).")

    @model_validator(mode="after")
    def _partial_present(self) -> MethodSpec:
        if self.type == "partial" and self.partial is None:
            raise ValueError("partial: method.type=partial needs partial.trainLastLayers or partial.trainModules")
        return self


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
        "2e-4 (causal LM), partial 1e-4 / 5e-5, full 2e-5 / 1e-5.",
    )
    batch_size: int = Field(default=16, ge=1, le=65536, description="Examples per device per micro-step.")
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

    @field_validator("node_selector")
    @classmethod
    def _label_keys(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            name = key.rsplit("/", 1)[-1]
            if not re.match(LABEL_KEY, key) or len(name) > 63 or len(key) - len(name) > 254:
                raise ValueError(f"{key!r} is not a label key ([prefix/]name, the name at most 63 characters)")
        return value


class RunPolicySpec(_Spec):
    backoff_limit: int = Field(default=3, ge=0, description="Retries of a failed pod (bad input never retries).")
    active_deadline_seconds: int | None = Field(default=None, ge=1, description="Wall-clock limit of the job.")
    ttl_seconds_after_finished: int | None = Field(default=None, ge=0, description="Delete children after this.")
    suspend: bool = Field(default=False, description="Hold the job without running pods.")
    queue_name: LabelValue | None = Field(default=None, description="Kueue LocalQueue (kueue.x-k8s.io/queue-name).")


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
    deploy: DeploySpec | None = Field(default=None, description="What to do with the model once it is written.")
    dry_run: DryRunSpec | None = Field(
        default=None, description="Train briefly on a sample and report throughput, full-job time, memory and "
        "loss trend instead of producing a model (kubetune run --dry-run sets it).",
    )

    @model_validator(mode="after")
    def _metric_fits_task(self) -> FineTuneJobSpec:
        allowed = CLASSIFICATION_METRICS if self.model.task == "sequence-classification" else CAUSAL_LM_METRICS
        if self.evaluation.metric not in allowed:
            raise ValueError(
                f"evaluation.metric: {self.evaluation.metric!r} is not one of {', '.join(allowed)} "
                f"for task {self.model.task}"
            )
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
            key = (self.method.type, self.model.task)
            self.hyperparameters.learning_rate = DEFAULT_LEARNING_RATES[key]
        return self

    @model_validator(mode="after")
    def _deploy_needs_merged(self) -> FineTuneJobSpec:
        adapter_only = self.method.type in ("lora", "qlora") and not self.output.merge_adapter
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
        return self.hyperparameters.learning_rate or DEFAULT_LEARNING_RATES[(self.method.type, self.model.task)]

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


class FineTuneJob(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="forbid")
    api_version: Literal["kubetune.io/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["FineTuneJob"]
    metadata: Metadata
    spec: FineTuneJobSpec
    status: dict[str, Any] | None = None
