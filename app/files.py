"""Atomic writes: a reader (or a crash) sees the old file or directory or the new one, never half of one."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from filelock import FileLock, Timeout

from client_sdk.budget import fsync_directory


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, fsync it, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(staging, path)
        fsync_directory(path.parent)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, value: Any) -> None:
    write_bytes_atomic(path, json.dumps(value, indent=2, sort_keys=True).encode() + b"\n")


def append_line(path: Path, line: str, max_bytes: int | None = None) -> None:
    """Append one line to a log in a single O_APPEND write, fsynced (a crash loses at most that line).

    With `max_bytes`, a log that would grow past it is first renamed to `<name>.1` (replacing the older one), so
    the log and its one predecessor take at most about 2 x `max_bytes` together.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    data = line.rstrip("\n").encode() + b"\n"
    if max_bytes is not None and path.exists() and path.stat().st_size + len(data) > max_bytes:
        os.replace(path, path.with_name(path.name + ".1"))
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


VERSIONS = ".versions"
"""Where the versions of atomically replaced directories live, beside them (`<parent>/.versions/<name>.<random>`)."""
VERSION = re.compile(r"(?P<name>.+)\.(?P<legacy>legacy-)?[a-z0-9_]{8}")
"""A version's folder name: the directory's name and `tempfile.mkdtemp`'s random suffix."""
STAGED_LINK = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}\.link")
"""A new version's link before it is renamed over the directory (`<parent>/.<name>.<random>.link`)."""


def _writing(target: Path, timeout: float = -1) -> FileLock:
    """The lock held while `target` is written or its leftovers removed, by any thread or process."""
    return FileLock(target.parent / VERSIONS / f"{target.name}.lock", timeout=timeout)


def _remove_leftovers(target: Path) -> None:
    """Remove what a crash while writing or removing `target` left behind: versions it does not point to and staged
    links. A directory moved aside from before versioning is kept until `target` points to a version again."""
    current = target.resolve() if target.is_symlink() else None
    for version in (target.parent / VERSIONS).iterdir():
        match = VERSION.fullmatch(version.name)
        if (match and match["name"] == target.name and version.is_dir() and version != current
                and (current is not None or not match["legacy"])):
            shutil.rmtree(version, ignore_errors=True)
    for link in target.parent.glob(f".{target.name}.*.link"):
        if (match := STAGED_LINK.fullmatch(link.name)) and match["name"] == target.name:
            link.unlink(missing_ok=True)


def remove_leftovers(parent: Path) -> None:
    """Remove the leftovers of crashed writes of every directory under `parent` (a server does this when it starts);
    a directory being written by another process now is skipped."""
    versions = parent / VERSIONS
    if not versions.is_dir():
        return
    names = {m["name"] for m in map(VERSION.fullmatch, (p.name for p in versions.iterdir())) if m}
    names |= {m["name"] for m in map(STAGED_LINK.fullmatch, (p.name for p in parent.glob(".*.link"))) if m}
    for name in sorted(names):
        try:
            with _writing(parent / name, timeout=0):
                _remove_leftovers(parent / name)
        except Timeout:
            continue


@contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield an empty staging directory; on success it becomes `target` in one atomic step.

    `target` is a symlink to its current version under `<parent>/.versions`. The staged version's files and the
    directory are fsynced, then a new symlink is renamed over `target` (a single rename: a reader or a crash sees
    the old version or the new one), the parent is fsynced, and the old version is removed. A `target` that is
    still a plain directory (written before versioning) is first moved aside, once. Writers of one `target` take
    turns (a file lock), and each first removes what a crashed write of it left behind.
    """
    versions = target.parent / VERSIONS
    versions.mkdir(parents=True, exist_ok=True)
    with _writing(target):
        _remove_leftovers(target)
        staging = Path(tempfile.mkdtemp(dir=versions, prefix=f"{target.name}."))
        try:
            yield staging
            for file in staging.iterdir():
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
            fsync_directory(staging)
            fsync_directory(versions)
            old = target.resolve() if target.is_symlink() else None
            if target.is_dir() and not target.is_symlink():
                old = Path(tempfile.mkdtemp(dir=versions, prefix=f"{target.name}.legacy-"))
                os.replace(target, old / target.name)
            link = target.parent / f".{staging.name}.link"
            os.symlink(Path(VERSIONS) / staging.name, link)
            os.replace(link, target)
            fsync_directory(target.parent)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def remove_directory(target: Path) -> None:
    """Remove a directory written by `atomic_directory` (the link first, atomically, then its version)."""
    if target.is_symlink():
        with _writing(target):
            version = target.resolve()
            target.unlink()
            fsync_directory(target.parent)
            shutil.rmtree(version, ignore_errors=True)
    else:
        shutil.rmtree(target)
