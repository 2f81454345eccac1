"""Trained artifacts on disk: one folder each, files plus manifest.json, written atomically.

Projections and soft prompts share this layout. A manifest names the model it was trained for (`model_id`, the
model setting's name, and `base_model_sha256`, the runner's content fingerprint: see app.model_runner) and whether
the server serves it ("active"); everything else in it is the artifact's own business.

An artifact's folder is a symlink to its current version (see app.files.atomic_directory), so replacing one is a
single rename. A DP artifact's manifest (one with a "dp" block) keeps nothing about its training data: the fields in
`SERVER_ONLY` go to `training-record.json` beside it, which no route serves and which stays on the server when the
artifact is released.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from app.files import atomic_directory, remove_directory, write_json_atomic

MANIFEST = "manifest.json"
TRAINING_RECORD = "training-record.json"
SERVER_ONLY = ("data_sha256", "train_segments", "loss_curve", "held_out_loss", "held_out_loss_without_prompt")
"""What a DP artifact's manifest leaves out: a hash of the data (which confirms a guessed dataset), its size, and
losses measured on it without DP (the loss curve and the held-out losses)."""
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ArtifactError(ValueError):
    """An artifact name that is invalid or does not exist."""


def artifact_dir(root: Path, name: str) -> Path:
    """The folder of artifact `name` under `root` (the name is checked, so it cannot escape `root`)."""
    if not NAME.match(name):
        raise ArtifactError(f"invalid artifact name {name!r}: use letters, digits, '.', '_' and '-'")
    return root / name


def write_artifact(directory: Path, files: dict[str, bytes], manifest: dict) -> None:
    """Write the files and the manifest (split from its training record for DP) as one atomic replacement of
    `directory`."""
    if "dp" in manifest:
        files = {**files, TRAINING_RECORD: dump({k: manifest[k] for k in SERVER_ONLY if k in manifest})}
        manifest = {k: v for k, v in manifest.items() if k not in SERVER_ONLY}
    with atomic_directory(directory) as staging:
        for name, data in {**files, MANIFEST: dump(manifest)}.items():
            (staging / name).write_bytes(data)


def dump(value: dict) -> bytes:
    return json.dumps(value, indent=2, sort_keys=True).encode() + b"\n"


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


def not_served_reason(manifest: dict, model_id: str, fingerprint: str, *, active_only: bool = True) -> str | None:
    """Why an artifact with this manifest is not for this model (name and content fingerprint) or is switched off;
    None when it is."""
    if manifest.get("model_id") != model_id:
        return f"trained for model {manifest.get('model_id')!r}, this server runs {model_id!r}"
    if manifest.get("base_model_sha256") is None:
        return "its manifest names no base model (base_model_sha256): train it again"
    if manifest["base_model_sha256"] != fingerprint:
        return (f"trained for base model {manifest['base_model_sha256'][:16]}, this server's is {fingerprint[:16]} "
                "(another checkpoint of the same name)")
    if active_only and not manifest.get("active"):
        return f"inactive ({manifest.get('inactive_reason', 'not activated')})"
    return None


def set_active(directory: Path, active: bool, reason: str | None = None) -> dict:
    """Mark an artifact served (or not, and why: `inactive_reason`); returns its updated manifest."""
    manifest = read_manifest(directory)
    manifest["active"] = active
    if active:
        manifest.pop("inactive_reason", None)
    elif reason is not None:
        manifest["inactive_reason"] = reason
    write_json_atomic(directory / MANIFEST, manifest)
    return manifest


def delete_artifact(directory: Path) -> None:
    read_manifest(directory)
    remove_directory(directory)
