"""Load the base model and make the chosen weights trainable: full, partial, LoRA or QLoRA (LoRA on a 4-bit base)."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from kubetune.errors import UserError
from kubetune.spec import FineTuneJobSpec
from kubetune.train import distributed
from kubetune.train.precision import Precision
from kubetune.train.speedups.fused_gelu import fuse_tanh_gelu

log = logging.getLogger("kubetune.trainer")
# Families that number positions from pad_token_id + 1 (transformers' create_position_ids_from_input_ids), so that
# many fewer are usable; tests/test_positions.py checks the list against the installed transformers.
OFFSET_POSITIONS = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "roberta-prelayernorm", "xmod",
                    "data2vec-text", "longformer", "ibert", "mpnet", "luke", "esm", "markuplm", "lilt", "layoutlmv3"}


@dataclass
class ParamCounts:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)


def load_tokenizer(model_dir: Path, uri: str) -> Any:
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError) as exc:
        raise UserError(f"spec.model.uri: {uri}: no usable tokenizer in the model folder ({exc})") from None
    if tokenizer.pad_token is None:
        # GPT-style tokenizers have no pad token; padding positions are masked out anyway.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(spec: FineTuneJobSpec, model_dir: Path, pad_token_id: int | None = None,
                    loading: dict[str, Any] | None = None) -> nn.Module:
    uri = spec.model.uri
    if not (model_dir / "config.json").is_file():
        raise UserError(f"spec.model.uri: {uri}: not a model folder (no config.json)")
    # fp32 master weights whatever the checkpoint's dtype (transformers 5 defaults to dtype="auto"): bf16 weights
    # lose small updates, fp16 ones break loss scaling. Half precision is autocast's job (precision.py).
    options: dict[str, Any] = {"output_loading_info": True, "dtype": torch.float32, **(loading or {})}
    try:
        AutoConfig.from_pretrained(model_dir)
        if spec.model.task == "sequence-classification":
            labels = spec.model.labels or []
            model, info = AutoModelForSequenceClassification.from_pretrained(
                model_dir,
                num_labels=len(labels),
                id2label=dict(enumerate(labels)),
                label2id={name: i for i, name in enumerate(labels)},
                ignore_mismatched_sizes=True,  # a base with another head gets a fresh one of our size
                **options,
            )
            if pad_token_id is not None:
                # Decoder classifiers pool the last non-pad token: they must know the pad id the tokenizer uses.
                model.config.pad_token_id = pad_token_id
        else:
            model, info = AutoModelForCausalLM.from_pretrained(model_dir, **options)  # type: ignore[misc]
    except SafetensorError as exc:  # a partial upload or download: a retry would fail the same way
        raise UserError(f"spec.model.uri: {uri}: {_damaged_weights(model_dir)} is damaged or incomplete ({exc}); "
                        "copy the model folder again") from None
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"spec.model.uri: {uri}: cannot load a {spec.model.task} model from it ({exc})") from None
    model.kubetune_use_cache = getattr(model.config, "use_cache", None)  # restored in the saved config
    model.config.use_cache = False  # the KV cache only helps generation and costs memory in training
    # Freshly initialised modules (a new head, a missing pooler) must train whatever the method.
    missing = set(info.get("missing_keys", ())) | {k for k, *_ in info.get("mismatched_keys", ())}
    model.kubetune_new_modules = new_module_roots(model, missing)
    return model


def _damaged_weights(model_dir: Path) -> str:
    """The first .safetensors file whose header does not cover the file (safe_open reads only the header)."""
    for path in sorted(model_dir.glob("*.safetensors")):
        try:
            safe_open(path, "pt")
        except SafetensorError:
            return path.name
    return "a weights file"


SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def merge_adapters(spec: FineTuneJobSpec, base_dir: Path, adapters: list[Path], dest: Path) -> Path:
    """The base with each adapter folded in, in order, saved at dest in the base's stored dtype with the last
    adapter's tokenizer: another job's adapter/ output as this job's starting model (kubetune/lineage.py)."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    model: Any = load_base_model(spec, base_dir)
    for adapter in adapters:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.to(stored_dtype(base_dir))
    model.save_pretrained(dest, safe_serialization=True)
    AutoTokenizer.from_pretrained(adapters[-1]).save_pretrained(dest)
    return dest


