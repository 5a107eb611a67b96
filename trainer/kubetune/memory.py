"""Memory per device for a spec, from the model's config.json alone (no torch: the operator's pre-flight uses it).

Parameters come from architecture arithmetic (embeddings, layers, head) for the families below; bytes per
parameter from the method and the trainer's dtypes; activations after Korthikanti et al. 2022, "Reducing
Activation Recomputation in Large Transformer Models" (eq. 2: s*b*h*(34 + 5*a*s/h) bytes per layer in 16-bit).
The result picks the strategy (`auto`) and gradient checkpointing (`null`) the trainer will use.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from kubetune.contract import ENV_DEVICE_MEMORY
from kubetune.errors import UserError
from kubetune.spec import QUANTITY, FineTuneJob, FineTuneJobSpec, quantity_value

GiB = 1 << 30
NF4_BYTES = 0.5 + 4 / 64  # 4-bit weights plus one fp32 absmax per block of 64 (bitsandbytes NF4)
ADAMW_STATES = 2          # exp_avg and exp_avg_sq, fp32
# Around the loss: the logits, a copy, log-softmax's output, and two gradients of that size. The trainer computes
# logits at target positions only (train/speedups/target_logits.py); before the data is read, every position counts.
LOGIT_COPIES = 4
# Beyond the plan's tensors a device needs room for what no formula here counts: the caching allocator's
# fragmentation (reserved over allocated), and on a GPU the CUDA context, cuBLAS workspaces and NCCL buffers.
HEADROOM_FRACTION = 0.10
GPU_HEADROOM_BYTES = 2 * GiB
LORA_DEFAULT_TARGETS = {"gpt2": ["c_attn"], "bert": ["query", "value"], "roberta": ["query", "value"],
                        "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"]}


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs from config.json."""

    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    positions: int    # learned absolute positions (0 for rotary models)
    type_vocab: int   # BERT token types
    gated: bool       # SwiGLU MLP: three matrices instead of two
    biases: bool
    tied: bool        # lm_head shares the embedding matrix
    dropout: bool
    python_gelu: bool  # GPT-2's gelu_new: a chain of Python ops, each keeping its output for backward

    @property
    def kv_dim(self) -> int:
        return self.hidden * self.kv_heads // max(self.heads, 1)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear module of one layer, by the names peft targets."""
        h, i, kv = self.hidden, self.intermediate, self.kv_dim
        if self.model_type == "gpt2":
            return {"c_attn": (h, 3 * h), "c_proj": (h, h), "c_fc": (h, i), "mlp.c_proj": (i, h)}
        if self.model_type in ("bert", "roberta"):
            return {"query": (h, h), "key": (h, h), "value": (h, h), "attention.output.dense": (h, h),
                    "intermediate.dense": (h, i), "output.dense": (i, h)}
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def layer_parameters(self) -> int:
        linears = self.linear_shapes()
        if not self.gated:
            linears.pop("gate_proj", None)
        weights = sum(a * b for a, b in linears.values())
        bias = sum(b for _, b in linears.values()) if self.biases else 0
        norms = (2 if self.model_type != "gpt2" and not self.biases else 4) * self.hidden
        return weights + bias + norms

    def embedding_parameters(self) -> int:
        return (self.vocab + self.positions + self.type_vocab) * self.hidden

    def head_parameters(self, task: str, labels: int) -> int:
        if task == "sequence-classification":
            pooler = self.hidden * self.hidden + self.hidden if self.model_type in ("bert", "roberta") else 0
            return pooler + self.hidden * labels + (labels if self.model_type in ("bert", "roberta") else 0)
        return 0 if self.tied else self.vocab * self.hidden

    def root_parameters(self, task: str, labels: int) -> int:
        """Outside the blocks: embeddings, final norm, head. FSDP's root unit, gathered from forward to backward."""
        return self.parameters(task, labels) - self.layers * self.layer_parameters()

    def parameters(self, task: str, labels: int) -> int:
        final_norm = 2 * self.hidden if self.model_type == "gpt2" else (self.hidden if not self.biases else 0)
        embedding_norm = 2 * self.hidden if self.model_type in ("bert", "roberta") else 0
        return (self.embedding_parameters() + embedding_norm + self.layers * self.layer_parameters() + final_norm
                + self.head_parameters(task, labels))


