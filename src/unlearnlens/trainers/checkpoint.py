"""Save and resume training: master weights, optimizer state, RNG, step and history.

The learning-rate schedule is a function of the step alone (:meth:`TrainConfig.lr_factor`),
and so is the batch order, so the step restores both.

A checkpoint directory holds ``ckpt-{step}/`` folders and ``latest.json`` naming the newest
one. A folder holds ``tensors.safetensors`` (the float32 masters of the trained parameters as
``param/{name}``, AdamW's state as ``optim/{name}/{key}``, the random generators' states as
``rng/torch`` and ``rng/cuda/{i}``) and ``state.json`` (step, history, the run's settings
fingerprint, the float16 loss scale, AdamW's non-tensor state). Nothing is pickled, so a
crafted checkpoint cannot run code. Each folder is written under a temporary name and renamed
into place, then ``latest.json`` is replaced atomically: an interruption while saving leaves
the previous checkpoint usable. Only the trained parameters are stored: the frozen ones equal
the starting model's, which the resumed run starts from again.

Resuming reads and checks everything (file formats, names, shapes, settings) before anything
is changed, so a bad checkpoint raises with the model and optimizer untouched.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from unlearnlens._storage import (
    atomic_directory,
    decode_floats,
    encode_floats,
    read_json,
    read_safetensors,
    remove_directory,
    write_json,
    write_safetensors,
)
from unlearnlens.errors import CheckpointError, ConfigError
from unlearnlens.trainers.optim import MasterOptimizer

__all__ = ["Checkpoint", "read_checkpoint", "restore_checkpoint", "save_checkpoint"]

TENSORS = "tensors.safetensors"
STATE = "state.json"
LATEST = "latest.json"
_FOLDER = re.compile(r"ckpt-\d+")


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint read from disk and checked against the run, not yet applied."""

    folder: Path
    """The ``ckpt-{step}`` folder it came from."""
    step: int
    """Completed optimizer steps."""
    history: list[dict[str, float | int]]
    """The history up to ``step``."""
    tensors: dict[str, torch.Tensor]
    """Everything from ``tensors.safetensors``."""
    state: dict[str, Any]
    """Everything from ``state.json``."""


def _history(history: object, where: Path) -> list[dict[str, float | int]]:
    """The history rows of ``state.json``, non-finite floats decoded, every value a number."""
    if not isinstance(history, list) or not all(isinstance(r, dict) for r in history):
        raise CheckpointError(f"checkpoint state {str(where)!r} has no valid history")
    try:
        rows = decode_floats(history)
    except (TypeError, ValueError):
        rows = None
    if rows is None or any(
        isinstance(v, bool) or not isinstance(v, (int, float)) for r in rows for v in r.values()
    ):
        raise CheckpointError(f"checkpoint file {str(where)!r} has a non-numeric history value")
    return rows


def _optimizer_entries(sd: dict[str, Any]) -> dict[str, int]:
    """The AdamW state-dict index of each trained parameter name, from the state dict ``sd``."""
    return {
        name: idx
        for group in sd["param_groups"]
        for name, idx in zip(group["names"], group["params"], strict=True)
    }


def _optimizer_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The ``optim/{name}/{key}`` entries of a checkpoint as ``{name: {key: tensor}}``."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for entry, value in tensors.items():
        if entry.startswith("optim/"):
            name, _, key = entry[len("optim/") :].rpartition("/")
            out.setdefault(name, {})[key] = value
    return out


