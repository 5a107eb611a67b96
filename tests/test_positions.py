"""Position limits (issue 25, item 11): the families that number positions after the padding index are all
clamped, and batches padded for a GPU never run past the model's positions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from transformers import AutoConfig, GPT2Config, GPT2LMHeadModel
from transformers.models.auto.configuration_auto import model_type_to_module_name
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
)

from kubetune.train.batching import GPU_LENGTH_MULTIPLE, collate, model_inputs
from kubetune.train.model import OFFSET_POSITIONS, max_sequence_length

# TrOCR's learned positions are created max_position_embeddings + 2 long: the offset costs it nothing.
SIZED_WITH_THE_OFFSET = {"trocr"}


class _NoLimit:
    model_max_length = int(1e30)  # what transformers reports for a tokenizer without a limit


def test_every_family_numbering_positions_after_the_padding_index_is_listed() -> None:
    """Scans the installed transformers: a family added by an upgrade fails here, not with a CUDA assert mid-run."""
    root = Path(transformers.__file__).parent / "models"
    found = set()
    for model_type in set(MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES) | set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        files = (root / model_type_to_module_name(model_type)).glob("modeling_*.py")
        if any("def create_position_ids_from_input_ids" in f.read_text() for f in files):
            found.add(model_type)
    assert {"roberta", "mpnet", "esm"} <= found  # the scan itself still finds them
    assert found - SIZED_WITH_THE_OFFSET <= OFFSET_POSITIONS, sorted(found - SIZED_WITH_THE_OFFSET - OFFSET_POSITIONS)


@pytest.mark.parametrize(("model_type", "options", "usable"), [
    ("mpnet", {"max_position_embeddings": 514}, 512),  # padding index 1 in the model's code, whatever the config
    ("esm", {"max_position_embeddings": 1026, "pad_token_id": 1, "vocab_size": 33}, 1024),
    ("xlm-roberta-xl", {"max_position_embeddings": 514, "pad_token_id": 1}, 512),
    ("luke", {"max_position_embeddings": 514, "pad_token_id": 1}, 512),
    ("layoutlmv3", {"max_position_embeddings": 514, "pad_token_id": 1}, 512),
    ("bert", {"max_position_embeddings": 512, "pad_token_id": 0}, 512),  # positions from 0: all usable
])
def test_the_sequence_length_is_clamped_to_the_usable_positions(model_type: str, options: dict[str, Any],
                                                                 usable: int, tmp_path: Path) -> None:
    AutoConfig.for_model(model_type, **options).save_pretrained(tmp_path)
    assert max_sequence_length(4096, tmp_path, _NoLimit()) == usable
    assert max_sequence_length(usable - 1, tmp_path, _NoLimit()) == usable - 1


def test_gpu_padding_stops_at_the_position_limit() -> None:
    """A model with 100 positions: a 90-token batch rounds up to 128 for the GPU, past the last position (a packed
    row's tail restarts its positions at 0, but is not made longer than it needs either)."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=100, n_embd=16, n_layer=1, n_head=2)).eval()
    example = {"input_ids": list(range(1, 50)) * 2, "labels": list(range(1, 50)) * 2}
    example = {k: v[:90] for k, v in example.items()}
    packed = {**example, "position_ids": list(range(90))}
    for rows in ([example], [packed]):
        batch = collate(rows, 0, GPU_LENGTH_MULTIPLE, limit=100)
        assert batch["input_ids"].shape[1] == 100  # not 128: the model has no position 100 and beyond
        with torch.no_grad():
            model(**model_inputs(batch))
    with pytest.raises(IndexError):  # what 128 does (on CUDA a device-side assert that kills the process)
        model(**model_inputs(collate([example], 0, GPU_LENGTH_MULTIPLE)))
    # Below the limit the multiple still rounds; a batch longer than the limit is left as it is.
    short = {k: v[:20] for k, v in example.items()}
    assert collate([short], 0, GPU_LENGTH_MULTIPLE, limit=100)["input_ids"].shape[1] == 64
    assert collate([example], 0, GPU_LENGTH_MULTIPLE, limit=80)["input_ids"].shape[1] == 90
