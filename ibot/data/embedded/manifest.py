"""Manifest, ``DONE`` marker, verification and the atomic build of one embedded set.

Every set root holds ``MANIFEST.json`` (parameters + sha256 of every file) and ``DONE`` (sha256 of
the manifest). A set is built in ``<root>.tmp-<pid>`` and renamed into place, so a root without a
valid ``DONE`` is never complete; an existing complete root with the same parameters is reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from ibot.data.embedded.base import EmbeddedSizes, Mapper, SetBuilder
from ibot.data.embedded.render import dump_json

__all__ = ["MANIFEST", "DONE", "MANIFEST_VERSION", "is_complete", "verify", "materialise"]

MANIFEST, DONE = "MANIFEST.json", "DONE"
MANIFEST_VERSION = 3  # 2: ImageNet label-subset files, transfer sets; 3: COCO set for the embedded detection


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _params(name: str, seed: int, sizes: EmbeddedSizes, fields: tuple[str, ...]) -> dict[str, Any]:
    """What a set's bytes depend on (recorded in its manifest; a reuse must match it)."""
    return {"dataset": name, "seed": seed, "sizes": {f: getattr(sizes, f) for f in fields},
            "version": MANIFEST_VERSION}


def _write_manifest(root: Path, params: dict[str, Any]) -> None:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    manifest = {**params, "files": {p.relative_to(root).as_posix(): _sha256(p) for p in files}}
    (root / MANIFEST).write_text(dump_json(manifest) + "\n", encoding="utf-8")
    (root / DONE).write_text(_sha256(root / MANIFEST) + "\n", encoding="utf-8")


def _read_manifest(root: Path) -> dict[str, Any] | None:
    """The manifest if ``DONE`` vouches for it, else None."""
    try:
        done = (root / DONE).read_text(encoding="utf-8").strip()
        if done != _sha256(root / MANIFEST):
            return None
        return json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_complete(root: str | Path) -> bool:
    """True iff ``root`` is a finished embedded set (valid ``DONE`` marker); cheap."""
    return _read_manifest(Path(root)) is not None


def verify(root: str | Path) -> None:
    """Check every file of a finished set against its manifest; raises ValueError on mismatch."""
    root = Path(root)
    manifest = _read_manifest(root)
    if manifest is None:
        raise ValueError(f"{root}: no valid {DONE} marker; the dataset is incomplete")
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - {MANIFEST, DONE}
    expected = manifest["files"]
    problems = sorted(set(expected) ^ on_disk) + sorted(
        f for f in expected if f in on_disk and _sha256(root / f) != expected[f]
    )
    if problems:
        raise ValueError(f"{root}: {len(problems)} files missing, extra or modified, e.g. {problems[:5]}")


def materialise(name: str, final: Path, seed: int, sizes: EmbeddedSizes, builder: SetBuilder, run: Mapper) -> Path:
    """Build set ``name`` atomically at ``final``, or reuse an existing complete one with the same parameters."""
    params = _params(name, seed, sizes, builder.fields)
    if final.exists():
        _check_reusable(final, params)
        return final
    tmp = final.parent / f"{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        builder.build(tmp, seed, sizes, run)
        _write_manifest(tmp, params)
        os.rename(tmp, final)
    except OSError:
        if not final.exists():
            raise
        _check_reusable(final, params)  # a concurrent run finished first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _check_reusable(final: Path, params: dict[str, Any]) -> None:
    manifest = _read_manifest(final)
    if manifest is None:
        raise FileExistsError(
            f"{final} exists but has no valid {DONE} marker (incomplete, or not written by "
            "ibot.data.embedded); remove it to regenerate"
        )
    old = {k: manifest.get(k) for k in params}
    if old != params:
        raise FileExistsError(f"{final} was generated with {old}, but {params} was requested; remove it to regenerate")
