"""Semantic checks that need the filesystem but no torch: do the local inputs exist?"""

from __future__ import annotations

from pathlib import Path

from kubetune import lineage
from kubetune.errors import UserError
from kubetune.spec import FineTuneJobSpec
from kubetune.storage import is_s3


def resolve_local(uri: str, manifest_file: str | Path | None) -> str:
    """Relative local paths in a manifest are relative to the manifest's folder."""
    if is_s3(uri) or manifest_file is None or Path(uri).expanduser().is_absolute():
        return uri
    return str((Path(manifest_file).resolve().parent / uri).resolve())


def _where(uri: str, resolved: Path, manifest_file: str | Path | None) -> str:
    """Name the path that was looked for; relative ones are relative to the manifest, not the shell."""
    if manifest_file is None or Path(uri).expanduser().is_absolute():
        return f" ({resolved})" if str(resolved) != uri else ""
    return f" (looked for {resolved}: relative paths are relative to {Path(manifest_file).resolve().parent})"


def check_local_inputs(spec: FineTuneJobSpec, manifest_file: str | Path | None = None) -> None:
    problems = []
    inputs = {"spec.model.uri": spec.model.uri, "spec.data.train": spec.data.train,
              "spec.data.validation": spec.data.validation, "spec.data.test": spec.data.test}
    for field, uri in inputs.items():
        if uri is None or is_s3(uri):
            continue
        path = Path(resolve_local(uri, manifest_file))
        if not path.exists():
            problems.append(f"{field}: {uri}: no such file or folder{_where(uri, path, manifest_file)}")
    model = spec.model.uri
    if not is_s3(model):
        path = Path(resolve_local(model, manifest_file))
        if path.is_dir() and not (path / "config.json").is_file() and not lineage.is_adapter(path):
            problems.append(f"spec.model.uri: {model}: not a model folder (no config.json)")
    if problems:
        raise UserError("\n".join(problems))