def model_shape(config: dict[str, Any]) -> ModelShape:
    def first(*keys: str, default: int = 0) -> int:
        return next((int(config[k]) for k in keys if config.get(k) is not None), default)

    model_type = str(config.get("model_type", "unknown"))
    hidden = first("hidden_size", "n_embd", "d_model")
    layers = first("num_hidden_layers", "n_layer", "num_layers")
    if not hidden or not layers:
        raise UserError(f"spec.model.uri: config.json of model_type {model_type!r} names no hidden size or "
                        "layer count (hidden_size/n_embd, num_hidden_layers/n_layer)")
    heads = first("num_attention_heads", "n_head", default=1)
    rotary = model_type not in ("gpt2", "bert", "roberta") and "max_position_embeddings" in config
    dropouts = [config.get(k) for k in ("attention_probs_dropout_prob", "hidden_dropout_prob", "attn_pdrop",
                                        "resid_pdrop", "attention_dropout", "dropout")]
    return ModelShape(
        model_type=model_type, hidden=hidden, layers=layers, heads=heads,
        kv_heads=first("num_key_value_heads", default=heads),
        intermediate=first("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden),
        vocab=first("vocab_size"),
        positions=0 if rotary else first("n_positions", "max_position_embeddings"),
        type_vocab=first("type_vocab_size"),
        gated=model_type not in ("gpt2", "bert", "roberta") and config.get("hidden_act", "silu") == "silu",
        biases=model_type in ("gpt2", "bert", "roberta") or bool(config.get("attention_bias")),
        tied=bool(config.get("tie_word_embeddings", True)),
        dropout=any(isinstance(d, (int, float)) and d > 0 for d in dropouts),
        python_gelu=config.get("activation_function", config.get("hidden_act")) == "gelu_new",
    )


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device, and the strategy and checkpointing the trainer will use."""

    weights: int                  # held all along: the replica (ddp) or this rank's shards (fsdp)
    gradients: int
    optimizer: int
    activations: int
    strategy: str                 # ddp | fsdp
    gradient_checkpointing: bool
    fits: bool                    # True when device_bytes is unknown (nothing to check against)
    device_bytes: int | None
    world_size: int
    parameters: int
    trainable: int
    gathered: int = 0             # fsdp: unsharded in flight (root unit, two blocks, their gradients)
    best: int = 0                 # the best model's copy when the device is the host (a GPU's is in host memory)
    headroom: int = 0             # allocator fragmentation; a GPU's context and NCCL buffers
    precision: str = "fp32"       # what the bytes were counted for (the resolved precision, or the spec's)
    notes: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        return self.weights + self.gathered + self.gradients + self.optimizer + self.activations + self.best

    @property
    def needed(self) -> int:
        """What the device must have: the plan's tensors plus the headroom; the fit is judged on this."""
        return self.total + self.headroom

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "notes": list(self.notes), "total": self.total, "needed": self.needed}

    def table(self) -> str:
        rows = [("weights", self.weights), ("gathered", self.gathered), ("gradients", self.gradients),
                ("optimizer", self.optimizer), ("activations", self.activations), ("best copy", self.best),
                ("total", self.total), ("headroom", self.headroom), ("needed", self.needed)]
        rows = [(name, value) for name, value in rows if value or name not in ("gathered", "best copy")]
        lines = [f"memory per device ({self.world_size} device(s), {self.parameters:,} parameters, "
                 f"{self.trainable:,} trainable):"]
        lines += [f"  {name:<12}{_gib(value):>10}" for name, value in rows]
        device = _gib(self.device_bytes) if self.device_bytes is not None else "unknown (fit not checked)"
        lines.append(f"  {'device':<12}{device:>10}")
        checkpointing = "on" if self.gradient_checkpointing else "off"
        lines.append(f"  strategy {self.strategy}, gradient checkpointing {checkpointing}, {self.precision}"
                     + ("" if self.fits else ", DOES NOT FIT"))
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)

    def advice(self, spec: FineTuneJobSpec) -> str:
        """One message: what is needed, what the device has, and which fields to change."""
        hp = spec.hyperparameters
        gpu = spec.resources.gpus_per_node > 0  # qlora and more GPUs are no advice for a CPU job
        options = []
        if spec.method.type == "dpo" and spec.method.weights == "full":
            options.append("spec.method.dpo.weights: lora (the reference is then the same weights, adapters off)")
            if not spec.method.dpo.precompute_reference:
                options.append("spec.method.dpo.precomputeReference: true (no frozen reference copy)")
        elif spec.method.type in ("full", "partial"):
            options.append("spec.method.type: lora" + (" (or qlora)" if gpu else ""))
        elif spec.method.type == "lora" and gpu and self.device_bytes is not None:
            options.append("spec.method.type: qlora (4-bit base, GPU only)")
        if gpu:
            options.append("more GPUs (spec.resources.nodes / gpusPerNode, with hyperparameters.strategy auto or "
                           "fsdp)")
        else:
            options.append(f"more memory per pod than spec.resources.memory {spec.resources.memory}, or more pods "
                           "(spec.resources.nodes, with hyperparameters.strategy auto or fsdp)")
        if hp.batch_size > 1:
            options.append(f"a smaller spec.hyperparameters.batchSize than {hp.batch_size} (raise "
                           "gradientAccumulationSteps to keep the global batch)")
        if not self.gradient_checkpointing:
            options.append("spec.hyperparameters.gradientCheckpointing: true (or null)")
        options.append(f"a shorter spec.data.maxSeqLength than {spec.data.max_seq_length}")
        return (f"spec.resources: the job needs about {_gib(self.needed)} per device (weights {_gib(self.weights)}, "
                f"gradients {_gib(self.gradients)}, optimizer {_gib(self.optimizer)}, activations "
                f"{_gib(self.activations)}, headroom {_gib(self.headroom)}; {self.strategy}, checkpointing "
                f"{'on' if self.gradient_checkpointing else 'off'}) but a device has "
                f"{_gib(self.device_bytes or 0)}: use " + "; or ".join(options))


