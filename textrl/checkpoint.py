"""Atomic, pickle-free checkpoints: safetensors for every tensor, JSON for everything else.

A checkpoint is a folder. It is written under a temporary name, completed with ``manifest.json`` (size and
SHA-256 of every file), and only then renamed into place, so a crash mid-write leaves either the old
checkpoint or the new one, never a half-written folder under the real name. Loading verifies the
manifest; a truncated or altered file is a :class:`CheckpointError` that names the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt, or does not fit the model."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def flatten_state(state: dict[str, Any], prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested state (e.g. an optimizer's ``state_dict()``) into tensors and a JSON skeleton.

    >>> tensors, skel = flatten_state({"a": torch.ones(2), "b": [1, {"c": torch.zeros(1)}], "d": (0.9, 0.99)})
    >>> sorted(tensors), skel
    (['a', 'b.1.c'], {'a': {'__tensor__': 'a'}, 'b': [1, {'c': {'__tensor__': 'b.1.c'}}], 'd': [0.9, 0.99]})
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(x: Any, key: str) -> Any:
        if isinstance(x, torch.Tensor):
            tensors[key] = x.detach().cpu().contiguous()
            return {"__tensor__": key}
        if isinstance(x, dict):
            return {str(k): walk(v, f"{key}.{k}" if key else str(k)) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [walk(v, f"{key}.{i}" if key else str(i)) for i, v in enumerate(x)]
        return x

    return tensors, walk(state, prefix)


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state` (dict keys that were ints come back as ints)."""
    if isinstance(skeleton, dict):
        if set(skeleton) == {"__tensor__"}:
            return tensors[skeleton["__tensor__"]]
        return {(int(k) if k.lstrip("-").isdigit() else k): unflatten_state(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [unflatten_state(v, tensors) for v in skeleton]
    return skeleton


def write_atomic(folder: str | Path, write) -> Path:
    """Call ``write(tmp_folder)``, add the manifest, then move the folder into place atomically.

    An existing checkpoint at ``folder`` is replaced only after the new one is complete.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    write(tmp)
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    manifest = {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    _fsync_tree(tmp)
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    if old.exists():
        shutil.rmtree(old)
    return folder


def _fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            with p.open("rb") as fh:
                os.fsync(fh.fileno())


def verify(folder: str | Path) -> Path:
    """Check that ``folder`` is a complete checkpoint whose files match its manifest."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"no checkpoint at {folder}")
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{folder} is not a complete textrl checkpoint (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{manifest_path} is corrupt: {e}") from None
    for name, meta in manifest.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {folder} is missing {name}")
        if path.stat().st_size != meta["bytes"] or _sha256(path) != meta["sha256"]:
            raise CheckpointError(f"checkpoint file {path} is truncated or corrupt (size/hash mismatch)")
    return folder


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"cannot read {path}: {e}") from None


def save_module(path: Path, module: torch.nn.Module) -> None:
    """Save a module's weights (tied weights stored once) as safetensors."""
    save_model(module, str(path))


def load_module(path: Path, module: torch.nn.Module) -> None:
    """Load weights saved by :func:`save_module`; a missing or mismatched tensor is a CheckpointError."""
    try:
        missing, unexpected = load_model(module, str(path), strict=True)
    except Exception as e:
        raise CheckpointError(f"{path} does not fit this model: {e}") from None
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit this model (missing {missing}, unexpected {unexpected})")


def save_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The newest *complete* ``step-*`` checkpoint under ``folder`` (incomplete ones are skipped)."""
    folder = Path(folder)
    for path in sorted(folder.glob("step-*"), reverse=True):
        try:
            return verify(path)
        except CheckpointError:
            continue
    return None
