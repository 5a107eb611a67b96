"""The spec model, the generated CRD and the contract the operator will share."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest

from kubetune.crd import build_crd, crd_yaml

ROOT = Path(__file__).resolve().parent.parent


def test_committed_crd_matches_the_spec_model() -> None:
    committed = (ROOT / "crds" / "finetunejob.yaml").read_text()
    assert committed == crd_yaml(), "crds/finetunejob.yaml drifted: run `make crd` (kubetune crd > crds/...)"


def test_crd_is_a_valid_kubernetes_object() -> None:
    kubernetes_validate.validate(build_crd(), "1.30.0", strict=True)


def test_crd_has_printer_columns_status_and_cel_rules() -> None:
    version = build_crd()["spec"]["versions"][0]
    columns = version["additionalPrinterColumns"]
    assert [c["name"] for c in columns] == ["Phase", "Progress", "Loss", "Age", "Improved"]
    assert [c.get("priority", 0) for c in columns] == [0, 0, 0, 0, 1]  # Improved only with -o wide
    assert version["subresources"] == {"status": {}}
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert len(spec["x-kubernetes-validations"]) >= 3
    assert spec["properties"]["hyperparameters"]["properties"]["batchSize"]["minimum"] == 1
    assert "description" in spec["properties"]["data"]["properties"]["split"]


def test_importing_the_spec_does_not_import_torch() -> None:
    code = "import kubetune.spec, kubetune.crd, kubetune.cli, kubetune.contract, sys; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stderr


@pytest.mark.parametrize(("uri", "ok"), [("s3://bucket/a/b/", True), ("relative/path", True),
                                         ("s3://bucket/a/../b", False), ("s3://bucket//b", False),
                                         ("s3://B!/x", False), ("gs://bucket/x", False)])
def test_uri_rules(uri: str, ok: bool) -> None:
    from kubetune.spec import check_uri

    if ok:
        assert check_uri(uri) == uri
    else:
        with pytest.raises(ValueError):
            check_uri(uri)
