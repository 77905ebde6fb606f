"""Helpers more than one test file uses (fixtures live in conftest.py)."""

from __future__ import annotations

import lightning as L

QUIET = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)


def quiet_trainer(**kwargs) -> L.Trainer:
    """A CPU Trainer that writes no logs and prints no progress bar or model summary; `kwargs` add to that or
    override it."""
    return L.Trainer(**{**QUIET, **kwargs})