def save_checkpoint(
    directory: str | os.PathLike[str],
    *,
    step: int,
    optimizer: MasterOptimizer,
    history: list[dict[str, float | int]],
    fingerprint: dict[str, Any],
) -> Path:
    """Writes the state after ``step`` completed steps; returns the checkpoint folder."""
    root = Path(directory)
    folder = root / f"ckpt-{step}"
    sd = optimizer.optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {
        f"param/{n}": m for n, m in optimizer.master_state().items()
    }
    scalars: dict[str, dict[str, Any]] = {}
    for name, idx in _optimizer_entries(sd).items():
        for key, value in sd["state"].get(idx, {}).items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{name}/{key}"] = value
            else:
                scalars.setdefault(name, {})[key] = value
    tensors["rng/torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = s
    state = {
        "format": 2,
        "step": step,
        "history": encode_floats(history),
        "fingerprint": fingerprint,
        "optimizer_scalars": scalars,
        "loss_scale": optimizer.loss_scale,
        "good_steps": optimizer.good_steps,
    }
    with atomic_directory(folder) as tmp:
        write_safetensors(tmp / TENSORS, tensors)
        write_json(tmp / STATE, state)
    write_json(root / LATEST, {"folder": folder.name, "step": step})
    for old in root.glob("ckpt-*"):
        if old != folder and old.is_dir():
            remove_directory(old)
    return folder


def read_checkpoint(
    directory: str | os.PathLike[str],
    *,
    optimizer: MasterOptimizer,
    fingerprint: dict[str, Any],
) -> Checkpoint | None:
    """Reads and checks the newest checkpoint in ``directory``; changes nothing.

    Returns:
        The checkpoint, or ``None`` when the directory holds none.

    Raises:
        ConfigError: The checkpoint was written by a run with other settings.
        CheckpointError: ``latest.json`` names a folder that is missing, or a file lacks an
            entry or holds one of the wrong shape; the message names the file.
        FileFormatError: A file is truncated, corrupt or not in its format; names the file.
    """
    root = Path(directory)
    latest = root / LATEST
    if not latest.exists():
        return None
    pointer = read_json(latest, what="checkpoint pointer")
    name = pointer.get("folder") if isinstance(pointer, dict) else None
    if not isinstance(name, str) or not _FOLDER.fullmatch(name):
        raise CheckpointError(
            f"checkpoint pointer {str(latest)!r} does not name a ckpt-<step> folder"
        )
    folder = root / name
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {str(folder)!r} named by {LATEST} is missing")
    state = read_json(folder / STATE, what="checkpoint state")
    if not isinstance(state, dict) or state.get("format") != 2:
        raise CheckpointError(
            f"checkpoint state {str(folder / STATE)!r} is not an unlearnlens checkpoint (format 2)"
        )
    saved = state.get("fingerprint")
    if saved != fingerprint:
        saved = saved if isinstance(saved, dict) else {}
        diff = sorted(
            k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k)
        )
        raise ConfigError(
            f"the checkpoint in {str(root)!r} was written by a run with other settings "
            f"(differing: {', '.join(diff)}); use another checkpoint_dir or the same settings"
        )
    tensors = read_safetensors(folder / TENSORS, what="checkpoint tensors")
    where = folder / TENSORS
    moments = _optimizer_tensors(tensors)
    for n, m in optimizer.master_state().items():
        t = tensors.get(f"param/{n}")
        if t is None:
            raise CheckpointError(f"checkpoint file {str(where)!r} has no entry param/{n}")
        if t.shape != m.shape or t.dtype != m.dtype:
            raise CheckpointError(
                f"checkpoint file {str(where)!r}: param/{n} is {t.dtype} {tuple(t.shape)}, "
                f"expected {m.dtype} {tuple(m.shape)}"
            )
        for key, value in moments.get(n, {}).items():
            if value.ndim > 0 and value.shape != m.shape:
                raise CheckpointError(
                    f"checkpoint file {str(where)!r}: optim/{n}/{key} has shape "
                    f"{tuple(value.shape)}, expected {tuple(m.shape)}"
                )
    rng = tensors.get("rng/torch")
    if rng is None or rng.dtype != torch.uint8 or rng.ndim != 1:
        raise CheckpointError(f"checkpoint file {str(where)!r} has no valid rng/torch entry")
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"checkpoint state {str(folder / STATE)!r} has no valid step")
    rows = _history(state.get("history"), folder / STATE)
    return Checkpoint(folder, step, rows, tensors, state)


def restore_checkpoint(checkpoint: Checkpoint, optimizer: MasterOptimizer) -> None:
    """Loads a checked checkpoint into the optimizer's masters and state, and the RNG.

    The model's parameters are not written here (:meth:`MasterOptimizer.write_back` does).

    Raises:
        CheckpointError: The optimizer state or a generator state does not load.
    """
    t, where = checkpoint.tensors, checkpoint.folder / TENSORS
    scalars = checkpoint.state.get("optimizer_scalars") or {}
    current = optimizer.optimizer.state_dict()
    entries = _optimizer_entries(current)
    moments = _optimizer_tensors(t)
    state: dict[int, dict[str, Any]] = {}
    for name, idx in entries.items():
        found = dict(moments.get(name, {}))
        found.update(scalars.get(name, {}) if isinstance(scalars, dict) else {})
        if found:
            state[idx] = found
    try:
        optimizer.optimizer.load_state_dict(
            {"state": state, "param_groups": current["param_groups"]}
        )
    except (KeyError, ValueError, RuntimeError, TypeError) as exc:
        raise CheckpointError(
            f"checkpoint file {str(where)!r}: bad optimizer state: {exc}"
        ) from None
    try:
        torch.set_rng_state(t["rng/torch"])
        cuda = [t[f"rng/cuda/{i}"] for i in range(sum(k.startswith("rng/cuda/") for k in t))]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
    except (KeyError, RuntimeError) as exc:
        raise CheckpointError(
            f"checkpoint file {str(where)!r}: bad generator state: {exc}"
        ) from None
    optimizer.load_masters({n: t[f"param/{n}"] for n in optimizer.names})
    optimizer.loss_scale = float(checkpoint.state.get("loss_scale", optimizer.loss_scale))
    optimizer.good_steps = int(checkpoint.state.get("good_steps", 0))
