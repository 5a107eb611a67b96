"""Tokenize cleaned records: classification inputs, and causal-LM inputs with loss only on the target."""

from __future__ import annotations

from typing import Any

from kubetune.errors import UserError

IGNORE_INDEX = -100  # the label value torch's cross-entropy skips
BATCH = 1000  # texts per tokenizer call: fast tokenizers parallelise a batch, memory stays bounded

Record = dict[str, Any]
# (text, trained, end): end is EOS to append EOS after it, TURN for an assistant turn of a chat template (EOS
# appended unless the template ends the turn with a special token of its own), None for nothing.
Piece = tuple[str, bool, str | None]
EOS, TURN = "eos", "turn"


class Encoded(list[Record]):
    """Encoded examples; `dropped` counts the examples truncation left without a trainable token, `stop_ids` the
    tokens that end a trained answer (EOS, a chat template's end-of-turn token): generation must stop on them."""

    dropped: int = 0
    stop_ids: frozenset[int] = frozenset()


def encode_classification(records: list[Record], tokenizer: Any, max_length: int) -> list[Record]:
    ids = _tokenize(tokenizer, [r["text"] for r in records], truncation=True, max_length=max_length)
    return [{"input_ids": i, "label": int(r["label"])} for i, r in zip(ids, records, strict=True)]


def encode_causal_lm(records: list[Record], tokenizer: Any, max_length: int) -> Encoded:
    whole, stops = _encode_whole(records, tokenizer)
    out = Encoded()
    for input_ids, labels in whole:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            out.dropped += 1
            continue
        out.append({"input_ids": input_ids, "labels": labels})
    out.stop_ids = stops
    return out


def encode_preference(records: list[Record], tokenizer: Any, max_length: int) -> Encoded:
    """Pairs {chosen, rejected}, each {input_ids, labels} as for causal LM (loss on the answer only), and input_ids:
    both sides' tokens (length grouping, the vocabulary check). Truncation keeps the prompt and cuts the answers;
    a pair left with an empty answer, or with two identical ones, is dropped and counted."""
    sides = []
    for record in records:
        for answer in (record["chosen"], record["rejected"]):
            if "messages" in record:
                sides.append({"messages": [*record["messages"], {"role": "assistant", "content": answer}]})
            else:
                sides.append({"prompt": record["prompt"], "completion": answer})
    whole, stops = _encode_whole(sides, tokenizer)
    out = Encoded()
    for chosen, rejected in zip(whole[::2], whole[1::2], strict=True):
        pair = [{"input_ids": ids[:max_length], "labels": labels[:max_length]} for ids, labels in (chosen, rejected)]
        answers = [[t for t in side["labels"] if t != IGNORE_INDEX] for side in pair]
        if not all(answers) or answers[0] == answers[1]:
            out.dropped += 1
            continue
        out.append({"chosen": pair[0], "rejected": pair[1], "input_ids": pair[0]["input_ids"] + pair[1]["input_ids"]})
    out.stop_ids = stops
    return out


