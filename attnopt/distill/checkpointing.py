"""Atomic, resumable training checkpoints.

A run killed at any moment leaves either the previous checkpoint or the new one,
never half a file: the state is written to a temporary file in the same directory,
flushed to disk, and renamed over ``latest.pt`` (``os.replace`` is atomic on one
file system). A checkpoint holds everything the next step depends on: the trained
tensors, the optimizer state, the RNG states and the step (the data position:
batches are a pure function of the step, see :class:`~attnopt.distill.data.PackedData`),
plus a fingerprint of the settings, so a run is never resumed with other ones.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["CHECKPOINT_NAME", "load_checkpoint", "restore_rng", "rng_state", "save_checkpoint"]

CHECKPOINT_NAME = "latest.pt"
_FORMAT = 1


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(directory: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``directory/latest.pt`` atomically; returns the path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CHECKPOINT_NAME
    fd, tmp = tempfile.mkstemp(prefix=".latest-", suffix=".pt.tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": _FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_checkpoint(
    directory: str | os.PathLike, fingerprint: dict[str, Any]
) -> dict[str, Any] | None:
    """The checkpoint in ``directory``, or None if there is none.

    Raises ``ValueError`` when it was written with other settings (the fingerprint:
    seed, batch size, sequence length, learning rates, steps, variant, ...), naming
    the settings that differ.
    """
    path = Path(directory) / CHECKPOINT_NAME
    if not path.exists():
        return None
    # Our own files: tensors, plain containers and the python RNG tuple.
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("format") != _FORMAT:
        raise ValueError(
            f"checkpoint {str(path)!r} has format {state.get('format')!r}; this attnopt "
            f"writes format {_FORMAT}: delete it or choose another checkpoint_dir"
        )
    saved = state.get("fingerprint", {})
    diff = {k: (saved.get(k), v) for k, v in fingerprint.items() if saved.get(k) != v}
    if diff:
        what = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise ValueError(
            f"checkpoint {str(path)!r} was written by a run with other settings ({what}); "
            f"resume with the same settings, or choose another checkpoint_dir"
        )
    return state
