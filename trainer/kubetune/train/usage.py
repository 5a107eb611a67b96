"""The model card's "Use" section: python that runs as written from the output folder.

A test executes these snippets against a real output, so what they show is what works.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kubetune import contract
from kubetune.storage import is_s3

Record = dict[str, Any]


def _base_reference(uri: str) -> tuple[str, str]:
    """(path to load the base model from, a comment line when the user must fetch it first)."""
    if is_s3(uri):
        name = uri.rstrip("/").rsplit("/", 1)[-1]
        return name, f"# first copy the base model from {uri} to ./{name}\n"
    return uri, ""


def _classification(spec: Record, folders: list[str], example: Record | None) -> list[str]:
    labels = spec["model"]["labels"]
    text = json.dumps(str((example or {}).get("text", "an example to classify"))[:200])
    blocks = []
    if contract.MERGED_DIR in folders:
        blocks.append(f"""from transformers import pipeline

classifier = pipeline("text-classification", model="{contract.MERGED_DIR}")
print(classifier({text}))  # [{{'label': one of {labels}, 'score': ...}}]""")
    if contract.ADAPTER_DIR in folders:
        base, note = _base_reference(spec["model"]["uri"])
        blocks.append(f"""{note}import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

labels = {json.dumps(labels)}
base = AutoModelForSequenceClassification.from_pretrained(
    {json.dumps(base)}, num_labels=len(labels),
    id2label=dict(enumerate(labels)), label2id={{name: i for i, name in enumerate(labels)}})
model = PeftModel.from_pretrained(base, "{contract.ADAPTER_DIR}").eval()
tokenizer = AutoTokenizer.from_pretrained("{contract.ADAPTER_DIR}")
with torch.no_grad():
    logits = model(**tokenizer({text}, return_tensors="pt")).logits
print(labels[int(logits.argmax())])""")
    return blocks


def _chat_messages(example: Record | None) -> list[Record]:
    messages = (example or {}).get("messages") or [{"role": "user", "content": "Hello!"}]
    upto = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
    return [{"role": m["role"], "content": m["content"]} for m in messages[:upto]] or messages[:1]


def _causal(spec: Record, folders: list[str], example: Record | None) -> list[str]:
    folder = contract.MERGED_DIR if contract.MERGED_DIR in folders else None
    load = f'model = AutoModelForCausalLM.from_pretrained("{folder}")'
    imports = "from transformers import AutoModelForCausalLM, AutoTokenizer"
    if folder is None:
        base, note = _base_reference(spec["model"]["uri"])
        folder = contract.ADAPTER_DIR
        imports = f"{note}from peft import PeftModel\n{imports}"
        load = (f"model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({json.dumps(base)}), "
                f'"{folder}")')
    if example is not None and "messages" in example:
        messages = json.dumps(_chat_messages(example), indent=4)
        prompt = f"""messages = {messages}
# the chat template used in training is saved with the tokenizer
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)"""
    else:
        prompt = f'inputs = tokenizer({json.dumps(str((example or {}).get("prompt", "Hello")))}, return_tensors="pt")'
    return [f"""{imports}

tokenizer = AutoTokenizer.from_pretrained("{folder}")
{load}
{prompt}
output = model.generate(**inputs, max_new_tokens=32, pad_token_id=tokenizer.pad_token_id)
print(tokenizer.decode(output[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True))"""]


def rendered_prompt(staging: Path, folders: list[str], example: Record | None) -> str | None:
    """What the saved chat template makes of the example's conversation (None without chat data)."""
    if example is None or "messages" not in example or not folders:
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(staging / folders[-1])
    return str(tokenizer.apply_chat_template(_chat_messages(example), tokenize=False, add_generation_prompt=True))


def use_section(spec: Record, folders: list[str], example: Record | None, rendered: str | None) -> str:
    task = spec["model"]["task"]
    blocks = (_classification if task == "sequence-classification" else _causal)(spec, folders, example)
    text = "Run from this folder (the one holding " + " and ".join(f"`{f}/`" for f in folders) + "):\n\n"
    text += "\n\n".join(f"```python\n{b}\n```" for b in blocks) + "\n"
    if rendered is not None:
        text += f"\nThe chat template renders that conversation, as in training, as:\n\n```text\n{rendered}\n```\n"
    return text
