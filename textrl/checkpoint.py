"""Atomic, pickle-free checkpoints: safetensors for every tensor, JSON for everything else.

A checkpoint is a folder. It is written under a temporary name, completed with ``manifest.json`` (size and
SHA-256 of every file), and only then renamed into place, so a crash mid-write leaves either the old
checkpoint or the new one, never a half-written folder under the real name (a killed writer leaves a
hidden ``.step-*.tmp-<pid>`` folder, which is never read and is removed by the next write). Loading
verifies the manifest; a truncated, altered or unlisted file is a :class:`CheckpointError` that names the
file, and :func:`latest_checkpoint` skips such a checkpoint for the previous good one, reporting the skip.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
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
    _fsync_dir(folder.parent)  # make the rename itself durable
    if old.exists():
        shutil.rmtree(old)
    return folder


def _fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            with p.open("rb") as fh:
                os.fsync(fh.fileno())
    for d in [folder, *(p for p in folder.rglob("*") if p.is_dir())]:
        _fsync_dir(d)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open a directory; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_UNFINISHED = re.compile(r"^\..+\.(tmp|old)-(\d+)$")


def remove_unfinished(folder: str | Path) -> list[Path]:
    """Delete the leftovers of writers that died mid-write (``.<name>.tmp-<pid>``, ``.<name>.old-<pid>``).

    Folders of a process that is still running are left alone. Returns what was removed.
    """
    removed = []
    for path in Path(folder).glob(".*"):
        match = _UNFINISHED.match(path.name)
        if match and path.is_dir() and not _pid_alive(int(match.group(2))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftovers: this process is not writing while it cleans up
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's process) or cannot tell: keep it
    return True


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
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{manifest_path} is corrupt: {e}") from None
    if not isinstance(manifest, dict) or not all(_manifest_entry(k, v) for k, v in manifest.items()):
        raise CheckpointError(f"{manifest_path} is corrupt: expected {{file: {{bytes, sha256}}}}")
    for name, meta in manifest.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {folder} is missing {name}")
        if path.stat().st_size != meta["bytes"] or _sha256(path) != meta["sha256"]:
            raise CheckpointError(f"checkpoint file {path} is truncated or corrupt (size/hash mismatch)")
    for path in folder.rglob("*"):  # a file added later (e.g. a pickle) is never loaded unchecked
        name = str(path.relative_to(folder))
        if path.is_file() and name != MANIFEST and name not in manifest and not path.name.startswith("."):
            raise CheckpointError(f"checkpoint {folder} holds {name}, which is not in its manifest")
    return folder


def _manifest_entry(name: object, meta: object) -> bool:
    return (
        isinstance(name, str)
        and not Path(name).is_absolute()
        and ".." not in Path(name).parts
        and isinstance(meta, dict)
        and isinstance(meta.get("bytes"), int)
        and isinstance(meta.get("sha256"), str)
    )


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"cannot read {path}: {e}") from None


def save_module(path: Path, module: torch.nn.Module) -> None:
    """Save a module's weights (tied weights stored once) as safetensors; strided weights (the engine
    stores linear layers input-major, :func:`textrl.engine.input_major`) are written in the usual order."""
    save_model(module, str(path), force_contiguous=True)


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
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None


def latest_checkpoint(
    folder: str | Path, on_skip: Callable[[Path, CheckpointError], None] | None = None
) -> Path | None:
    """The newest *complete* ``step-*`` checkpoint under ``folder``, or None.

    A newer one that fails :func:`verify` (truncated, corrupt, incomplete) is skipped for the previous
    good one; ``on_skip(path, error)`` is called for each skipped checkpoint so the caller can say so.
    Unfinished writes (hidden ``.step-*.tmp-*`` folders) are never considered.
    """
    folder = Path(folder)
    for path in sorted(folder.glob("step-*"), reverse=True):
        try:
            return verify(path)
        except CheckpointError as e:
            if on_skip is not None:
                on_skip(path, e)
    return None
