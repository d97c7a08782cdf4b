"""Manifests: a folder's files with their sizes and SHA-256, written last, checked before the folder is used.

A checkpoint, a run folder and a cached model conversion each get one. Written after every file it lists
(and after those are on disk), a manifest marks the folder complete; verified on use, it catches an
interrupted save, a damaged copy or an edited file. A manifest is read as untrusted data: a malformed
one, an empty file list, or a listed path that leaves the folder (absolute, `..`, or through a link) is
a problem, never an exception or a read elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any

from llmclf.runfolder import read_json, write_json

MANIFEST = "llmclf_manifest.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path, names: Iterable[str] | None) -> list[Path]:
    roots = [folder] if names is None else [folder / name for name in names]
    found: list[Path] = []
    for root in roots:
        found += [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return [p for p in found if p.name != MANIFEST and not p.is_symlink()]


def write_manifest(folder: Path, names: Iterable[str] | None = None, **extra: Any) -> dict:
    """List the files under `folder` (or only those under `names`, files or folders relative to it) with
    size and hash, flush them to disk, then write the manifest (with `extra` keys) atomically."""
    files = {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in _files(folder, names)
    }
    for p in _files(folder, names):  # data on disk before the marker that says it is there
        with p.open("rb") as handle:
            os.fsync(handle.fileno())
    manifest = {**extra, "files": files}
    write_json(folder / MANIFEST, manifest)
    return manifest


def read_manifest(folder: Path) -> tuple[dict | None, str | None]:
    """(manifest, None) when it is well formed, else (None, why not)."""
    path = folder / MANIFEST
    if path.is_symlink() or not path.is_file():
        return None, f"no {MANIFEST} (the save was interrupted, or the folder was not written by llmclf)"
    try:
        manifest = read_json(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None, f"{MANIFEST} is not readable JSON"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files:
        return None, f"{MANIFEST} lists no files"
    for name, meta in files.items():
        ok = isinstance(meta, dict) and isinstance(meta.get("sha256"), str)
        ok = ok and isinstance(meta.get("size"), int) and not isinstance(meta.get("size"), bool)
        if not ok:
            return None, f"{MANIFEST}: the entry for {name!r} has no size and sha256"
        if not _inside(name):
            return None, f"{MANIFEST} lists {name!r}, a path outside the folder"
    return manifest, None


def _inside(name: Any) -> bool:
    """A relative path that stays inside the folder (no absolute path, no `..`, no drive)."""
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        return False
    path = PurePosixPath(name)
    return not path.is_absolute() and ".." not in path.parts and ":" not in path.parts[0]


def _unlisted(folder: Path, files: dict) -> str | None:
    """A link anywhere under `folder`, or a file there that `files` does not list, said as a problem."""
    for top, dirs, names in os.walk(folder):  # does not follow links into other folders
        for name in sorted(dirs + names):
            path = Path(top) / name
            relative = path.relative_to(folder).as_posix()
            if path.is_symlink():
                return f"{relative} is a link (a folder written by llmclf holds none)"
            if name in names and relative not in files and relative != MANIFEST:
                return f"{relative} is not listed in {MANIFEST} (added after the folder was written)"
    return None


def manifest_problem(folder: Path, expected: Iterable[str] = (), complete: bool = False) -> str | None:
    """Why `folder` does not match its manifest, or None when every listed file verifies. `expected`:
    files the manifest must list (so a manifest that leaves one out does not pass). `complete`: also
    refuse a link anywhere under the folder and a file the manifest does not list, for a folder whose
    every file is read (a checkpoint, a converted model)."""
    manifest, problem = read_manifest(folder)
    if manifest is None:
        return problem
    files = manifest["files"]
    root = Path(os.path.realpath(folder))
    for name in expected:
        if name not in files:
            return f"{MANIFEST} does not list {name}"
    if complete and (problem := _unlisted(folder, files)):
        return problem
    for name, meta in files.items():
        path = folder / name
        if not Path(os.path.realpath(path)).is_relative_to(root):
            return f"{name} leads outside the folder (a link)"
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != meta["size"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {meta['size']}"
        if sha256_file(path) != meta["sha256"]:
            return f"{name} does not match its SHA-256 in the manifest"
    return None