def _gib(value: int) -> str:
    return f"{value / GiB:.2f} GiB"


def read_config(folder: str | Path) -> dict[str, Any]:
    """A local model's config.json; for another job's adapter/ (kubetune/lineage.py), its base model's."""
    from kubetune import lineage
    from kubetune.storage import Storage, is_s3

    for _ in range(lineage.MAX_DEPTH):
        if not lineage.is_adapter(Path(folder)):
            break
        base = lineage.base_uri(Storage(), str(folder), Path(folder))
        if is_s3(base):
            raise UserError(f"spec.model.uri: {folder}: a LoRA adapter on {base}, in S3: `kubetune validate --deep` "
                            "reads that model's config")
        folder = base
    path = Path(folder) / "config.json"
    try:
        config: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"spec.model.uri: {folder}: cannot read config.json ({exc})") from None
    return config


def plan(spec: FineTuneJobSpec | FineTuneJob, *, world_size: int, device_bytes: int | None,
         config: dict[str, Any] | None = None, precision: str | None = None, gpu: bool | None = None) -> MemoryPlan:
    """The estimate for `world_size` processes on devices of `device_bytes` (None: do not check the fit).

    `config` is the model's config.json; when absent it is read from spec.model.uri (a local folder).
    `precision` is the one the trainer resolved for its device (fp32, bf16, fp16); None counts the spec's,
    where `auto` on a GPU may be either half type and is counted as the costlier. `gpu`: whether the devices
    are GPUs (the trainer knows; None: the spec's resources.gpusPerNode says).
    """
    spec = spec.spec if isinstance(spec, FineTuneJob) else spec
    shape = model_shape(config if config is not None else read_config(spec.model.uri))
    hp = spec.hyperparameters
    world = max(world_size, 1)
    notes: list[str] = []
    checkpointing_options = [False, True] if hp.gradient_checkpointing is None else [hp.gradient_checkpointing]
    strategies = ["ddp", "fsdp"] if hp.strategy == "auto" else [hp.strategy]
    if hp.strategy == "auto" and (world == 1 or spec.method.weights == "qlora"):
        strategies = ["ddp"]  # one process: sharding saves nothing; qlora: the trainer does not shard 4-bit weights
    counted = precision or hp.precision
    gpu = spec.resources.gpus_per_node > 0 if gpu is None else gpu
    candidates = [_estimate(spec, shape, world, s, c, counted, gpu) for s in strategies for c in checkpointing_options]
    if device_bytes is None:
        chosen = candidates[0]
        notes.append("device memory unknown: fit not checked (set KUBETUNE_DEVICE_MEMORY or --device-memory, "
                     "or resources.gpusPerNode: 0 with resources.memory)")
    else:
        fitting = [c for c in candidates if c.needed <= device_bytes]
        # Prefer replication (no gather traffic), then no recomputation; else the smallest.
        chosen = fitting[0] if fitting else min(candidates, key=lambda c: c.needed)
    if shape.model_type not in ("gpt2", "bert", "roberta", "llama", "mistral", "qwen2"):
        notes.append(f"model_type {shape.model_type!r}: parameters counted as a llama-style decoder")
    if spec.method.weights == "partial" and spec.method.partial and spec.method.partial.train_modules:
        notes.append("partial.trainModules: counted as full fine-tuning (an upper bound)")
    if spec.method.type == "dpo":
        reference = ("precomputed before training, no copy kept" if spec.method.dpo.precompute_reference else
                     "the same weights with the adapters off" if spec.method.weights == "lora" else
                     "a frozen copy, counted in weights")
        notes.append(f"dpo: activations for chosen and rejected rows; reference: {reference}")
    if gpu and chosen.trainable:
        best = chosen.trainable * 4 // (world if chosen.strategy == "fsdp" else 1)
        notes.append(f"host memory per process: {_gib(best)} for the best model's copy (kept off the GPU)")
    fits = device_bytes is None or chosen.needed <= device_bytes
    return replace(chosen, fits=fits, device_bytes=device_bytes, notes=tuple(notes))


