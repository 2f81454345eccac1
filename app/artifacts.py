"""Trained artifacts on disk: one folder each, files plus manifest.json, written atomically.

Projections and soft prompts share this layout. A manifest names the model it was trained for and
whether the server serves it ("active"); everything else in it is the artifact's own business.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from app.files import atomic_directory, write_json_atomic
MANIFEST = "manifest.json"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ArtifactError(ValueError):
    """An artifact name that is invalid or does not exist."""


def artifact_dir(root: Path, name: str) -> Path:
    """The folder of artifact `name` under `root` (the name is checked, so it cannot escape `root`)."""
    if not NAME.match(name):
        raise ArtifactError(f"invalid artifact name {name!r}: use letters, digits, '.', '_' and '-'")
    return root / name


def write_artifact(directory: Path, files: dict[str, bytes], manifest: dict) -> None:
    """Write the files and the manifest as one atomic replacement of `directory`."""
    with atomic_directory(directory) as staging:
        for name, data in files.items():
            (staging / name).write_bytes(data)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST
    if not path.exists():
        raise ArtifactError(f"no artifact {directory.name!r}")
    return json.loads(path.read_text())


def manifests(root: Path, model_id: str | None = None) -> dict[str, dict]:
    """Every artifact's manifest under `root` by name, optionally only those trained for `model_id`."""
    found = {}
    for path in sorted(root.glob(f"*/{MANIFEST}")):
        if path.parent.name.startswith("."):
            continue
        manifest = json.loads(path.read_text())
        if model_id is None or manifest.get("model_id") == model_id:
            found[path.parent.name] = manifest
    return found


def set_active(directory: Path, active: bool) -> dict:
    """Mark an artifact served (or not); returns its updated manifest."""
    manifest = read_manifest(directory)
    manifest["active"] = active
    write_json_atomic(directory / MANIFEST, manifest)
    return manifest


def delete_artifact(directory: Path) -> None:
    read_manifest(directory)
    shutil.rmtree(directory)
