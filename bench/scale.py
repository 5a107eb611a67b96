"""DDP vs FSDP with 2 processes on a GPT-2 scaled up from the tiny test model: samples/s and memory per rank.

    .venv/bin/python bench/scale.py [--layers 12] [--width 768] [--steps 4] [--rounds 2] [--checkpointing]
                                    [--preload /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4]

Each measurement is one `torchrun --nproc-per-node 2` launch of this file in worker mode, going through the
trainer's own loading (kubetune.train.loading: rank 0 reads the weights, rank 1 starts on meta) and wrapping
(kubetune.train.sharding.wrap). Launches alternate ddp, fsdp, ddp, fsdp... (interleaved, so machine load hits
both alike); the best round of each is compared. Per rank: samples/s over the timed steps (after one warm-up
step), peak RSS (VmHWM, the whole process: Python, torch, activations), and the measured bytes
of weights + optimizer state it holds (local shards for FSDP). fp32, AdamW, gloo, one thread per process.
--checkpointing turns on the trainer's gradient checkpointing for both (what a job whose activations do not fit
runs): activations, which neither strategy shards, shrink to about one layer's worth.
Target (issue 12): FSDP state per rank <= 60% of DDP's at >= 80% of its samples/s. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as common

from kubetune import procmem

SEQ, BATCH, VOCAB = 128, 4, 600


def build(dest: Path, layers: int, width: int) -> Path:
    """The tiny GPT-2's tokenizer, a wider and deeper GPT-2 from a config (random weights: speed only)."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from kubetune.demo import build_tiny_gpt2
    from kubetune.samples import INSTRUCTIONS, sample_path

    texts = sample_path(INSTRUCTIONS).read_text().splitlines()  # raw lines: enough to train a small BPE
    build_tiny_gpt2(dest / "tiny", texts)
    tokenizer = AutoTokenizer.from_pretrained(dest / "tiny")
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=SEQ, n_embd=width, n_layer=layers,
                        n_head=width // 64, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(dest / "model")
    tokenizer.save_pretrained(dest / "model")
    return dest / "model"


def worker(model_dir: str, strategy: str, steps: int, out: str, checkpointing: bool) -> None:
    import torch

    from kubetune.spec import FineTuneJob
    from kubetune.train import distributed, sharding
    from kubetune.train.loading import load_model
    from kubetune.train.precision import choose_precision
    from kubetune.train.speedups import fast_dropout

    distributed.init()
    doc = common.job_document("scale", "unused.jsonl", "unused", method={"type": "full"},
                              hyperparameters={"strategy": strategy})
    doc["spec"]["model"] = {"uri": model_dir, "task": "causal-lm"}
    job = FineTuneJob.model_validate(doc)
    device = torch.device("cpu")
    precision = choose_precision("fp32", device)
    model, counts, full = load_model(job.spec, Path(model_dir), None, gradient_checkpointing=checkpointing)
    wrapped = sharding.wrap(model, full, strategy, device, precision, False)
    del full
    wrapped.train()  # as the trainer does: dropout on, and HF models checkpoint only in training mode
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(distributed.rank())
    times = []
    for step in range(steps + 1):
        ids = torch.randint(0, VOCAB - 1, (BATCH, SEQ), generator=generator)
        started = time.perf_counter()
        with fast_dropout.enabled():  # the trainer's step (recipe._accumulate) runs forward and backward in it
            loss = wrapped(input_ids=ids, labels=ids).loss
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:  # the first step allocates the optimizer state: warm-up
            times.append(time.perf_counter() - started)
    result = {"rank": distributed.rank(), "samplesPerSecond": BATCH * len(times) / sum(times),
              "peakRssBytes": procmem.peak_rss_bytes(),
              "parameters": counts.total, **sharding.state_bytes(model, optimizer)}
    Path(out, f"{strategy}-rank{distributed.rank()}.json").write_text(json.dumps(result))
    distributed.shutdown()


def launch(model: Path, strategy: str, steps: int, out: Path, checkpointing: bool,
           preload: str | None) -> list[dict[str, Any]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "KUBETUNE_METRICS_PORT": "0"}
    if preload:  # the allocator the trainer image runs on (Dockerfile: LD_PRELOAD), for both strategies alike
        env.update(LD_PRELOAD=preload, TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD=str(1 << 40))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(29500 + os.getpid() % 1000), __file__, "--worker", str(model), strategy, str(steps), str(out),
               str(int(checkpointing))]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{strategy} run failed:\n{done.stderr[:4000]}")
    return [json.loads((out / f"{strategy}-rank{r}.json").read_text()) for r in (0, 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing for both")
    parser.add_argument("--preload", default=None, metavar="LIB",
                        help="a malloc library under both (LD_PRELOAD), e.g. the trainer image's tcmalloc: "
                             "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 (Debian libtcmalloc-minimal4)")
    args = parser.parse_args()
    common.setup_env()
    info = {**common.machine(), "precision": "fp32", "loadAverage": os.getloadavg(), "preload": args.preload}
    print("machine:", json.dumps(info))
    with tempfile.TemporaryDirectory() as tmp:
        model = build(Path(tmp), args.layers, args.width)
        best: dict[str, list[dict[str, Any]]] = {}
        for round_ in range(args.rounds):
            for strategy in ("ddp", "fsdp"):
                ranks = launch(model, strategy, args.steps, Path(tmp), args.checkpointing, args.preload)
                speed = sum(r["samplesPerSecond"] for r in ranks)
                print(f"round {round_ + 1} {strategy}: {speed:.2f} samples/s (both ranks)", flush=True)
                if strategy not in best or speed > sum(r["samplesPerSecond"] for r in best[strategy]):
                    best[strategy] = ranks
    rows, summary = [], {}
    for strategy, ranks in best.items():
        for r in ranks:
            state = r["parameterBytes"] + r["optimizerBytes"]
            rows.append([strategy, r["rank"], f"{r['samplesPerSecond']:.2f}", f"{state / 2**20:.0f}",
                         f"{r['peakRssBytes'] / 2**20:.0f}"])
        summary[strategy] = {"samplesPerSecond": sum(r["samplesPerSecond"] for r in ranks),
                             "stateBytesPerRank": max(r["parameterBytes"] + r["optimizerBytes"] for r in ranks),
                             "peakRssBytesPerRank": max(r["peakRssBytes"] for r in ranks)}
    print(common.table(["strategy", "rank", "samples/s", "weights+optimizer MiB", "peak RSS MiB"], rows))
    state_ratio = summary["fsdp"]["stateBytesPerRank"] / summary["ddp"]["stateBytesPerRank"]
    rss_ratio = summary["fsdp"]["peakRssBytesPerRank"] / summary["ddp"]["peakRssBytesPerRank"]
    speed_ratio = summary["fsdp"]["samplesPerSecond"] / summary["ddp"]["samplesPerSecond"]
    print(f"FSDP/DDP: state per rank {state_ratio:.2f} (target <= 0.60), peak RSS {rss_ratio:.2f}, "
          f"samples/s {speed_ratio:.2f} (target >= 0.80); load average after: {os.getloadavg()}")
    print(json.dumps({"benchmark": "scale", "layers": args.layers, "width": args.width,
                      "checkpointing": args.checkpointing,
                      "parameters": best["ddp"][0]["parameters"], "machine": info, **summary,
                      "stateRatio": state_ratio, "peakRssRatio": rss_ratio, "samplesPerSecondRatio": speed_ratio,
                      "loadAverageAfter": os.getloadavg()}))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        sys.path.insert(0, str(Path(__file__).parent))
        worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], sys.argv[6] == "1")
    else:
        main()
