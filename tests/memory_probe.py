"""Measure one configuration's peak memory in a fresh process: `python -m tests.memory_probe JOB.json MODEL_DIR`.

Peak RSS (VmHWM) minus the RSS just before the model is built, after a throwaway build has loaded the
library code: what the model, its gradients, AdamW's state, the activations of two training steps (the
trainer's model builder, optimizer and loss) and the best weights' copy the trainer keeps add to the
process. Run it with MALLOC_MMAP_THRESHOLD_ fixed, so glibc returns freed tensors at once and RSS follows what
torch holds. Prints one JSON object.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import torch

from kubetune import procmem
from kubetune.spec import FineTuneJob
from kubetune.train.evaluate import summed_loss
from kubetune.train.model import build_model, trainable_state
from kubetune.train.speedups.target_logits import TargetLogits


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor], task: str) -> float:
    with TargetLogits(model, task, batch["labels"], batch["labels"]) as selection:  # as the trainer's step
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = summed_loss(logits, selection.labels_for(logits), task)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss)


def main(job_file: str, model_dir: str) -> None:
    torch.manual_seed(0)
    spec = FineTuneJob.model_validate(json.loads(Path(job_file).read_text())).spec
    checkpointing = bool(spec.hyperparameters.gradient_checkpointing)
    # A throwaway build and step: the code and pools they load are the library's, not this configuration's.
    warm, _ = build_model(spec, Path(model_dir), pad_token_id=0, gradient_checkpointing=checkpointing)
    warm_optimizer = torch.optim.AdamW(warm.parameters())
    warm_optimizer.step()
    del warm, warm_optimizer
    gc.collect()
    before = procmem.rss_bytes()
    model, _ = build_model(spec, Path(model_dir), pad_token_id=0, gradient_checkpointing=checkpointing)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    b, s = spec.hyperparameters.batch_size, spec.data.max_seq_length
    vocab = model.config.vocab_size
    ids = torch.randint(1, vocab, (b, s))
    labels = ids.clone() if spec.model.task == "causal-lm" else torch.randint(0, 2, (b,))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    losses = [step(model, optimizer, batch, spec.model.task)]
    best = trainable_state(model)  # the trainer's copy of the best weights, held after the first validation
    losses.append(step(model, optimizer, batch, spec.model.task))
    peak = procmem.peak_rss_bytes()  # VmHWM: this process's own, not the pytest parent's
    print(json.dumps({"peakBytes": peak - before, "baselineBytes": before, "losses": losses, "bestTensors": len(best),
                      "checkpointing": bool(getattr(model, "is_gradient_checkpointing", False))}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
