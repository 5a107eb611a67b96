"""Chat models learn to stop, and generation stops where they learned to (issue 25, item 9): a base with a
ChatML template ends answers with <|im_end|>, not its EOS, so merged/'s generation_config must stop on it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from kubetune import contract
from kubetune.data.encode import IGNORE_INDEX, encode_causal_lm
from kubetune.train.outputs import save_model

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHAT = [{"role": "user", "content": "two plus two?"}, {"role": "assistant", "content": "four"}]


def chatml_tokenizer(model_dir: Path) -> Any:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": [AddedToken("<|im_start|>", special=True),
                                                                AddedToken("<|im_end|>", special=True)]})
    tokenizer.chat_template = CHATML
    return tokenizer


def test_the_template_end_of_turn_token_is_what_answers_stop_on(tiny_gpt2: Path) -> None:
    tokenizer = chatml_tokenizer(tiny_gpt2)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    encoded = encode_causal_lm([{"messages": CHAT}], tokenizer, max_length=256)
    assert encoded.stop_ids == {end} and tokenizer.eos_token_id not in encoded[0]["input_ids"]
    assert end in [t for t in encoded[0]["labels"] if t != IGNORE_INDEX]  # trained
    plain = encode_causal_lm([{"prompt": "two plus two?", "completion": "four"}], tokenizer, max_length=256)
    assert plain.stop_ids == {tokenizer.eos_token_id}


def test_merged_generation_stops_on_the_end_of_turn_token(tiny_gpt2: Path, tmp_path: Path) -> None:
    tokenizer = chatml_tokenizer(tiny_gpt2)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    model.resize_token_embeddings(len(tokenizer))
    stops = encode_causal_lm([{"messages": CHAT}], tokenizer, max_length=256).stop_ids
    save_model(model, tokenizer, "full", True, tmp_path, base_dir=tiny_gpt2, stop_ids=stops)
    merged = tmp_path / contract.MERGED_DIR
    saved = json.loads((merged / "generation_config.json").read_text())["eos_token_id"]
    assert saved == [tokenizer.eos_token_id, end]  # the base's EOS kept, the turn's end added
    assert GenerationConfig.from_pretrained(merged).eos_token_id == [tokenizer.eos_token_id, end]

    # generate() honours it: a model that always answers <|im_end|> stops after one token
    reloaded = AutoModelForCausalLM.from_pretrained(merged)
    with torch.no_grad():
        norm = reloaded.transformer.ln_f
        norm.weight.zero_()  # the last hidden state is the norm's bias, whatever the input ...
        norm.bias.fill_(1.0)
        reloaded.lm_head.weight.zero_()  # ... every logit 0 but <|im_end|>'s
        reloaded.lm_head.weight[end] = 1.0
    prompt = tokenizer.apply_chat_template(CHAT[:1], add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    out = reloaded.generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert out[0, prompt["input_ids"].shape[1]:].tolist() == [end]