def _encode_whole(records: list[Record], tokenizer: Any) -> tuple[list[tuple[list[int], list[int]]], frozenset[int]]:
    """(input_ids, labels) of every record, untruncated, and the stop tokens that end trained answers."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("the model's tokenizer has no eos_token; causal-lm fine-tuning needs one to end completions")
    bos = _bos(tokenizer)
    if any("messages" in r for r in records) and not getattr(tokenizer, "chat_template", None):
        # Saved with the outputs, so inference renders exactly what training saw.
        tokenizer.chat_template = fallback_template(bool(bos))
    examples: list[tuple[list[int], list[Piece]]] = []
    for number, record in enumerate(records, start=1):
        if "messages" not in record:
            examples.append((bos, _prompt_pieces(record["prompt"], record["completion"])))
        else:
            examples.append(([], _template_pieces(record["messages"], tokenizer, number)))

    texts = [text for _, pieces in examples for text, _, _ in pieces]
    ids_of = iter(_tokenize(tokenizer, texts, add_special_tokens=False))
    special = set(tokenizer.all_special_ids)
    out: list[tuple[list[int], list[int]]] = []
    stops: set[int] = set()
    for prefix, pieces in examples:
        input_ids, labels = list(prefix), [IGNORE_INDEX] * len(prefix)
        for _, trained, end in pieces:
            ids = next(ids_of)
            own = [i for i in ids if i in special] if end == TURN else []
            if own:
                stops.add(own[-1])  # the template's end-of-turn token (<|im_end|>, <|eot_id|>, <end_of_turn>)
            elif end is not None:
                ids = [*ids, eos]  # without a stop token to learn, a model never learns to stop
                stops.add(eos)
            input_ids += ids
            labels += ids if trained else [IGNORE_INDEX] * len(ids)
        out.append((input_ids, labels))
    return out, frozenset(stops)


def _bos(tokenizer: Any) -> list[int]:
    """The BOS id when this tokenizer adds one to plain text itself (Llama does, GPT-2 does not)."""
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] else []


def _tokenize(tokenizer: Any, texts: list[str], **options: Any) -> list[list[int]]:
    """Token ids of texts, BATCH at a time; `options` go to the tokenizer call."""
    out: list[list[int]] = []
    for start in range(0, len(texts), BATCH):
        out.extend(list(ids) for ids in tokenizer(texts[start : start + BATCH], **options)["input_ids"])
    return out


def _prompt_pieces(prompt: str, completion: str) -> list[Piece]:
    # tokenized apart so the mask boundary is exact; the separator keeps the two from gluing into one word
    sep = " " if prompt and not prompt[-1].isspace() and not completion[:1].isspace() else ""
    return [(prompt, False, None), (sep + completion, True, EOS)]


def fallback_template(with_bos: bool) -> str:
    """The chat template for tokenizers without one: `<|role|>` headers, EOS after each answer."""
    return (("{{ bos_token }}" if with_bos else "")
            # newlines as expressions: transformers renders with trim_blocks, which eats one after a tag
            + "{% for m in messages %}<|{{ m['role'] }}|>{{ '\\n' }}{{ m['content'] }}"
            "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{{ '\\n' }}{% endif %}")


def _template_pieces(messages: list[Record], tokenizer: Any, number: int) -> list[Piece]:
    """Progressive prefixes: message i is what rendering messages[:i+1] adds to rendering messages[:i]."""

    def render(upto: int, generation_prompt: bool = False) -> str:
        if upto == 0:
            return ""
        try:
            return str(
                tokenizer.apply_chat_template(messages[:upto], tokenize=False, add_generation_prompt=generation_prompt)
            )
        except Exception as exc:  # jinja raises its own errors (e.g. roles that do not alternate)
            message = f"spec.data.messagesField: the model's chat template rejects example {number}: {exc}"
            raise UserError(message) from None

    pieces: list[Piece] = []
    prev = ""
    for i, message in enumerate(messages):
        full = render(i + 1)
        if not full.startswith(prev):
            raise UserError(
                "spec.data.messagesField: the model's chat template rewrites earlier turns, so assistant turns "
                "cannot be masked exactly; use prompt/completion rows instead"
            )
        if message["role"] != "assistant":
            pieces.append((full[len(prev) :], False, None))
        else:
            # the generation prompt (e.g. "<|im_start|>assistant\n") is input, not something to learn;
            # transformers cannot render an empty conversation, so an opening assistant turn keeps its header
            header = render(i, generation_prompt=True) if i else prev
            if not (header.startswith(prev) and full.startswith(header)):
                header = prev
            # what the template renders, with its own end-of-turn token (ChatML <|im_end|>); EOS only if it has none
            pieces += [(header[len(prev) :], False, None), (full[len(header) :], True, TURN)]
        prev = full
    return pieces
