"""Which base model a run was trained from, recorded at training and checked when the run is loaded.

A run folder holds only the adapter and the head; the base model's weights come from elsewhere. Its
`run_info.json` records the base model's identity (`identify`): the embedded model's file hash, a GGUF
file's path and hash, a local folder's path and fingerprint, or a hub id with the exact revision. A
load (`resolve_recorded`) takes the base model from that record, never from the folder's `config.yaml`,
and refuses one that differs, saying what differs. The caller may name another copy (`base_model`),
which must match the record too.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from llmclf.errors import LlmclfError
from llmclf.manifest import sha256_file
from llmclf.model.sources import ALIASES, alias_file, resolve_model_source

KINDS = ("alias", "gguf", "folder", "hub")
SMALL_FILE = 1 << 20  # files up to this size are hashed whole; larger ones by size (and header)


def identify(name: str, revision: str | None = None) -> dict[str, Any]:
    """The identity of the base model `name` (as given to `--model`); `revision`: a hub model's commit."""
    if name in ALIASES:
        return {"kind": "alias", "name": name, "sha256": sha256_file(alias_file(name))}
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf" and path.is_file():
        return {"kind": "gguf", "path": str(path.resolve()), "sha256": sha256_file(path)}
    if path.is_dir():
        return {"kind": "folder", "path": str(path.resolve()), "files": folder_fingerprint(path)}
    return {"kind": "hub", "id": name, "revision": revision}


def folder_fingerprint(folder: Path) -> dict[str, dict[str, Any]]:
    """Every file's size; the SHA-256 of small files (config, tokenizer) and of safetensors headers
    (tensor names, shapes, offsets), so that a swapped or edited model is told apart without hashing
    gigabytes of weights on every load."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and ".cache" not in p.relative_to(folder).parts):
        entry: dict[str, Any] = {"size": path.stat().st_size}
        if entry["size"] <= SMALL_FILE:
            entry["sha256"] = sha256_file(path)
        elif path.suffix == ".safetensors":
            entry["header_sha256"] = _safetensors_header_sha(path)
        out[path.relative_to(folder).as_posix()] = entry
    return out


def _safetensors_header_sha(path: Path) -> str | None:
    import hashlib

    with path.open("rb") as handle:
        raw = handle.read(8)
        if len(raw) < 8:
            return None
        (length,) = struct.unpack("<Q", raw)
        return hashlib.sha256(handle.read(min(length, 100 << 20))).hexdigest()


def resolve_recorded(recorded: Any, base_model: str | None, run_info_path: Path) -> tuple[str, str | None]:
    """The source to load the base model from and its hub revision, checked against the run's record.

    `base_model`: the caller's own copy (a folder, .gguf file, alias or hub id), checked against the
    record; required for a run folder that records none."""
    if recorded is None:
        if base_model is None:
            raise LlmclfError(
                f"{run_info_path} records no base-model identity (the run was written by an older llmclf, or "
                "the entry was removed), so llmclf cannot tell which model to load the adapter onto. Pass "
                "--base-model NAME (Classifier.load(..., base_model=NAME)) with the model it was trained "
                "from, or train again."
            )
        return resolve_model_source(base_model), None
    _check_record(recorded, run_info_path)
    if base_model is not None:
        current = identify(base_model, recorded.get("revision") if recorded["kind"] == "hub" else None)
        differences = identity_differences(recorded, current)
        if differences:
            raise LlmclfError(
                f"--base-model {base_model} is not the model this run was trained from: "
                + "; ".join(differences)
                + f" (recorded in {run_info_path}). Give the same model the run was trained from."
            )
        return resolve_model_source(base_model), current.get("revision")
    name = {"alias": "name", "gguf": "path", "folder": "path", "hub": "id"}[recorded["kind"]]
    where = recorded[name]
    if recorded["kind"] in ("gguf", "folder") and not Path(where).exists():
        raise LlmclfError(
            f"The base model of this run, {where}, is not on this machine ({run_info_path}). Pass "
            "--base-model PATH with a copy of it (it is checked to be the same model)."
        )
    if recorded["kind"] != "hub":
        differences = identity_differences(recorded, identify(where))
        if differences:
            raise LlmclfError(
                f"The base model at {where} is no longer the one this run was trained from: "
                + "; ".join(differences)
                + ". Restore that model, or pass --base-model with a copy of the original."
            )
    return resolve_model_source(where), recorded.get("revision")


def _check_record(recorded: Any, run_info_path: Path) -> None:
    fields = {"alias": ("name", "sha256"), "gguf": ("path", "sha256"), "folder": ("path", "files"), "hub": ("id",)}
    kind = recorded.get("kind") if isinstance(recorded, dict) else None
    ok = kind in fields and all(isinstance(recorded.get(f), str | dict) for f in fields[kind])
    ok = ok and (kind != "hub" or isinstance(recorded.get("revision"), str | None))
    if not ok:
        raise LlmclfError(
            f"{run_info_path}: base_model_identity is malformed ({json.dumps(recorded)[:200]}). The run folder "
            "was damaged or edited: copy it again, or train again."
        )


def identity_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between two identities, in words; empty when they are the same model."""
    if recorded["kind"] != current["kind"]:
        return [f"the run used a {recorded['kind']} model, this is a {current['kind']} one"]
    if recorded["kind"] in ("alias", "gguf"):
        same = recorded["sha256"] == current["sha256"]
        return [] if same else ["the model file's SHA-256 differs (another version or an edited file)"]
    if recorded["kind"] == "hub":
        if recorded["id"] != current["id"]:
            return [f"the run used {recorded['id']}, this is {current['id']}"]
        return []
    old, new = recorded["files"], current["files"]
    out = [f"{name} is missing" for name in sorted(set(old) - set(new))]
    out += [f"{name} is new" for name in sorted(set(new) - set(old))]
    out += [f"{name} differs" for name in sorted(set(old) & set(new)) if old[name] != new[name]]
    return out[:10]
