"""What the tower configs share: a Transformer encoder's size preset and its overrides (text and speech), and
where a tower's weights come from and how it trains (every tower)."""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from lightning_modules.components.encoder import SizeName


@dataclass
class EncoderShape:
    """Size preset of a Transformer encoder and overrides of its shape (the text and speech towers, and the MLM
    and fine-tuning encoders)."""

    size: SizeName = "base"
    """Preset (tiny, mini, small, medium, base, large, as for BERT); the fields below override it."""
    layers: int | None = None
    """Encoder blocks; None keeps the preset's."""
    hidden: int | None = None
    """Width; None keeps the preset's. Heads then default to width / 64."""
    heads: int | None = None
    """Attention heads; None keeps the preset's (or width / 64 when only the width is overridden)."""
    dropout: float = 0.0
    """Dropout on the encoder's input and block outputs, and on attention probabilities unless
    attention_dropout is set."""
    attention_dropout: float | None = None
    """Dropout on the attention probabilities; None: `dropout`."""
    intermediate: int | None = None
    """Feed-forward width; None keeps the preset's (4 x the preset's width)."""
    norm_first: bool | None = None
    """Pre-LN blocks (with a final LayerNorm) when true, post-LN when false; None: the encoder's own (BERT's
    post-LN for text, pre-LN for speech)."""

    def encoder_overrides(self) -> dict[str, Any]:
        """`EncoderConfig.from_size` arguments of this shape; the fields left None are not in it."""
        overrides = dict(
            num_layers=self.layers,
            hidden_size=self.hidden,
            num_heads=self.heads or (self.hidden // 64 if self.hidden else None),
            intermediate_size=self.intermediate,
            dropout=self.dropout,
            attention_dropout=self.dropout if self.attention_dropout is None else self.attention_dropout,
            norm_first=self.norm_first,
        )
        return {k: v for k, v in overrides.items() if v is not None}


TowerSource = Literal["scratch", "ours", "hf_bert", "hf", "open_clip", "torchvision", "torchaudio"]


@dataclass
class TowerInit:
    """Where a tower's weights come from. Every source is a local file or folder: nothing is downloaded."""

    source: TowerSource = "scratch"
    """scratch: random weights; ours: an MLM checkpoint of this framework (text); hf_bert: a Hugging Face BERT
    folder into our encoder (text); hf: a Hugging Face folder through transformers (text encoders, CLIP,
    wav2vec 2.0 / HuBERT / WavLM); open_clip: an open_clip model name and checkpoint; torchvision: an
    architecture and its state-dict file (image); torchaudio: an architecture and a state-dict file (speech)."""
    path: str | None = None
    """The checkpoint file or model folder."""
    name: str | None = None
    """The model name, where the source needs one (open_clip's ViT-B-32, torchvision's vit_b_16,
    torchaudio's hubert_base)."""


@dataclass(kw_only=True)
class TowerTraining:
    """How a tower starts and trains; every tower config has these fields (keyword-only, after its own)."""

    init: TowerInit = field(default_factory=TowerInit)
    """Pretrained weights to start from (model.<tower>.init.source / .path / .name)."""
    lock: bool = False
    """Freeze the whole tower (LiT): no gradients, no optimiser state, eval mode for dropout and norms."""
    unlocked_layers: int | None = None
    """With lock: the last N blocks (and the head/projection) still train; None or 0: none of them."""
    lr_mult: float = 1.0
    """This tower's learning rate is the optimiser's times this factor."""

    def __post_init__(self) -> None:
        # checkpoints store the sections as plain dicts: `init` comes back as one
        if isinstance(self.init, dict):
            self.init = TowerInit(**self.init)


# Locking ---------------------------------------------------------------------------------------------------------
# Every tower module exposes `blocks` (its Transformer blocks, first to last) and may expose `head` (the modules
# after the blocks: final norm, projection; default: its `proj`). These functions implement `lock`,
# `unlocked_layers` and `lr_mult` for any tower from those two names alone.


def tower_head(tower: nn.Module) -> list[nn.Module]:
    """The modules after a tower's blocks that train with `unlocked_layers` (final norm, projection)."""
    head = getattr(tower, "head", None)
    if head is None:
        head = getattr(tower, "proj", None)
    if head is None:
        return []
    return list(head) if isinstance(head, (list, tuple)) else [head]


def apply_lock(tower: nn.Module, cfg: TowerTraining, name: str) -> None:
    """Freeze `tower` as `cfg` says. A frozen part gets no gradient (so AdamW keeps no state for it), stays in
    eval mode (dropout off, BatchNorm statistics fixed: `keep_locked_in_eval`), and a wholly locked tower runs
    its forward under `torch.no_grad`, which is what makes a LiT step cheaper than an unlocked one."""
    unlocked = cfg.unlocked_layers or 0
    if unlocked < 0:
        raise ValueError(f"model.{name}.unlocked_layers must be >= 0, got {unlocked}")
    if cfg.lr_mult < 0:
        raise ValueError(f"model.{name}.lr_mult must be >= 0, got {cfg.lr_mult}")
    if not cfg.lock:
        if unlocked:
            raise ValueError(
                f"model.{name}.unlocked_layers ({unlocked}) needs model.{name}.lock: true "
                "(it says which blocks of a locked tower still train)"
            )
        return
    tower.requires_grad_(False)
    if not unlocked:
        tower.locked = True  # read by keep_locked_in_eval
        _run_without_grad(tower)
        return
    if not hasattr(type(tower), "blocks"):
        raise ValueError(
            f"model.{name}.unlocked_layers: this {type(tower).__name__} does not list its blocks; lock it whole "
            "(unlocked_layers: 0) or use lr_mult"
        )
    blocks = list(tower.blocks)
    if unlocked > len(blocks):
        raise ValueError(
            f"model.{name}.unlocked_layers ({unlocked}) exceeds the tower's {len(blocks)} blocks"
        )
    trained = blocks[len(blocks) - unlocked :]
    for block in blocks[: len(blocks) - unlocked]:
        block.locked = True
    for module in [*trained, *tower_head(tower)]:
        module.requires_grad_(True)


def keep_locked_in_eval(root: nn.Module) -> None:
    """Put every locked module under `root` back in eval mode (after `root.train()`)."""
    for module in root.modules():
        if getattr(module, "locked", False):
            module.eval()


def _run_without_grad(tower: nn.Module) -> None:
    # hooks rather than a wrapper module: the tower's state-dict keys (and so its checkpoints) stay the same
    state: list[bool] = []

    def enter(module: nn.Module, args: Any) -> None:
        state.append(torch.is_grad_enabled())
        torch.set_grad_enabled(False)

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        torch.set_grad_enabled(state.pop())

    tower.register_forward_pre_hook(enter)
    tower.register_forward_hook(leave, always_call=True)


def tower_param_groups(
    towers: dict[str, tuple[nn.Module, TowerTraining]],
    rest: nn.Module,
    lr: float,
    groups_of: Callable[[nn.Module], list[dict]],
) -> list[dict]:
    """Optimiser groups with each tower's learning rate (`lr` times its `lr_mult`): `groups_of(module)` makes the
    decay / no-decay groups of one module; parameters of `rest` outside the towers (temperature, ...) get `lr`.
    A tower shared by two pairs is counted once; frozen parameters are in no group."""
    groups, seen = [], set()
    for module, cfg in towers.values():
        if id(module) in seen:
            continue
        seen.add(id(module))
        for group in groups_of(module):
            groups.append({**group, "lr": lr * cfg.lr_mult})
    in_towers = {id(p) for module, _ in towers.values() for p in module.parameters()}
    for group in groups_of(rest):
        params = [p for p in group["params"] if id(p) not in in_towers]
        groups.append({**group, "params": params, "lr": lr})
    return [g for g in groups if g["params"]]


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """A state dict from a `.safetensors` file or a `torch.save`d one, read with `weights_only=True`: no pickled
    code ever runs. A file holding a pickled whole model is refused in one line saying what to save instead."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" not in str(err):  # no pickled class refused: not a torch.save file at all
            raise ValueError(
                f"{path} is not a readable torch.save file (not a pickle weights_only can read): give a state "
                "dict written by torch.save or a .safetensors file"
            ) from None
        raise ValueError(
            f"{path} is not a plain state dict (weights_only loading refuses the pickled objects in it, e.g. a "
            "whole nn.Module): save `model.state_dict()` with torch.save, or a .safetensors file, and give that"
        ) from None
    except Exception as err:  # truncated, or not a torch.save file at all (torch raises several kinds)
        raise ValueError(
            f"{path} is not a readable torch.save file ({type(err).__name__}: {str(err).partition(chr(10))[0]}): give "
            "a state dict written by torch.save or a .safetensors file"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a Lightning checkpoint or a {"state_dict": ...} wrapper
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(
            f"{path} holds a {type(state).__name__}, not a state dict of tensors: save `model.state_dict()` "
            "with torch.save and give that file"
        )
    if state and all(k.startswith("module.") for k in state):  # saved from a DDP-wrapped model
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def read_hf_config(folder: str | os.PathLike, what: str) -> dict[str, Any]:
    """The `config.json` of a Hugging Face folder, or a one-line error saying what folder to give."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder} is not a folder: give the Hugging Face {what} folder (save_pretrained)"
        )
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{folder} has no config.json: give a Hugging Face {what} folder as written by save_pretrained "
            "(config.json plus model.safetensors or pytorch_model.bin)"
        )
    return json.loads((folder / "config.json").read_text())