def stored_dtype(model_dir: Path) -> torch.dtype:
    """The dtype the base's floating weights are stored in (most tensors of the safetensors headers; else the
    config's dtype; else fp32): what merged/ is written in, so it is the size the base was."""
    counts: dict[torch.dtype, int] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(path, "pt") as weights:
            for key in weights.keys():  # noqa: SIM118  # safe_open has keys(), no iteration
                dtype = SAFETENSORS_DTYPES.get(weights.get_slice(key).get_dtype())
                if dtype is not None:
                    counts[dtype] = counts.get(dtype, 0) + 1
    if counts:
        return max(counts, key=lambda d: counts[d])
    config = AutoConfig.from_pretrained(model_dir)
    named = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    named = getattr(torch, named, None) if isinstance(named, str) else named
    return named if isinstance(named, torch.dtype) and named.is_floating_point else torch.float32


def new_module_roots(model: nn.Module, missing: set[str]) -> list[str]:
    """Full names of the outermost modules whose parameters are all new: `classifier`, not `classifier.dense`.

    peft matches modules_to_save by name suffix, so a short name like `dense` would also hit every layer's dense.
    """
    names = [n for n, _ in model.named_parameters()]
    roots = set()
    for key in missing:
        parts = key.split(".")[:-1]
        prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
        whole = (p for p in prefixes if all(n in missing for n in names if n.startswith(p + ".")))
        root = next(whole, ".".join(parts))  # no wholly new ancestor: the parameter's own module
        if root:
            roots.add(root)
    return sorted(roots)


def max_sequence_length(requested: int, model_dir: Path, tokenizer: Any) -> int:
    """`requested`, clamped to the positions the model has (beyond them it crashes mid-run, on CUDA as an assert)."""
    config = AutoConfig.from_pretrained(model_dir)
    limits = [int(tokenizer.model_max_length)] if tokenizer.model_max_length < 1e9 else []  # 1e30 means unset
    positions = getattr(config, "max_position_embeddings", None)
    if positions:
        limits.append(int(positions) - position_offset(config))
    limit = min(limits, default=requested)
    if requested > limit:
        if distributed.is_main():
            log.warning("spec.data.maxSeqLength %d is more than this model's %d positions: using %d", requested,
                        limit, limit)
        return limit
    return requested


def position_offset(config: Any) -> int:
    """Positions a model cannot use: RoBERTa-style ones start at pad_token_id + 1 (MPNet's padding index is 1)."""
    if config.model_type not in OFFSET_POSITIONS:
        return 0
    return (1 if config.model_type == "mpnet" else config.pad_token_id or 0) + 1


def check_token_ids(model_dir: Path, uri: str, tokenizer: Any, *example_sets: list[dict[str, Any]]) -> None:
    """Every id the data encodes to (and the pad id) must have a row in the model's input embedding. A tokenizer
    from another model, or one with tokens added but no resized embedding, otherwise fails in the first step:
    an index error on CPU, a device-side assert that kills the process on CUDA."""
    rows = getattr(AutoConfig.from_pretrained(model_dir).get_text_config(), "vocab_size", None)
    if not rows:
        return  # no vocab_size in the config: nothing to compare against
    ids = [max(e["input_ids"], default=-1) for examples in example_sets for e in examples]
    highest = max([*ids, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else -1], default=-1)
    if highest >= rows:
        token = tokenizer.convert_ids_to_tokens(highest)
        raise UserError(f"spec.model.uri: {uri}: the tokenizer produces token id {highest} ({token!r}) but the "
                        f"model's embedding has {rows} rows (config vocab_size): the tokenizer files belong to "
                        "another model, or tokens were added without resizing the embedding. Put the model's own "
                        "tokenizer in the folder, or call model.resize_token_embeddings(len(tokenizer)) and save "
                        "the model with it")


def count_parameters(model: nn.Module) -> ParamCounts:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return ParamCounts(trainable, total)


def _head_parameter_names(model: Any) -> set[str]:
    """The task head: parameters outside the base transformer (classifier, score, lm_head...)."""
    prefix = getattr(model, "base_model_prefix", "")
    names = {n for n, _ in model.named_parameters() if prefix and not n.startswith(prefix + ".")}
    new = tuple(f"{m}." for m in getattr(model, "kubetune_new_modules", []))
    names |= {n for n, _ in model.named_parameters() if new and n.startswith(new)}
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None:
        # A tied LM head is the embedding matrix: training "the head" means training it.
        ids = {id(p) for p in output.parameters()}
        names |= {n for n, p in model.named_parameters() if id(p) in ids}
    return names


def layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer blocks: the ModuleList holding the most parameters."""
    stacks = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not stacks:
        raise UserError("spec.method.partial: this model has no stack of transformer layers to select from")
    return max(stacks, key=lambda item: sum(p.numel() for p in item[1].parameters()))


def apply_partial(model: nn.Module, spec: FineTuneJobSpec) -> nn.Module:
    partial = spec.method.partial
    assert partial is not None  # guaranteed by the spec model
    trainable = _head_parameter_names(model)
    if partial.train_last_layers is not None:
        stack_name, stack = layer_stack(model)
        if partial.train_last_layers > len(stack):
            raise UserError(
                f"spec.method.partial.trainLastLayers: {partial.train_last_layers} > {len(stack)} layers in the model"
            )
        first = len(stack) - partial.train_last_layers
        layer_prefixes = tuple(f"{stack_name}.{i}." for i in range(first, len(stack)))
        trainable |= {n for n, _ in model.named_parameters() if n.startswith(layer_prefixes)}
    else:
        patterns = [re.compile(p) for p in partial.train_modules or []]
        matched = {n for n, _ in model.named_parameters() if any(p.search(n) for p in patterns)}
        if not matched:
            raise UserError(f"spec.method.partial.trainModules: {partial.train_modules} match no parameter")
        trainable |= matched
    for name, parameter in model.named_parameters():
        parameter.requires_grad = name in trainable
    return model


def apply_lora(model: nn.Module, spec: FineTuneJobSpec) -> nn.Module:
    from peft import LoraConfig, TaskType, get_peft_model

    lora = spec.method.lora
    task = TaskType.SEQ_CLS if spec.model.task == "sequence-classification" else TaskType.CAUSAL_LM
    config = LoraConfig(
        task_type=task,
        r=lora.r,
        lora_alpha=lora.alpha,  # type: ignore[arg-type]  # peft accepts floats at run time
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,  # None: peft's per-architecture defaults
        modules_to_save=list(getattr(model, "kubetune_new_modules", [])) or None,
    )
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise UserError(f"spec.method.lora.targetModules: {exc}") from None


def require_cuda_for_qlora(spec: FineTuneJobSpec, device: torch.device) -> None:
    """QLoRA's 4-bit kernels (bitsandbytes) run on CUDA only: elsewhere it is bad input, not a crash."""
    if spec.method.weights == "qlora" and device.type != "cuda":
        raise UserError(f"spec.method.type: qlora needs a CUDA GPU (bitsandbytes 4-bit weights) and this process "
                        f"runs on {device.type}: use method.type lora here, or run on a GPU")


def load_quantized_base(spec: FineTuneJobSpec, model_dir: Path, pad_token_id: int | None,
                        precision: Precision | None = None) -> nn.Module:
    """The base in 4-bit NF4 (double-quantised), computing in the run's precision (bf16, or fp16 before Ampere:
    autocast and the 4-bit matmuls must agree), prepared for k-bit training."""
    try:
        import bitsandbytes  # noqa: F401  # the [qlora] extra; imported here so other methods never need it
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig
    except ImportError as exc:
        raise UserError(f"spec.method.type: qlora needs bitsandbytes (pip install 'kubetune[qlora]'): {exc}"
                        ) from None
    compute = quantized_compute_dtype(precision)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=compute)
    model = load_base_model(spec, model_dir, pad_token_id,
                            {"quantization_config": quantization, "dtype": compute,
                             "device_map": {"": distributed.device()}})
    # Casts norms and the head to fp32 and makes the inputs require grad; checkpointing is ours to switch.
    prepared: nn.Module = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return prepared


def quantized_compute_dtype(precision: Precision | None) -> torch.dtype:
    """bitsandbytes' compute dtype: the autocast dtype (fp32 when the run is fp32); bf16 when none is known."""
    if precision is None:
        return torch.bfloat16
    return precision.dtype or torch.float32


