"""One checkpoint format for every script: plain tensors and Python values only.

``best.pt`` = {"format", "version", "model": state_dict, "description": RunDescription.to_dict()}.
``last.pt`` adds "resume": optimiser, scheduler, epoch, early stopping and RNG states.
Everything loads with ``torch.load(weights_only=True)``, so an untrusted file cannot run code.
"""
from __future__ import annotations

import random
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from utils.description import DescriptionError, RunDescription
from utils.errors import UserError
from utils.io import write_serialised

FORMAT = "stitchdefect-checkpoint"
VERSION = 1


class CheckpointError(UserError):
    """A checkpoint the user gave cannot be used; the message says why."""


def save_checkpoint(path: Path | str, model_state: dict, description: RunDescription, resume: dict | None = None) -> None:
    payload = {"format": FORMAT, "version": VERSION, "model": model_state, "description": description.to_dict()}
    if resume is not None:
        payload["resume"] = resume
    write_serialised(path, lambda buffer: torch.save(payload, buffer))


def load_checkpoint(path: Path | str) -> dict:
    """Load and validate a checkpoint of this project (weights_only: no pickled code).

    Returns the payload with ``"description"`` as a checked RunDescription.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint '{path}' is a folder: give the checkpoint file in it (e.g. {path / 'best.pt'})")
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    if is_exported_program(path):
        raise CheckpointError(f"'{path}' is a torch.export program (.pt2, written by quantization-train.py --api pt2e), "
                              "not a checkpoint: give the int8_<mode>.pt beside it, or the FP32 best.pt it was quantised "
                              "from (export.py and distill.py need the FP32 one)")
    check_zip_records(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling errors come in many types
        detail = str(error).strip().splitlines()[0] if str(error).strip() else "empty or truncated file"
        if "weights_only" in str(error) or "Weights only load failed" in str(error):  # never pass on torch's unsafe advice
            detail = "it holds pickled Python objects beyond tensors, which this toolkit never loads"
        raise CheckpointError(f"'{path}' is not a readable checkpoint ({type(error).__name__}: {detail})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"'{path}' is not a checkpoint of this project (no '{FORMAT}' marker)")
    version = payload.get("version", 0)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise CheckpointError(f"'{path}' is damaged or not of this toolkit: its format version is {version!r}, not a version number")
    if version > VERSION:
        raise CheckpointError(f"'{path}' was written by a newer version of this toolkit; upgrade it")
    if not isinstance(payload.get("model"), dict):
        raise CheckpointError(f"'{path}' holds no model weights (its 'model' entry is not a state dict)")
    try:
        payload["description"] = RunDescription.from_dict(payload.get("description"))
    except DescriptionError as error:
        raise CheckpointError(f"'{path}' is damaged or not of this toolkit: {error}") from None
    return payload


def is_exported_program(path: Path) -> bool:
    """Whether ``path`` is a ``torch.export.save`` archive (a zip holding ``<name>/archive_format``)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/archive_format") for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def check_zip_records(path: Path) -> None:
    """CheckpointError (one line) for a zip-based torch file (a checkpoint, a TorchScript model) with a record whose
    bytes no longer match the CRC-32 stored when it was written: damaged after saving. torch.load does not check them.
    A file that is no zip at all is left to torch.load to refuse."""
    try:
        with zipfile.ZipFile(path) as archive:
            for record in archive.infolist():
                if record.CRC == 0:  # written without one (torch's compute_crc32 switched off), or empty
                    continue
                try:
                    with archive.open(record) as data:
                        while data.read(1 << 20):
                            pass
                except (zipfile.BadZipFile, zlib.error, EOFError):
                    raise CheckpointError(f"'{path}' is damaged: its record '{record.filename}' no longer matches the "
                                          "CRC-32 stored when it was saved; copy it again or save it anew") from None
    except (OSError, zipfile.BadZipFile):
        return


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