def _estimate(spec: FineTuneJobSpec, shape: ModelShape, world: int, strategy: str, checkpointing: bool,
              precision: str, gpu: bool) -> MemoryPlan:
    hp, method, task = spec.hyperparameters, spec.method.weights, spec.model.task
    labels = len(spec.model.labels or [])
    total = shape.parameters(task, labels)
    trainable = _trainable(spec, shape, total, labels)
    # The trainer keeps fp32 master weights for every method; qlora's quantised linears take ~0.56 B/param, and
    # LoRA's frozen base on a bf16 GPU 2 B/param (model.frozen_weights_dtype). Unresolved `auto` counts fp32: it is
    # bf16 from Ampere on but fp16 (frozen base kept fp32) before, which the spec alone cannot tell.
    bf16_gpu = gpu and precision == "bf16"
    weights: float
    if method == "qlora":
        linears = [v for k, v in shape.linear_shapes().items() if shape.gated or k != "gate_proj"]
        quantised = shape.layers * sum(a * b for a, b in linears)
        weights = quantised * NF4_BYTES + (total - quantised) * 4 + trainable * 4
    elif method == "lora" and strategy == "ddp" and bf16_gpu:
        weights = total * 2 + trainable * 4
    else:
        weights = total * 4 + (trainable * 4 if method == "lora" else 0)
    gradients: float = trainable * 4
    optimizer: float = trainable * 4 * ADAMW_STATES
    best: float = trainable * 4 if not gpu else 0  # on a GPU the copy is in host memory, not on the device
    gathered: float = 0
    if strategy == "fsdp":
        weights, gradients, optimizer, best = weights / world, gradients / world, optimizer / world, best / world
        gathered = _gathered(spec, shape, trainable, precision, gpu)
    if hp.offload_optimizer and strategy == "fsdp":  # FSDP's CPU offload; DDP keeps the state on the device
        optimizer = 0
    activations = activation_bytes(spec, shape, checkpointing, precision, gpu)
    if spec.method.type == "dpo":  # each pair is two rows; full weights also keep a frozen reference copy
        activations *= 2
        if method == "full" and not spec.method.dpo.precompute_reference:
            weights += total * (2 if gpu and precision in ("bf16", "fp16") else 4)  # fsdp: refused, not sharded
    held = weights + gathered + gradients + optimizer + activations + best
    headroom = held * HEADROOM_FRACTION + (GPU_HEADROOM_BYTES if gpu else 0)
    return MemoryPlan(int(weights), int(gradients), int(optimizer), int(activations), strategy, checkpointing,
                      True, None, world, total, trainable, gathered=int(gathered), best=int(best),
                      headroom=int(headroom), precision=precision)


