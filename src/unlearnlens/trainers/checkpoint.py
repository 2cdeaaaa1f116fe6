"""Save and resume training: trained weights, optimizer, RNG, step and history.

The learning-rate schedule is a function of the step alone (:meth:`TrainConfig.lr_factor`),
so the step restores it.

A checkpoint directory holds ``ckpt-{step}/`` folders (``params.safetensors`` with the
trained parameters, ``state.pt`` with everything else) and ``latest.json`` naming the newest
one; ``latest.json`` is replaced atomically after the folder is complete, so an interruption
while saving leaves the previous checkpoint usable. Only the trained parameters are stored:
the frozen ones equal the starting model's, which the resumed run starts from again.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from unlearnlens.errors import CheckpointError, ConfigError

__all__ = ["load_checkpoint", "save_checkpoint"]


def save_checkpoint(
    directory: str | os.PathLike[str],
    *,
    step: int,
    params: dict[str, nn.Parameter],
    optimizer: torch.optim.Optimizer,
    history: list[dict[str, float | int]],
    fingerprint: dict[str, Any],
) -> Path:
    """Writes the state after ``step`` completed steps; returns the checkpoint folder."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    folder = root / f"ckpt-{step}"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir()
    save_file(
        {n: p.detach().cpu().contiguous() for n, p in params.items()}, folder / "params.safetensors"
    )
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "history": history,
        "fingerprint": fingerprint,
    }
    torch.save(state, folder / "state.pt")
    tmp = root / "latest.json.tmp"
    tmp.write_text(json.dumps({"folder": folder.name, "step": step}))
    os.replace(tmp, root / "latest.json")
    for old in root.glob("ckpt-*"):
        if old != folder and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    return folder


def load_checkpoint(
    directory: str | os.PathLike[str],
    *,
    params: dict[str, nn.Parameter],
    optimizer: torch.optim.Optimizer,
    fingerprint: dict[str, Any],
) -> tuple[int, list[dict[str, float | int]]] | None:
    """Loads the newest checkpoint into ``params`` and ``optimizer``, and restores the RNG.

    Returns:
        ``(step, history)`` of the checkpoint, or ``None`` when the directory holds none.

    Raises:
        ConfigError: The checkpoint was written by a run with other settings.
        CheckpointError: ``latest.json`` names a folder that is missing or incomplete.
    """
    root = Path(directory)
    latest = root / "latest.json"
    if not latest.exists():
        return None
    folder = root / json.loads(latest.read_text())["folder"]
    if not (folder / "state.pt").exists() or not (folder / "params.safetensors").exists():
        raise CheckpointError(f"checkpoint folder {folder} is missing or incomplete")
    state = torch.load(folder / "state.pt", map_location="cpu", weights_only=False)
    saved = state["fingerprint"]
    if saved != fingerprint:
        diff = sorted(
            k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k)
        )
        raise ConfigError(
            f"the checkpoint in {root} was written by a run with other settings "
            f"(differing: {', '.join(diff)}); use another checkpoint_dir or the same settings"
        )
    weights = load_file(folder / "params.safetensors")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name].to(p.device, p.dtype))
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return int(state["step"]), list(state["history"])
