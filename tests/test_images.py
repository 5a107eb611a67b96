"""Issue 28, item 9: `make images REGISTRY=... TAG=...` builds and pushes both Dockerfile targets with docker or
podman, the chart names `<image.registry>/operator` and `<image.registry>/trainer`, refuses to render with a
placeholder registry, and README and NOTES say the images must be pushed first.

No container engine runs here: a stand-in engine records what make asks of it.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.test_chart import CHART, find, helm_with_values, render

ROOT = Path(__file__).resolve().parent.parent
VERSION = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]


def make_images(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    engine, log = tmp_path / "engine", tmp_path / "engine.log"
    engine.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    engine.chmod(0o755)
    done = subprocess.run(["make", "-s", "images", f"ENGINE={engine}", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "MAKEFLAGS": ""})
    return done, log.read_text().splitlines() if log.exists() else []


def test_make_images_builds_and_pushes_both_targets(tmp_path: Path) -> None:
    done, calls = make_images(tmp_path, "REGISTRY=registry.test/ml", "TAG=1.2")
    assert done.returncode == 0, done.stderr
    assert calls == ["build --target trainer -t registry.test/ml/trainer:1.2 .",
                     "build --target operator -t registry.test/ml/operator:1.2 .",
                     "push registry.test/ml/trainer:1.2", "push registry.test/ml/operator:1.2"]
    assert "--set image.registry=registry.test/ml --set image.operator.tag=1.2 --set image.trainer.tag=1.2" \
        in done.stdout


def test_make_images_tags_the_version_and_needs_a_registry(tmp_path: Path) -> None:
    done, calls = make_images(tmp_path, "REGISTRY=registry.test/ml")
    assert done.returncode == 0 and calls[0] == f"build --target trainer -t registry.test/ml/trainer:{VERSION} ."
    (tmp_path / "none").mkdir()
    missing, none = make_images(tmp_path / "none")
    assert missing.returncode != 0 and "set REGISTRY=" in missing.stderr and none == []


@pytest.mark.parametrize("registry", ["", "REGISTRY", "<your registry>", "registry.example.com/ml"])
def test_a_placeholder_registry_fails_the_render(tmp_path: Path, registry: str) -> None:
    done = helm_with_values(tmp_path, "template", {"image.registry": registry})
    assert done.returncode != 0
    assert f"image.registry is \"{registry}\", a placeholder: build and push the images first (make images" \
        in done.stderr and "--set image.registry=" in done.stderr


def test_images_come_from_the_registry_unless_a_repository_is_set(tmp_path: Path) -> None:
    def images(values: dict[str, object]) -> tuple[str, str]:
        deployment = find(render(tmp_path, values), "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
        trainer = next(e["value"] for e in deployment["env"] if e["name"] == "KUBETUNE_TRAINER_IMAGE")
        return deployment["image"], trainer

    assert images({}) == (f"ghcr.io/kubetune/operator:{VERSION}", f"ghcr.io/kubetune/trainer:{VERSION}")
    assert images({"image.registry": "registry.test/ml/", "image.trainer.tag": "7"}) == (
        f"registry.test/ml/operator:{VERSION}", "registry.test/ml/trainer:7")
    # A repository given in full wins, and then the registry is not needed for that image.
    assert images({"image.registry": "", "image.operator.repository": "mirror.test/op",
                   "image.trainer.repository": "mirror.test/tr", "image.trainer.tag": "2"}) == (
        f"mirror.test/op:{VERSION}", "mirror.test/tr:2")


def test_readme_and_notes_say_the_images_come_first(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text().split("## On a cluster", 1)[1].split("```sh", 1)[0]
    assert "make images REGISTRY=" in readme and "image.registry" in readme
    done = helm_with_values(tmp_path, "install", {}, "--dry-run=client")
    assert done.returncode == 0, done.stderr
    notes = done.stdout.split("NOTES:", 1)[1]
    assert f"ghcr.io/kubetune/operator:{VERSION}" in notes and "must be built and pushed first (make images" in notes
