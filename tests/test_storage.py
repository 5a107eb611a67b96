"""Storage against a real SeaweedFS S3 gateway (and the local backend): round trips, integrity, bad input, faults."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubetune.contract import MANIFEST_NAME
from kubetune.errors import UserError
from kubetune.netutil import free_port
from kubetune.spec import FineTuneJob, StorageSpec
from kubetune.storage import IntegrityError, Storage
from kubetune.storage.embedded import embedded_s3, list_objects
from kubetune.storage.s3 import MiB, S3Backend, StorageError, child_key
from kubetune.storage.seaweed import SeaweedServer
from tests.fixtures_s3 import TEST_CREDENTIALS, s3_client

FAULT_TIMEOUT = 120


def make_model(root: Path) -> Path:
    """A model-like folder: config, tokenizer files, nested weights."""
    files = {
        "config.json": b'{"model_type": "bert"}',
        "tokenizer/vocab.txt": b"[PAD]\n[UNK]\nhello\n",
        "tokenizer/special_tokens_map.json": b"{}",
        "weights/shard-0/model.safetensors": os.urandom(300_000),
        "weights/shard-1/model.safetensors": os.urandom(200_000),
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def without_manifest(files: dict[str, bytes]) -> dict[str, bytes]:
    return {k: v for k, v in files.items() if k != MANIFEST_NAME}


# -- S3 round trips ---------------------------------------------------------------------------------------------


def test_model_folder_round_trip(s3_storage: Storage, s3_bucket: str, tmp_path: Path) -> None:
    src = make_model(tmp_path / "model")
    uri = f"s3://{s3_bucket}/models/minilm/"

    manifest = s3_storage.publish(src, uri, {"kind": "model"})

    assert [f["path"] for f in manifest["files"]] == sorted(tree(src))
    assert s3_storage.read_manifest(uri) == manifest
    assert s3_storage.list_prefixes(uri) == ["tokenizer", "weights"]
    assert s3_storage.list_prefixes(f"s3://{s3_bucket}/models") == ["minilm"]
    fetched = s3_storage.fetch(uri, tmp_path / "fetched")
    assert without_manifest(tree(fetched)) == tree(src)

    one = s3_storage.fetch(f"s3://{s3_bucket}/models/minilm/config.json", tmp_path / "one")
    assert one == tmp_path / "one" / "config.json"
    assert one.read_bytes() == (src / "config.json").read_bytes()
    described = s3_storage.describe(f"s3://{s3_bucket}/models/minilm/config.json")
    assert described["size"] == len(one.read_bytes()) and described["etag"] and "versionId" in described

    s3_storage.delete(uri)
    assert s3_storage.read_manifest(uri) is None
    assert s3_storage.list_prefixes(f"s3://{s3_bucket}/models") == []


def test_file_above_multipart_threshold(s3_server: SeaweedServer, s3_bucket: str, tmp_path: Path) -> None:
    backend = S3Backend(StorageSpec(endpoint=s3_server.endpoint), part_size=5 * MiB)
    src = tmp_path / "big"
    src.mkdir()
    (src / "weights.bin").write_bytes(os.urandom(12 * MiB))
    uri = f"s3://{s3_bucket}/big/"

    backend.publish(src, uri, None)

    described = backend.describe(uri + "weights.bin")
    assert described["size"] == 12 * MiB
    assert described["etag"].endswith("-3")  # three 5 MiB parts: really a multipart upload
    path = backend.fetch(uri + "weights.bin", tmp_path / "down")
    assert path.read_bytes() == (src / "weights.bin").read_bytes()


def test_prefix_of_many_data_files(s3_storage: Storage, s3_bucket: str, tmp_path: Path) -> None:
    src = tmp_path / "data"
    for i in range(200):
        (src / f"part-{i // 50}").mkdir(parents=True, exist_ok=True)
        (src / f"part-{i // 50}" / f"rows-{i:03d}.jsonl").write_text(json.dumps({"text": f"row {i}", "label": i % 2}))
    uri = f"s3://{s3_bucket}/datasets/reviews/"

    assert s3_storage.s3().upload_tree(src, uri) == 200
    assert len(s3_storage.s3().list_objects(uri)) == 200
    assert s3_storage.read_manifest(uri) is None  # input data: no manifest, nothing to verify
    fetched = s3_storage.fetch(uri, tmp_path / "fetched")
    assert tree(fetched) == tree(src)
    assert s3_storage.describe(uri)["size"] == sum(len(v) for v in tree(src).values())


# -- integrity --------------------------------------------------------------------------------------------------


def test_tampered_object_is_rejected(s3_server: SeaweedServer, s3_storage: Storage, s3_bucket: str,
                                     tmp_path: Path) -> None:
    src = make_model(tmp_path / "model")
    uri = f"s3://{s3_bucket}/out/job/"
    s3_storage.publish(src, uri)
    client = s3_client(s3_server.endpoint)
    # Same size, different bytes: only the sha256 can tell.
    client.put_object(Bucket=s3_bucket, Key="out/job/tokenizer/vocab.txt", Body=b"[PAD]\n[UNK]\nhellO\n")

    with pytest.raises(IntegrityError, match=r"tokenizer/vocab.txt: sha256 mismatch") as raised:
        s3_storage.fetch(uri, tmp_path / "fetched")
    assert uri in str(raised.value)

    client.delete_object(Bucket=s3_bucket, Key="out/job/config.json")
    with pytest.raises(IntegrityError, match=r"config.json: missing"):
        s3_storage.fetch(uri, tmp_path / "fetched-again")


def test_half_written_output_has_no_manifest(s3_server: SeaweedServer, s3_storage: Storage, s3_bucket: str,
                                             tmp_path: Path) -> None:
    src = make_model(tmp_path / "model")
    uri = f"s3://{s3_bucket}/out/half/"
    s3_storage.s3().upload_tree(src, uri)  # the files, as a crashed writer leaves them
    assert s3_storage.read_manifest(uri) is None

    s3_client(s3_server.endpoint).put_object(Bucket=s3_bucket, Key=f"out/half/{MANIFEST_NAME}", Body=b'{"trunc')
    assert s3_storage.read_manifest(uri) is None  # a truncated manifest vouches for nothing


def test_failed_republish_leaves_no_manifest(s3_server: SeaweedServer, s3_bucket: str, tmp_path: Path) -> None:
    src = make_model(tmp_path / "model")
    uri = f"s3://{s3_bucket}/out/again/"
    backend = S3Backend(StorageSpec(endpoint=s3_server.endpoint))
    backend.publish(src, uri)

    def fail_one_upload(params: dict[str, Any], **_: Any) -> None:
        if params["Key"].endswith("vocab.txt"):
            raise RuntimeError("injected upload failure")

    backend.client.meta.events.register("before-parameter-build.s3.PutObject", fail_one_upload)
    with pytest.raises(RuntimeError, match="injected"):
        backend.publish(src, uri)
    assert backend.read_manifest(uri) is None  # the old manifest went first; the new one never came


# -- local backend: the same contract -----------------------------------------------------------------------------


def test_local_backend_same_checks(tmp_path: Path) -> None:
    storage = Storage()
    src = make_model(tmp_path / "model")
    out = str(tmp_path / "out" / "job")

    manifest = storage.publish(src, out)
    assert storage.read_manifest(out) == manifest
    assert storage.list_prefixes(out) == ["tokenizer", "weights"]
    assert without_manifest(tree(storage.fetch(out, tmp_path / "unused"))) == tree(src)

    (tmp_path / "out" / "job" / "tokenizer" / "vocab.txt").write_bytes(b"[PAD]\n[UNK]\nhellO\n")
    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        storage.fetch(out, tmp_path / "unused")

    half = tmp_path / "half"
    make_model(half)
    assert storage.read_manifest(str(half)) is None
    with pytest.raises(UserError, match="no such file"):
        storage.fetch(str(tmp_path / "missing"), tmp_path / "unused")
    storage.delete(out)
    assert storage.read_manifest(out) is None


# -- bad input --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rel", ["../escape", "a/../../b", "/etc/passwd", "a//b", "", "./a", "a/"])
def test_keys_cannot_escape_their_prefix(rel: str) -> None:
    with pytest.raises(UserError, match="object paths must be relative"):
        child_key("out/job", rel)


@pytest.mark.parametrize("uri", ["s3://bucket-x/a/../b", "s3://bucket-x/a//b", "s3://bucket-x/./a", "s3://X/a"])
def test_bad_uris_are_user_errors(s3_storage: Storage, uri: str, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"bucket|segments"):
        s3_storage.publish(tmp_path, uri)
    with pytest.raises(UserError):
        s3_storage.fetch(uri, tmp_path / "x")


def test_wrong_endpoint_fails_fast_naming_the_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in TEST_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    storage = Storage(StorageSpec(endpoint=endpoint))
    uri = "s3://models/minilm/"
    started = time.monotonic()
    with pytest.raises(UserError) as raised:
        storage.fetch(uri, tmp_path / "x")
    assert time.monotonic() - started < 15
    assert uri in str(raised.value) and endpoint in str(raised.value)
    with pytest.raises(UserError, match="cannot reach"):
        Storage(StorageSpec(endpoint=endpoint)).publish(make_model(tmp_path / "m"), "s3://outputs/job/")


def test_missing_credentials_are_a_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(UserError, match="no S3 credentials") as raised:
        Storage(StorageSpec(endpoint="http://127.0.0.1:9")).read_manifest("s3://models/minilm/")
    assert "s3://models/minilm/" in str(raised.value)


def test_missing_bucket_and_key_are_user_errors(s3_storage: Storage, s3_bucket: str, tmp_path: Path) -> None:
    for uri in ("s3://no-such-bucket-kt/model/", "s3://no-such-bucket-kt/data/train.jsonl"):
        with pytest.raises(UserError, match="does not exist") as raised:
            s3_storage.fetch(uri, tmp_path / "x")
        assert uri in str(raised.value)
    with pytest.raises(UserError, match="does not exist"):
        Storage(s3_storage.spec).read_manifest("s3://no-such-bucket-kt/out/")
    for uri in (f"s3://{s3_bucket}/data/missing.jsonl", f"s3://{s3_bucket}/models/missing/"):
        with pytest.raises(UserError, match="no such object or prefix") as raised:
            s3_storage.fetch(uri, tmp_path / "x")
        assert uri in str(raised.value)


IDENTITIES: dict[str, Any] = {"identities": [
    {"name": "admin", "credentials": [{"accessKey": "admin-key", "secretKey": "admin-secret"}],
     "actions": ["Admin", "Read", "List", "Tagging", "Write"]},
    {"name": "reader", "credentials": [{"accessKey": "reader-key", "secretKey": "reader-secret"}],
     "actions": ["Read", "List"]},
]}


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    with SeaweedServer(tmp_path_factory.mktemp("seaweed-auth"), config=IDENTITIES) as server:
        s3_client(server.endpoint, aws_access_key_id="admin-key",
                  aws_secret_access_key="admin-secret").create_bucket(Bucket="guarded")
        yield server


def as_user(monkeypatch: pytest.MonkeyPatch, endpoint: str, key: str, secret: str) -> Storage:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    return Storage(StorageSpec(endpoint=endpoint))


def test_denied_access_is_a_user_error(auth_server: SeaweedServer, monkeypatch: pytest.MonkeyPatch,
                                       tmp_path: Path) -> None:
    src = make_model(tmp_path / "model")
    uri = "s3://guarded/out/job/"
    as_user(monkeypatch, auth_server.endpoint, "admin-key", "admin-secret").publish(src, uri)

    reader = as_user(monkeypatch, auth_server.endpoint, "reader-key", "reader-secret")
    assert without_manifest(tree(reader.fetch(uri, tmp_path / "read"))) == tree(src)  # reading is allowed
    with pytest.raises(UserError, match="access denied") as raised:
        reader.publish(src, uri)
    assert uri in str(raised.value) and auth_server.endpoint in str(raised.value)

    for key, secret in (("reader-key", "wrong-secret"), ("unknown-key", "whatever")):
        with pytest.raises(UserError, match="access denied") as raised:
            as_user(monkeypatch, auth_server.endpoint, key, secret).fetch(uri, tmp_path / "x")
        assert uri in str(raised.value)


# -- faults -----------------------------------------------------------------------------------------------------


def test_server_killed_mid_publish(tmp_path: Path, s3_server: SeaweedServer) -> None:  # s3_server: test credentials
    """SIGKILL during an upload: bounded failure (exit 1 kind), and no manifest.json afterwards."""
    with SeaweedServer(tmp_path / "s3") as server:
        s3_client(server.endpoint).create_bucket(Bucket="fault")
        src = tmp_path / "out"
        for i in range(40):
            (src / f"shard-{i // 10}").mkdir(parents=True, exist_ok=True)
            (src / f"shard-{i // 10}" / f"part-{i}.bin").write_bytes(os.urandom(256 * 1024))
        (src / "weights.bin").write_bytes(os.urandom(12 * MiB))
        uri = "s3://fault/out/job/"
        backend = S3Backend(StorageSpec(endpoint=server.endpoint), part_size=5 * MiB)
        backend.publish(src, uri)  # a complete earlier version: its manifest must not survive the failed one
        assert backend.read_manifest(uri) is not None

        uploads = 0
        lock = threading.Lock()

        def kill_on_fifth_upload(**_: Any) -> None:
            nonlocal uploads
            with lock:
                uploads += 1
                if uploads == 5:
                    server.kill()

        for event in ("before-send.s3.PutObject", "before-send.s3.UploadPart"):
            backend.client.meta.events.register(event, kill_on_fifth_upload)
        started = time.monotonic()
        with pytest.raises(StorageError) as raised:  # not a UserError: exit 1, the pod may retry
            backend.publish(src, uri)
        assert time.monotonic() - started < FAULT_TIMEOUT
        assert uri in str(raised.value)

        server.start()
        fresh = S3Backend(StorageSpec(endpoint=server.endpoint))
        assert fresh.read_manifest(uri) is None
        assert all(not key.endswith(MANIFEST_NAME) for key, _ in fresh.list_objects(uri))


# -- kubetune run --embedded-s3: inputs uploaded, uris rewritten ------------------------------------------------


def test_embedded_s3_uploads_inputs_and_rewrites_uris(tmp_path: Path) -> None:
    make_model(tmp_path / "model")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text('{"text": "good", "label": 1}\n')
    (tmp_path / "val" / "more").mkdir(parents=True)
    (tmp_path / "val" / "more" / "v.jsonl").write_text('{"text": "bad", "label": 0}\n')
    job = FineTuneJob.model_validate({
        "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "emb-demo"},
        "spec": {"model": {"uri": "model", "task": "sequence-classification", "labels": ["neg", "pos"]},
                 "data": {"train": "data/train.jsonl", "validation": "val"},
                 "output": {"uri": "out"}, "checkpoint": {"uri": "ckpt"}}})
    env_before = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "NO_PROXY")}

    with embedded_s3(job, tmp_path / "state", tmp_path / "job.yaml") as s3_job:
        spec = s3_job.spec
        assert spec.model.uri == "s3://kubetune-models/emb-demo/"
        assert spec.data.train == "s3://kubetune-data/emb-demo/train/train.jsonl"
        assert spec.data.validation == "s3://kubetune-data/emb-demo/validation/"
        assert spec.output.uri == "s3://kubetune-outputs/emb-demo/"
        assert spec.checkpoint.uri == "s3://kubetune-outputs/emb-demo/checkpoints/"
        assert spec.storage.endpoint and spec.storage.endpoint.startswith("http://127.0.0.1:")
        storage = Storage(spec.storage)
        model = storage.fetch(spec.model.uri, tmp_path / "fetched")  # verified against the uploaded manifest
        assert without_manifest(tree(model)) == tree(tmp_path / "model")
        assert storage.fetch(spec.data.validation, tmp_path / "val-down").joinpath("more", "v.jsonl").is_file()
        storage.publish(tmp_path / "model", spec.output.uri)
        keys = [key for key, _ in list_objects(spec.storage, spec.output.uri)]
        assert "emb-demo/manifest.json" in keys and "emb-demo/weights/shard-0/model.safetensors" in keys

    assert job.spec.model.uri == "model" and job.spec.storage.endpoint is None  # the original is untouched
    assert {k: os.environ.get(k) for k in env_before} == env_before
