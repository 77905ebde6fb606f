"""Random-number state in checkpoints, so a resumed run draws the same dropout masks as an unbroken one."""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.distributed as dist


def rng_state() -> dict:
    """Tensors and plain Python values only, so the checkpoint stays loadable with `weights_only=True`."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, mt, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": [version, torch.tensor(mt, dtype=torch.int64), py_gauss],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, mt, py_gauss = state["python"]
    random.setstate((version, tuple(mt.tolist()), py_gauss))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_states_of_all_ranks() -> list[dict]:
    """Every rank's RNG state, gathered (all ranks call this while a checkpoint is dumped), so that after a
    resume each rank draws the dropout masks it would have drawn; only rank 0 writes the file."""
    state = rng_state()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        states: list = [None] * dist.get_world_size()
        dist.all_gather_object(states, state)
        return states
    return [state]


def restore_rng_state(checkpoint: dict, rank: int, world_size: int) -> None:
    """This rank's state when the checkpoint was written by as many ranks; else rank 0's (another world size)."""
    states = checkpoint.get("rng_states")
    if states:
        set_rng_state(states[rank] if len(states) == world_size else states[0])
    elif "rng_state" in checkpoint:  # checkpoints holding one state only
        set_rng_state(checkpoint["rng_state"])