def _gathered(spec: FineTuneJobSpec, shape: ModelShape, trainable: int, precision: str, gpu: bool) -> float:
    """What FSDP holds unsharded besides its shards. The root unit (embeddings, final norm, head: 1.05 B
    parameters for Llama-3-8B) is gathered at the forward's start and kept until backward ends, its gradients
    from the head's backward on; of the blocks, the one computing and the next one (prefetched), and one block's
    gradients before their reduce-scatter. The trainer reduce-scatters every micro-batch, so accumulation adds
    nothing. Gathered weights are in the compute dtype on a GPU (the mixed-precision policy), fp32 on a CPU."""
    labels = len(spec.model.labels or [])
    half = gpu and precision in ("bf16", "fp16", "auto")
    weight_bytes = 2 if half else 4
    root, layer = shape.root_parameters(spec.model.task, labels), shape.layer_parameters()
    root_trainable = min(trainable, _root_trainable(spec, shape, labels))
    return (root + 2 * layer) * weight_bytes + (root_trainable + min(trainable - root_trainable, layer)) * 4


def _trainable(spec: FineTuneJobSpec, shape: ModelShape, total: int, labels: int) -> int:
    method, task = spec.method.weights, spec.model.task
    head = shape.head_parameters(task, labels)
    if task == "causal-lm" and shape.tied:
        head = shape.vocab * shape.hidden  # a tied head is the embedding matrix
    if method == "full":
        return total
    if method == "partial":
        partial = spec.method.partial
        if partial is None or partial.train_last_layers is None:
            return total
        return min(partial.train_last_layers, shape.layers) * shape.layer_parameters() + head
    lora = spec.method.lora
    targets = lora.target_modules or LORA_DEFAULT_TARGETS.get(shape.model_type, ["q_proj", "v_proj"])
    shapes = shape.linear_shapes()
    per_layer = 0
    for target in targets:
        # peft matches by suffix: "dense" hits every *.dense of the layer.
        matched = [v for k, v in shapes.items() if k == target or k.endswith("." + target)] or [(shape.hidden,
                                                                                                  shape.hidden)]
        per_layer += sum(lora.r * (a + b) for a, b in matched)
    new_head = head if task == "sequence-classification" else 0  # modules_to_save: the fresh classifier
    return shape.layers * per_layer + new_head


def _root_trainable(spec: FineTuneJobSpec, shape: ModelShape, labels: int) -> int:
    """Trainable parameters of the root unit: all of it (full), the head (partial), a fresh classifier (LoRA)."""
    method, task = spec.method.weights, spec.model.task
    if method == "full" or (method == "partial" and (spec.method.partial is None
                                                      or spec.method.partial.train_last_layers is None)):
        return shape.root_parameters(task, labels)
    head = shape.vocab * shape.hidden if task == "causal-lm" and shape.tied else shape.head_parameters(task, labels)
    if method == "partial":
        return head
    return head if task == "sequence-classification" else 0


