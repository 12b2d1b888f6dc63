"""One checkpoint format for every script: plain tensors and Python values only.

``best.pt`` = {"format", "version", "model": state_dict, "description": RunDescription.to_dict()}.
``last.pt`` adds "resume": optimiser, scheduler, epoch, early stopping and RNG states.
Everything loads with ``torch.load(weights_only=True)``, so an untrusted file cannot run code.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from utils.description import DescriptionError, RunDescription
from utils.errors import UserError
from utils.io import WriteError, atomic_path

FORMAT = "stitchdefect-checkpoint"
VERSION = 1


class CheckpointError(UserError):
    """A checkpoint the user gave cannot be used; the message says why."""


def save_checkpoint(path: Path | str, model_state: dict, description: RunDescription, resume: dict | None = None) -> None:
    payload = {"format": FORMAT, "version": VERSION, "model": model_state, "description": description.to_dict()}
    if resume is not None:
        payload["resume"] = resume
    with atomic_path(path) as tmp:
        try:
            torch.save(payload, tmp)
        except RuntimeError as error:  # torch's zip writer reports a failed write (e.g. disk full) as RuntimeError
            raise WriteError.of(path, OSError(str(error).splitlines()[0])) from None


def load_checkpoint(path: Path | str) -> dict:
    """Load and validate a checkpoint of this project (weights_only: no pickled code).

    Returns the payload with ``"description"`` as a checked RunDescription.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling errors come in many types
        detail = str(error).strip().splitlines()[0] if str(error).strip() else "empty or truncated file"
        raise CheckpointError(f"'{path}' is not a readable checkpoint ({type(error).__name__}: {detail})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"'{path}' is not a checkpoint of this project (no '{FORMAT}' marker)")
    if payload.get("version", 0) > VERSION:
        raise CheckpointError(f"'{path}' was written by a newer version of this toolkit; upgrade it")
    if not isinstance(payload.get("model"), dict):
        raise CheckpointError(f"'{path}' holds no model weights (its 'model' entry is not a state dict)")
    try:
        payload["description"] = RunDescription.from_dict(payload.get("description"))
    except DescriptionError as error:
        raise CheckpointError(f"'{path}' is damaged or not of this toolkit: {error}") from None
    return payload


def rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "cached": cached},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
