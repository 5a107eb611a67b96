"""Load the base model and make the chosen weights trainable: full, partial or LoRA."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from kubetune.errors import UserError
from kubetune.spec import FineTuneJobSpec


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


def load_base_model(spec: FineTuneJobSpec, model_dir: Path) -> nn.Module:
    uri = spec.model.uri
    if not (model_dir / "config.json").is_file():
        raise UserError(f"spec.model.uri: {uri}: not a model folder (no config.json)")
    try:
        AutoConfig.from_pretrained(model_dir)
        if spec.model.task == "sequence-classification":
            labels = spec.model.labels or []
            model, info = AutoModelForSequenceClassification.from_pretrained(
                model_dir,
                output_loading_info=True,
                num_labels=len(labels),
                id2label=dict(enumerate(labels)),
                label2id={name: i for i, name in enumerate(labels)},
                ignore_mismatched_sizes=True,  # a base with another head gets a fresh one of our size
            )
        else:
            model, info = AutoModelForCausalLM.from_pretrained(model_dir, output_loading_info=True)  # type: ignore[misc]
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"spec.model.uri: {uri}: cannot load a {spec.model.task} model from it ({exc})") from None
    model.kubetune_use_cache = getattr(model.config, "use_cache", None)  # restored in the saved config
    model.config.use_cache = False  # the KV cache only helps generation and costs memory in training
    # Freshly initialised modules (a new head, a missing pooler) must train whatever the method.
    missing = set(info.get("missing_keys", ())) | {k for k, *_ in info.get("mismatched_keys", ())}
    model.kubetune_new_modules = sorted({k.rsplit(".", 1)[0] for k in missing})
    return model


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


def _layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
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
        stack_name, stack = _layer_stack(model)
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
        modules_to_save=[m.rsplit(".", 1)[-1] for m in getattr(model, "kubetune_new_modules", [])] or None,
    )
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise UserError(f"spec.method.lora.targetModules: {exc}") from None


def build_model(spec: FineTuneJobSpec, model_dir: Path) -> tuple[nn.Module, ParamCounts]:
    model = load_base_model(spec, model_dir)
    if spec.method.type == "lora":
        model = apply_lora(model, spec)
    elif spec.method.type == "partial":
        model = apply_partial(model, spec)
    return model, count_parameters(model)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only what training changes: the rest is rebuilt from the base model on resume."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise RuntimeError(f"checkpoint does not fit the model: unknown parameters {missing[:3]}")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