def enable_gradient_checkpointing(model: nn.Module, lora: bool) -> None:
    """Recompute each layer's activations in backward; non-reentrant works with DDP and frozen inputs."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.x; the old one warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)  # type: ignore[operator]
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)  # type: ignore[operator]
    if lora:
        # A frozen embedding output needs grad for the checkpointed layers' LoRA weights to get any (PEFT's advice).
        model.enable_input_require_grads()  # type: ignore[operator]


def empty_base_model(spec: FineTuneJobSpec, model_dir: Path, pad_token_id: int | None,
                     new_modules: list[str]) -> nn.Module:
    """The base model's structure on the meta device, no weights read: they arrive from rank 0 (loading.py)."""
    options: dict[str, Any] = {}
    if spec.model.task == "sequence-classification":
        labels = spec.model.labels or []
        options = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                   "label2id": {name: i for i, name in enumerate(labels)}}
    config = AutoConfig.from_pretrained(model_dir, **options)
    if pad_token_id is not None and spec.model.task == "sequence-classification":
        config.pad_token_id = pad_token_id
    auto = AutoModelForSequenceClassification if spec.model.task == "sequence-classification" else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config, dtype=torch.float32)
    model.kubetune_use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False
    model.kubetune_new_modules = new_modules
    return model


def build_model(spec: FineTuneJobSpec, model_dir: Path, pad_token_id: int | None = None,
                gradient_checkpointing: bool = False, empty_like: list[str] | None = None,
                frozen_dtype: torch.dtype | None = None,
                precision: Precision | None = None) -> tuple[nn.Module, ParamCounts]:
    """The model with its trainable parameters chosen; empty_like (rank 0's new modules) builds it on meta;
    frozen_dtype (see frozen_weights_dtype) holds the weights that do not train in half precision; precision
    is the run's (QLoRA computes in it)."""
    method = spec.method.weights  # dpo trains lora or full weights
    if method == "qlora":
        model = load_quantized_base(spec, model_dir, pad_token_id, precision)
    elif empty_like is None:
        model = load_base_model(spec, model_dir, pad_token_id)
    else:
        model = empty_base_model(spec, model_dir, pad_token_id, empty_like)
    fuse_tanh_gelu(model)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model, lora=method in ("lora", "qlora"))
    if method in ("lora", "qlora"):
        model = apply_lora(model, spec)
    elif method == "partial":
        model = apply_partial(model, spec)
    if frozen_dtype is not None:
        cast_frozen(model, frozen_dtype)
    return model, count_parameters(model)


def frozen_weights_dtype(method: str, strategy: str, precision: Precision) -> torch.dtype | None:
    """LoRA's frozen base in the GPU's compute dtype, not fp32 (its fp32 copy serves no update).

    Autocast casts each matmul's weight and input to bf16/fp16 anyway, but with fp32 weights the embeddings, norms
    and residual stream stay fp32: every layer's elementwise work reads twice the bytes and casts its input again
    for each linear. Held in the compute dtype, as FSDP's mixed-precision policy gathers them already (fsdp keeps
    fp32 shards: nothing to change there). Only on CUDA: CPUs without bf16 units run fp32 (precision.py). Only
    bf16: an fp16 residual stream can overflow (65504) where autocast's fp32 one does not, so fp16 GPUs keep fp32.
    """
    if method != "lora" or strategy != "ddp" or precision.device_type != "cuda" or precision.dtype != torch.bfloat16:
        return None
    return torch.bfloat16


def cast_frozen(model: nn.Module, dtype: torch.dtype) -> None:
    """Parameters that do not train to `dtype`; trainable ones (adapters, a new head) stay fp32 for AdamW."""
    for parameter in model.parameters():
        if not parameter.requires_grad and parameter.is_floating_point():
            parameter.data = parameter.data.to(dtype)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only what training changes (the rest is rebuilt from the base model on resume), copied to host memory:
    the best model's copy and a checkpoint's weights on the GPU cost 4 bytes per trained parameter each."""
    return {n: host_copy(p.detach()) for n, p in model.named_parameters() if p.requires_grad}


def host_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A copy in host memory, pinned where CUDA is (copies back are then fast); a DTensor stays one (this rank's
    shard, as FSDP's CPU offload keeps its shards), so sharded checkpoints save it as before."""
    if isinstance(tensor, DTensor):
        return DTensor.from_local(host_copy(tensor.to_local()), tensor.device_mesh, tensor.placements,
                                  run_check=False, shape=tensor.shape, stride=tensor.stride())
    copy = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=torch.cuda.is_available())
    return copy.copy_(tensor)


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise RuntimeError(f"checkpoint does not fit the model: unknown parameters {missing[:3]}")
    with torch.no_grad():
        for name, value in state.items():
            _local(params[name]).copy_(_local(value))  # shard to shard: a host copy comes back to the device


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor
