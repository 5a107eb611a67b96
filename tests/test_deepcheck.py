"""`kubetune validate --deep` against a real SeaweedFS with identities (an admin and a read-only user)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubetune.cli import main
from kubetune.jobfile import write_job
from kubetune.storage.seaweed import SeaweedServer
from tests.fixtures_models import classification_job
from tests.fixtures_s3 import s3_client
from tests.trainer_runs import KUBETUNE, Trainer

IDENTITIES: dict[str, Any] = {"identities": [
    {"name": "admin", "credentials": [{"accessKey": "admin-key", "secretKey": "admin-secret"}],
     "actions": ["Admin", "Read", "List", "Tagging", "Write"]},
    {"name": "reader", "credentials": [{"accessKey": "reader-key", "secretKey": "reader-secret"}],
     "actions": ["Read", "List"]},
]}
ADMIN = {"AWS_ACCESS_KEY_ID": "admin-key", "AWS_SECRET_ACCESS_KEY": "admin-secret"}
READER = {"AWS_ACCESS_KEY_ID": "reader-key", "AWS_SECRET_ACCESS_KEY": "reader-secret"}
WRONG = {"AWS_ACCESS_KEY_ID": "admin-key", "AWS_SECRET_ACCESS_KEY": "not-the-secret"}


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory, minilm_path: Path, reviews_subset: Path) -> Iterator[str]:
    """MiniLM and the reviews in a bucket only the admin may write to; yields the endpoint."""
    with SeaweedServer(tmp_path_factory.mktemp("seaweed-deep"), config=IDENTITIES) as server:
        client = s3_client(server.endpoint, aws_access_key_id="admin-key", aws_secret_access_key="admin-secret")
        client.create_bucket(Bucket="guarded")
        for path in minilm_path.iterdir():
            if path.is_file():
                client.upload_file(str(path), "guarded", f"models/minilm/{path.name}")
        client.upload_file(str(reviews_subset), "guarded", "data/reviews.jsonl")
        client.put_object(Bucket="guarded", Key="data/bad-label.jsonl",
                          Body=b'{"text": "fine", "label": "positive"}\n{"text": "meh", "label": "neutral"}\n')
        yield server.endpoint


def deep(endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
         credentials: dict[str, str] = ADMIN, **overrides: Any) -> tuple[int, str]:
    spec = dict(overrides)
    model = spec.pop("model", None)
    doc = classification_job("deep", "s3://guarded/models/minilm/", "s3://guarded/data/reviews.jsonl",
                             "s3://guarded/out/deep/", storage={"endpoint": endpoint}, **spec)
    doc["spec"]["model"] = model or doc["spec"]["model"]
    for name, value in credentials.items():
        monkeypatch.setenv(name, value)
    code = main(["validate", "--deep", str(write_job(doc, tmp_path / "job.yaml"))])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_a_good_job_passes_with_steps_and_memory(guarded: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    code, out = deep(guarded, tmp_path, monkeypatch, capsys)
    assert code == 0, out
    assert "deep checks passed" in out and "memory per device" in out and "steps: about" in out
    # The marker written to prove write access is gone again.
    client = s3_client(guarded, aws_access_key_id="admin-key", aws_secret_access_key="admin-secret")
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="guarded", Prefix="out/").get("Contents", [])]
    assert keys == []


BAD_JOBS: dict[str, tuple[dict[str, Any], dict[str, str], list[str]]] = {
    # name: (spec overrides, credentials, what the message must name)
    "wrong credentials": ({}, WRONG, ["s3://guarded/", "denied"]),
    "read-only output prefix": ({}, READER, ["spec.output.uri", "s3://guarded/out/deep/", "denied"]),
    "missing bucket": ({"data": {"train": "s3://no-such-bucket/reviews.jsonl", "maxSeqLength": 128}}, ADMIN,
                       ["spec.data.train", "no-such-bucket", "does not exist"]),
    "missing column": ({"data": {"train": "s3://guarded/data/reviews.jsonl", "textField": "review"}}, ADMIN,
                       ["spec.data.train", "reviews.jsonl", "'review'", "spec.data.textField"]),
    "unknown label": ({"data": {"train": "s3://guarded/data/bad-label.jsonl"}}, ADMIN,
                      ["spec.data.train", "bad-label.jsonl", "line 2", "'neutral'", "spec.model.labels"]),
    "too long maxSeqLength": ({"data": {"train": "s3://guarded/data/reviews.jsonl", "maxSeqLength": 4096}}, ADMIN,
                              ["spec.data.maxSeqLength", "4096", "512"]),
    "not a model": ({"model": {"uri": "s3://guarded/data/", "task": "sequence-classification",
                               "labels": ["negative", "positive"]}}, ADMIN,
                    ["spec.model.uri", "s3://guarded/data/", "not a model folder"]),
    "cannot fit": ({"resources": {"gpusPerNode": 0, "memory": "512Mi"},
                    "hyperparameters": {"batchSize": 256, "maxSteps": 2},
                    "data": {"train": "s3://guarded/data/reviews.jsonl", "maxSeqLength": 512}}, ADMIN,
                   ["spec.resources", "GiB", "batchSize"]),
}


@pytest.mark.parametrize("case", list(BAD_JOBS))
def test_each_problem_exits_2_naming_the_field_or_file(case: str, guarded: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    overrides, credentials, expected = BAD_JOBS[case]
    started = time.monotonic()
    code, out = deep(guarded, tmp_path, monkeypatch, capsys, credentials, **overrides)
    took = time.monotonic() - started
    assert code == 2, out
    assert "Traceback" not in out
    for text in expected:
        assert text in out, f"{case}: {text!r} missing from:\n{out}"
    print(f"{case}: {took:.1f} s")  # recorded for the closing note; timing is not asserted


def test_deep_check_as_a_user_runs_it(guarded: str, tmp_path: Path) -> None:
    """The real command line, with every problem of one job reported at once."""
    doc = classification_job("deep", "s3://guarded/models/minilm/", "s3://guarded/data/bad-label.jsonl",
                             "s3://guarded/out/deep/", storage={"endpoint": guarded},
                             data={"maxSeqLength": 4096})
    job = write_job(doc, tmp_path / "job.yaml")
    env = {**Trainer(job, tmp_path).env(), **READER}
    result = subprocess.run([*KUBETUNE, "validate", "--deep", str(job)], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert any("spec.output.uri" in line for line in lines)
    assert any("'neutral'" in line for line in lines)
    assert any("spec.data.maxSeqLength" in line for line in lines)
    assert "Traceback" not in result.stderr
