"""S3 transfer benchmark: kubetune's storage module vs a plain single-stream boto3 loop, same server, same run.

Starts its own SeaweedFS (`weed mini` on loopback), then uploads and downloads (a) one big file and
(b) many small files both ways. Every transfer runs in its own child process so its peak RSS (wait4 rusage)
is its own; the child also reports its RSS just before the transfer, so the increase is the transfer's.

    python bench/s3_io.py                      # 512 MiB + 2,000 files
    python bench/s3_io.py --big-mib 64 --small-count 200   # quick

The last line of output is one JSON object with every figure and the kubetune / plain ratios.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import log_tail, read_json, run_child, table

from kubetune import procmem

MiB = 1024 * 1024
BUCKET = "bench"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret", "AWS_DEFAULT_REGION": "us-east-1"}


# -- the worker: one transfer in its own process ------------------------------------------------------------------


def _plain_client(endpoint: str) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint, config=Config(s3={"addressing_style": "path"}))


def _plain(op: str, endpoint: str, local: Path, prefix: str) -> None:
    """The baseline a user would write: one request at a time, whole bodies in memory."""
    client = _plain_client(endpoint)
    if op == "upload":
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            with open(path, "rb") as handle:
                client.put_object(Bucket=BUCKET, Key=prefix + path.relative_to(local).as_posix(), Body=handle.read())
        return
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for obj in page.get("Contents", []):
            target = local / obj["Key"][len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(client.get_object(Bucket=BUCKET, Key=obj["Key"])["Body"].read())


def _kubetune(op: str, endpoint: str, local: Path, prefix: str) -> None:
    from kubetune.spec import StorageSpec
    from kubetune.storage import Storage

    storage = Storage(StorageSpec(endpoint=endpoint))
    uri = f"s3://{BUCKET}/{prefix}"
    if op == "upload":
        storage.s3().upload_tree(local, uri)
    else:
        storage.fetch(uri, local)


def worker(args: argparse.Namespace) -> None:
    if args.side == "kubetune":
        import kubetune.storage.s3  # noqa: F401 - imported before the baseline RSS, like boto3 below
    _plain_client(args.endpoint)
    before = procmem.rss_bytes() / MiB
    started = time.perf_counter()
    (_kubetune if args.side == "kubetune" else _plain)(args.op, args.endpoint, Path(args.local), args.prefix)
    seconds = time.perf_counter() - started
    # The peak comes from the driver (wait4 on this process), so only the baseline is reported from here.
    Path(args.result).write_text(json.dumps({"seconds": seconds, "rss_before_mib": before}))


# -- the driver ---------------------------------------------------------------------------------------------------


def make_data(work: Path, big_mib: int, small_count: int) -> tuple[Path, Path]:
    big = work / "src-big"
    big.mkdir()
    with open(big / "weights.bin", "wb") as handle:
        for _ in range(big_mib):
            handle.write(os.urandom(MiB))
    small = work / "src-small"
    rng = random.Random(42)
    for i in range(small_count):
        path = small / f"shard-{i % 20:02d}" / f"rows-{i:05d}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(rng.randint(4 * 1024, 16 * 1024)))
    return big, small


def digest_tree(root: Path) -> dict[str, str]:
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(MiB):
                digest.update(chunk)
        out[path.relative_to(root).as_posix()] = digest.hexdigest()
    return out


def transfer(work: Path, endpoint: str, side: str, op: str, case: str, local: Path) -> dict[str, Any]:
    result = work / f"{side}-{op}-{case}.json"
    command = [sys.executable, __file__, "--worker", "--side", side, "--op", op, "--endpoint", endpoint,
               "--local", str(local), "--prefix", f"{side}/{case}/", "--result", str(result)]
    child = run_child(command, work / f"{side}-{op}-{case}.log", env={**os.environ, **CREDENTIALS}, timeout=1800)
    if child.returncode != 0:
        raise SystemExit(f"{side} {op} {case} failed:\n{log_tail(child.log)}")
    figures = read_json(result)
    figures["peak_rss_mib"] = child.peak_rss_mib  # wait4: the whole child, the same figure ru_maxrss gives
    figures["peak_increase_mib"] = child.peak_rss_mib - figures["rss_before_mib"]
    return figures


def run(args: argparse.Namespace) -> dict[str, Any]:
    from kubetune.storage.seaweed import SeaweedServer

    work = Path(tempfile.mkdtemp(prefix="kubetune-s3-bench-", dir=args.workdir))
    big, small = make_data(work, args.big_mib, args.small_count)
    sizes = {"big": args.big_mib * MiB, "small": sum(p.stat().st_size for p in small.rglob("*") if p.is_file())}
    counts = {"big": 1, "small": args.small_count}
    sources = {"big": big, "small": small}
    figures: dict[str, Any] = {}
    with SeaweedServer(work / "s3") as server:
        os.environ.update(CREDENTIALS)
        _plain_client(server.endpoint).create_bucket(Bucket=BUCKET)
        for case in ("big", "small"):
            for op in ("upload", "download"):
                for side in ("plain", "kubetune"):  # same order every time; the plain loop goes first
                    local = sources[case] if op == "upload" else work / f"down-{side}-{case}"
                    f = transfer(work, server.endpoint, side, op, case, local)
                    f["MB_per_s"] = sizes[case] / 1e6 / f["seconds"]
                    f["files_per_s"] = counts[case] / f["seconds"]
                    figures[f"{case}_{op}_{side}"] = f
                    print(f"{case:5} {op:8} {side:8} {f['seconds']:8.2f} s {f['MB_per_s']:8.1f} MB/s "
                          f"{f['files_per_s']:8.1f} files/s  peak RSS {f['peak_rss_mib']:6.1f} MiB", flush=True)
                if op == "download":
                    expected = digest_tree(sources[case])
                    for side in ("plain", "kubetune"):
                        if digest_tree(work / f"down-{side}-{case}") != expected:
                            raise SystemExit(f"{side} {case} download does not match the source")
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return summarize(args, figures)


def summarize(args: argparse.Namespace, figures: dict[str, Any]) -> dict[str, Any]:
    rows, ratios = [], {}
    for case in ("big", "small"):
        for op in ("upload", "download"):
            plain, ours = figures[f"{case}_{op}_plain"], figures[f"{case}_{op}_kubetune"]
            ratio = plain["seconds"] / ours["seconds"]
            ratios[f"{case}_{op}"] = round(ratio, 2)
            rows.append([f"{case} {op}", plain["MB_per_s"], ours["MB_per_s"], plain["files_per_s"],
                         ours["files_per_s"], ratio, ours["peak_rss_mib"], ours["peak_increase_mib"]])
    print()
    print(table(["transfer", "plain MB/s", "kubetune MB/s", "plain files/s", "kubetune files/s", "ratio",
                 "kubetune peak RSS MiB", "increase MiB"], rows))
    big_peak = max(figures[f"big_{op}_kubetune"]["peak_rss_mib"] for op in ("upload", "download"))
    return {
        "big_mib": args.big_mib, "small_count": args.small_count, "cores": os.cpu_count(),
        "memory_measure": "peak RSS of each transfer's own child process (wait4 ru_maxrss), MiB",
        "figures": {k: {n: round(v, 3) for n, v in f.items()} for k, f in figures.items()},
        "ratios": ratios, "min_ratio": min(ratios.values()), "kubetune_big_peak_rss_mib": round(big_peak, 1),
        "targets_met": min(ratios.values()) >= 2.0 and big_peak < 256,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--big-mib", type=int, default=512, help="size of the big file (MiB)")
    parser.add_argument("--small-count", type=int, default=2000, help="number of small files (4-16 KiB)")
    parser.add_argument("--workdir", default=None, help="where data and the server live (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("side", "op", "endpoint", "local", "prefix", "result"):
        parser.add_argument(f"--{name}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    print(json.dumps(run(args)))


if __name__ == "__main__":
    main()
