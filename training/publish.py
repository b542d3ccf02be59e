"""Write a checked model as a new version directory, then point CURRENT at it.

The version directory is assembled under a hidden temporary name next to its
final place and renamed into place in one step, so a reader (or a crash) sees
either no version or a complete one; CURRENT moves only after that, atomically.
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

from contract.errors import TrainingError
from training.artifact import (
    MANIFEST_FILE,
    Manifest,
    ModelFile,
    Variant,
    load_manifest,
    sha256_of,
    verified_model_path,
    write_current,
)

TMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class PendingFile:
    variant: str
    filename: str
    data: bytes
    opset: dict[str, int]
    description: str


ManifestFactory = Callable[[str, str, dict[str, ModelFile]], Manifest]
"""(version, created_at, files) -> the manifest to write."""


def make_version(now: datetime, sha256: str) -> str:
    return f"{now:%Y%m%d-%H%M%S}-{sha256[:6]}"


def publish(
    model_dir: Path, name: str, files: list[PendingFile], make_manifest: ManifestFactory
) -> tuple[Path, Manifest]:
    """Write `files` and their manifest as a new version of `name`; make it CURRENT."""
    if not any(f.variant == "cpu" for f in files):
        raise TrainingError("a model version needs its 'cpu' file")
    parent = model_dir / name
    parent.mkdir(parents=True, exist_ok=True)
    staging = parent / f"{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        entries: dict[str, ModelFile] = {}
        for f in files:
            path = staging / f.filename
            _write_durably(path, f.data)
            entries[f.variant] = ModelFile(
                path=f.filename,
                sha256=sha256_of(path),
                size_bytes=path.stat().st_size,
                opset=f.opset,
                description=f.description,
            )
        version_dir, manifest = _move_into_place(staging, parent, entries, make_manifest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    # Read back through the same code the workers use before anyone is pointed at it.
    checked_dir, checked = load_manifest(model_dir, name, manifest.version)
    for variant in checked.files:
        verified_model_path(checked_dir, checked, cast(Variant, variant))
    write_current(model_dir, name, manifest.version)
    return version_dir, manifest


def _move_into_place(
    staging: Path, parent: Path, entries: dict[str, ModelFile], make_manifest: ManifestFactory
) -> tuple[Path, Manifest]:
    # Versions are named after the second they were published in; two identical
    # models published within one second would collide, so the second one waits.
    for _ in range(5):
        now = datetime.now(UTC)
        manifest = make_manifest(
            make_version(now, entries["cpu"].sha256),
            now.isoformat(timespec="seconds"),
            entries,
        )
        _write_durably(staging / MANIFEST_FILE, manifest.model_dump_json(indent=2).encode())
        _fsync_dir(staging)
        target = parent / manifest.version
        if not target.exists():
            try:
                staging.rename(target)
            except OSError:
                if not target.exists():
                    raise
            else:
                _fsync_dir(parent)
                return target, manifest
        time.sleep(1.0 - now.microsecond / 1e6 + 0.01)
    raise TrainingError(f"could not find a free version name under {parent}")


def _write_durably(path: Path, data: bytes) -> None:
    with path.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