def activation_bytes(spec: FineTuneJobSpec, shape: ModelShape, checkpointing: bool,
                     precision: str | None = None, gpu: bool | None = None) -> int:
    """Peak activation memory of one micro-batch of maxSeqLength tokens.

    Korthikanti et al. 2022 (eq. 2) count per layer, in 16-bit, 34*s*b*h + 5*a*s^2*b bytes for an MLP of 4h:
    8 tensors of s*b*h elements (attention 5, MLP input, 2 norms), 2 of s*b*i (GeLU input, second linear's
    input), 2 of a*s^2*b (softmax, its dropout), and one-byte dropout masks (2 s*b*h, 1 a*s^2*b). Here i is the
    config's intermediate size; a gated MLP keeps 4 s*b*i tensors and GPT-2's Python tanh-GeLU 5. fp32 doubles
    the bytes per element.
    """
    hp = spec.hyperparameters
    precision = precision or hp.precision
    gpu = spec.resources.gpus_per_node > 0 if gpu is None else gpu
    s, b, h, a, i = spec.data.max_seq_length, hp.batch_size, shape.hidden, shape.heads, shape.intermediate
    half = precision in ("bf16", "fp16") or spec.method.weights == "qlora" or (
        precision == "auto" and gpu)
    per_element = 2 if half else 4
    mlp = 4 if shape.gated else (5 if shape.python_gelu else 2)
    # On GPUs attention runs fused (SDPA's flash / cuDNN / memory-efficient kernels): no s x s scores, softmax or
    # dropout mask is kept for backward. Measured on an H100 (bench/gpu.py, LoRA, 16 x 1024 tokens): 683 M
    # parameters 24528 MiB, 973 M 30397 MiB, where counting the scores gave 41404 and 73828 (now 24271, 30625).
    scores = 0 if gpu else a * s * s * b
    masks = (2 * s * b * h + scores) if shape.dropout else 0
    # QLoRA: peft's prepare_model_for_kbit_training upcasts the norms, so the residual stream, the norms' inputs
    # and outputs (4 of the 8 s*b*h tensors) are fp32 (H100, 683 M, 8 x 1024: measured 16763 MiB, estimate 13521).
    wide = 4 * s * b * h * 2 if spec.method.weights == "qlora" else 0
    layer = per_element * (8 * s * b * h + mlp * s * b * i + 2 * scores) + masks + wide
    # Checkpointed, a layer keeps its input (the residual stream stays fp32 under autocast) and one is recomputed.
    layers = shape.layers * s * b * h * 4 + layer if checkpointing else shape.layers * layer
    logits = s * b * shape.vocab * 4 * LOGIT_COPIES if spec.model.task == "causal-lm" else 0
    return int(layers + logits)


def world_size(spec: FineTuneJobSpec) -> int:
    """Training processes of the job: one per GPU, one per node on CPU."""
    return max(spec.resources.nodes * max(spec.resources.gpus_per_node, 1), 1)


def parse_quantity(value: str) -> int | None:
    """A Kubernetes quantity in bytes (32Gi, 512Mi, 1G, 1e9, 1Pi, 500m rounds down); None when it is not one."""
    return int(quantity_value(value)) if re.match(QUANTITY, value) else None


def device_memory(spec: FineTuneJobSpec, override: str | None = None) -> int | None:
    """Per-device bytes for validate: --device-memory, $KUBETUNE_DEVICE_MEMORY, or resources.memory on CPU."""
    for source, value in (("--device-memory", override), (ENV_DEVICE_MEMORY, os.environ.get(ENV_DEVICE_MEMORY))):
        if value:
            parsed = parse_quantity(value)
            if not parsed:  # 0 is no device size either: it would report every job as unable to fit
                raise UserError(f"{source}: {value!r} is not a memory size like 80Gi")
            return parsed
    if spec.resources.gpus_per_node == 0:
        return parse_quantity(spec.resources.memory)
    return None


def host_available_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux; else physical memory), capped by a cgroup v2 limit (a pod's)."""
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available
