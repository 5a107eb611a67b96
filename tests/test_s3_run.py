"""A whole `kubetune run` with every uri on a real S3 server (SeaweedFS). `--embedded-s3`: test_new_user.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kubetune.cli import main
from kubetune.jobfile import write_job
from kubetune.storage import Storage
from kubetune.storage.embedded import list_objects
from kubetune.storage.manifest import sha256_file
from kubetune.storage.seaweed import SeaweedServer
from tests.fixtures_models import classification_job
from tests.fixtures_s3 import s3_client
from tests.trainer_runs import identity_root


@pytest.fixture(autouse=True)
def _state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBETUNE_STATE_DIR", str(tmp_path / "state"))


def test_run_with_every_uri_on_s3(tmp_path: Path, s3_server: SeaweedServer, s3_bucket: str,
                                  s3_storage: Storage, minilm_path: Path, reviews_subset: Path) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(minilm_path, model_dir)
    s3_storage.publish(model_dir, f"s3://{s3_bucket}/models/minilm/")  # with a manifest: verified on download
    client = s3_client(s3_server.endpoint)
    client.upload_file(str(reviews_subset), s3_bucket, "data/reviews/part-0.jsonl")

    doc = classification_job(
        "s3-run", f"s3://{s3_bucket}/models/minilm/", f"s3://{s3_bucket}/data/reviews/",
        f"s3://{s3_bucket}/out/s3-run/", checkpoint={"uri": f"s3://{s3_bucket}/ckpt/s3-run/", "everySteps": 3},
        storage={"endpoint": s3_server.endpoint})
    assert main(["run", str(write_job(doc, tmp_path / "job.yaml"))]) == 0

    keys = dict(list_objects(s3_storage, f"s3://{s3_bucket}/out/s3-run/"))
    assert {"manifest.json", "adapter/adapter_model.safetensors", "merged/model.safetensors",
            "metrics.json", "run.json", "README.md"} <= {k.split("s3-run/", 1)[1] for k in keys}
    fetched = s3_storage.fetch(f"s3://{s3_bucket}/out/s3-run/", tmp_path / "fetched")  # verifies every sha256
    run = json.loads((fetched / "run.json").read_text())
    assert run["data"]["files"][0]["sha256"] == sha256_file(reviews_subset)
    assert run["data"]["objects"][0]["objects"][0]["etag"]  # the prefix lists each object's ETag
    checkpoints = s3_storage.list_prefixes(identity_root(s3_storage, f"s3://{s3_bucket}/ckpt/s3-run/"))
    assert checkpoints == ["checkpoint-00000003", "checkpoint-00000006"]