class CheckpointMismatch(ValueError):
    """A checkpoint whose tensors do not fit the named architecture."""


def load_matching_state_dict(
    module: nn.Module,
    state_dict: Mapping[str, Tensor],
    source_path: str,
    arch: str = "the named architecture",
) -> None:
    """Load `state_dict` into `module` only when every tensor fits: otherwise one error naming the first tensor
    whose shape differs (both shapes) and how many keys are missing or unexpected, so a checkpoint of another
    architecture or size is never half-loaded."""
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = next(
        ((k, v.shape, own[k].shape) for k, v in state_dict.items() if k in own and v.shape != own[k].shape),
        None,
    )
    if mismatched or missing or unexpected:
        first = (
            f"first mismatching tensor {mismatched[0]}: {tuple(mismatched[1])} in the checkpoint, "
            f"{tuple(mismatched[2])} in the model; "
            if mismatched
            else ""
        )
        example = (
            f" (e.g. missing {missing[0]})"
            if missing
            else f" (e.g. unexpected {unexpected[0]})"
            if unexpected
            else ""
        )
        raise CheckpointMismatch(
            f"{source_path} does not fit {arch}: {first}{len(missing)} missing and "
            f"{len(unexpected)} unexpected keys{example}"
        )
    module.load_state_dict(state_dict)
