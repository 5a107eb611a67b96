"""Every manifest in examples/ says what it shows and passes `kubetune validate` (the real CLI path)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from kubetune import contract
from kubetune.cli import main as cli
from kubetune.demo import write_samples

ROOT = Path(__file__).resolve().parent.parent
# FineTuneJobs at the top, other objects in folders; not the hidden run state (.kubetune/) that `make demo`
# leaves beside the examples it ran.
EXAMPLES = sorted(p for p in (ROOT / "examples").glob("**/*.yaml")
                  if not any(part.startswith(".") for part in p.relative_to(ROOT / "examples").parts))


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


JOBS = [p for p in EXAMPLES if documents(p)[0]["kind"] == contract.KIND]
LOCAL_JOBS = [p for p in JOBS if not documents(p)[0]["spec"]["model"]["uri"].startswith("s3://")]


def test_top_level_examples_are_all_fine_tune_jobs() -> None:
    # tests/test_crd.py checks every examples/*.yaml against the CRD schema; other kinds live in subfolders.
    assert [p.name for p in EXAMPLES if p.parent.name == "examples" and p not in JOBS] == []


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_each_example_starts_with_a_comment_saying_what_it_shows(path: Path) -> None:
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert path.read_text().startswith("# ") and len(" ".join(header)) > 60, f"{path.name}: no comment header"
    assert len(documents(path)) == 1


@pytest.mark.parametrize("path", [p for p in JOBS if p not in LOCAL_JOBS], ids=lambda p: p.name)
def test_cluster_example_passes_kubetune_validate(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["validate", str(path)]) == contract.EXIT_OK, capsys.readouterr().err
    assert f"valid FineTuneJob {documents(path)[0]['metadata']['name']!r}" in capsys.readouterr().out


def prepare_demo_tree(root: Path, minilm: Path, tiny_gpt2: Path, sft_output: bool = True) -> Path:
    """The layout `make demo` prepares (.kubetune/demo beside examples/), from the real models and samples; with
    sft_output, also a stand-in for what `make demo-dpo`'s first step leaves (the SFT model's merged/)."""
    demo = root / ".kubetune" / "demo"
    write_samples(demo / "data")
    (demo / "models").mkdir(parents=True)
    (demo / "models" / "all-MiniLM-L6-v2").symlink_to(minilm)
    (demo / "models" / "tiny-gpt2").symlink_to(tiny_gpt2)
    if sft_output:
        (demo / "output" / "instructions-tiny-gpt2").mkdir(parents=True)
        (demo / "output" / "instructions-tiny-gpt2" / "merged").symlink_to(tiny_gpt2)
    (root / "examples").mkdir()
    return root / "examples"


@pytest.fixture
def demo_tree(tmp_path: Path, minilm_path: Path, tiny_gpt2: Path) -> Path:
    return prepare_demo_tree(tmp_path, minilm_path, tiny_gpt2)


@pytest.mark.parametrize("path", LOCAL_JOBS, ids=lambda p: p.name)
def test_local_example_passes_kubetune_validate_once_the_demo_is_prepared(
        path: Path, demo_tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    copy = demo_tree / path.name
    shutil.copy(path, copy)
    assert cli(["validate", str(copy)]) == contract.EXIT_OK, capsys.readouterr().err


def test_local_example_fails_validate_naming_the_missing_input(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "examples").mkdir()
    copy = tmp_path / "examples" / "reviews-sentiment.yaml"
    shutil.copy(ROOT / "examples" / "reviews-sentiment.yaml", copy)
    assert cli(["validate", str(copy)]) == contract.EXIT_BAD_INPUT
    missing = "spec.model.uri: ../.kubetune/demo/models/all-MiniLM-L6-v2: no such file or folder"
    assert missing in capsys.readouterr().err


def test_the_examples_cover_what_the_docs_promise() -> None:
    specs = {p.name: documents(p)[0]["spec"] for p in JOBS}
    assert any(s["method"]["type"] == "lora" and s["model"]["task"] == "sequence-classification"
               and s["resources"]["gpusPerNode"] == 1 for s in specs.values())
    assert any(s["method"]["type"] == "lora" and s["model"]["task"] == "causal-lm"
               and s["data"].get("messagesField") for s in specs.values())
    assert any(s["method"]["type"] == "full" and s["resources"].get("nodes") == 2
               and s["resources"]["gpusPerNode"] == 8 for s in specs.values())
    assert any(s["method"]["type"] == "partial" for s in specs.values())
    assert any(s.get("runPolicy", {}).get("queueName") for s in specs.values())


def test_credentials_secret_matches_what_the_jobs_reference() -> None:
    (secret,) = documents(ROOT / "examples" / "secrets" / "s3-credentials.yaml")
    kubernetes_validate.validate(secret, "1.33.0", strict=True)
    assert set(secret["stringData"]) == {contract.SECRET_ACCESS_KEY_ID, contract.SECRET_SECRET_ACCESS_KEY}
    refs = {documents(p)[0]["spec"].get("storage", {}).get("secretRef") for p in JOBS} - {None}
    assert refs == {secret["metadata"]["name"]}
