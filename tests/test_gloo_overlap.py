"""FSDP on gloo with kubetune's collectives (all-reduce for all-gather and reduce-scatter) and asynchronous
prefetch: the same numbers as torch's own FSDP, bit for bit (x + 0 is exact, and with two ranks a sum of two
fp32 numbers is the same whichever collective computes it), through the product's sharding.shard."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_kubetune_fsdp_on_gloo_equals_torch_fsdp_bit_for_bit() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(29700 + os.getpid() % 200), "-m", "tests.gloo_overlap_probe"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["calls"]["all_gather"] > 0 and result["calls"]["reduce_scatter"] > 0  # ours ran
    assert result["ours"] == result["plain"]
    assert result["plain"][-1] < result["plain"][0]  # it trained
    assert result["identicalGradients"]
