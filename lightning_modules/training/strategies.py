"""Lightning's strategies, set up for this framework's models, so a YAML snippet can choose them.

DDP and DeepSpeed need nothing model-specific: `configs/strategy/ddp.yaml` and `deepspeed.yaml` name Lightning's
own classes. FSDP needs to know its wrap unit; `BlockFSDPStrategy` (FSDP1) and `FSDP2Strategy` (per-parameter
sharding, `fully_shard`) shard at the Transformer block of every tower (the shared encoder's `EncoderBlock`,
torchvision's ViT block, torchaudio's Conformer layer, ResNet's bottleneck, and the entries of any tower's
`blocks` list) and optionally recompute those blocks' activations in the backward pass. `FSDP2Strategy` writes
its sharded checkpoint folders atomically: into a new folder beside the target, swapped into place by rank 0 once
every rank has written its part.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import shutil
import socket
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, TypeVar

import lightning as L
import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor
from torchaudio.models.conformer import ConformerLayer
from torchvision.models.resnet import Bottleneck
from torchvision.models.vision_transformer import EncoderBlock as ViTBlock

from lightning_modules.components.encoder import EncoderBlock
from lightning_modules.training.atomic_files import fsync_folder, pid_is_alive, temporary_name

log = logging.getLogger(__name__)
T = TypeVar("T")


def block_types() -> set[type[nn.Module]]:
    """The repeated block of every tower: FSDP's wrap unit and the unit of activation checkpointing."""
    return {EncoderBlock, ViTBlock, ConformerLayer, Bottleneck}


class BlockFSDPStrategy(FSDPStrategy):
    """Fully sharded data parallel with the towers' blocks as the wrap unit."""

    def __init__(
        self,
        sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD"] = "FULL_SHARD",
        activation_checkpointing: bool = False,
        cpu_offload: bool = False,
        state_dict_type: Literal["full", "sharded"] = "sharded",
        limit_all_gathers: bool = True,
        timeout: timedelta = timedelta(minutes=30),
    ) -> None:
        """
        Args:
            sharding_strategy: FULL_SHARD shards parameters, gradients and optimizer state (ZeRO-3);
                SHARD_GRAD_OP only gradients and optimizer state (ZeRO-2); HYBRID_SHARD shards within a node and
                replicates across nodes.
            activation_checkpointing: recompute each block's activations in the backward pass (less memory,
                about a third more compute).
            cpu_offload: keep parameters and gradients in CPU memory between uses.
            state_dict_type: "sharded" writes one file per rank in a checkpoint folder (fast, scales);
                "full" gathers a single file on rank 0.
            limit_all_gathers: rate-limit prefetching all-gathers so memory stays bounded.
            timeout: collective operations' timeout.
        """
        blocks = block_types()
        super().__init__(
            sharding_strategy=sharding_strategy,
            auto_wrap_policy=blocks,
            activation_checkpointing_policy=blocks if activation_checkpointing else None,
            cpu_offload=cpu_offload,
            state_dict_type=state_dict_type,
            limit_all_gathers=limit_all_gathers,
            timeout=timeout,
        )


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP2 shards one by one, in module order: every block of `block_types()` and every entry of a
    tower's `blocks` list (the pretrained towers name theirs so), none inside another."""
    listed = {
        id(m)
        for module in model.modules()
        if isinstance(blocks := getattr(module, "blocks", None), nn.ModuleList)
        for m in blocks
    }
    kinds = tuple(block_types())
    units: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside:
            continue
        if isinstance(module, kinds) or id(module) in listed:
            units.append(module)
            inside |= {id(m) for m in module.modules()}
    return units


# what Lightning calls on a system: FSDP gathers the root's parameters around these, as around a forward
STEP_METHODS = ("training_step", "validation_step", "test_step", "predict_step")


def tower_units(system: nn.Module) -> list[nn.Module]:
    """The towers a system names (`towers()`), each once: the tri-modal system's two pairs share one text tower."""
    towers = getattr(system, "towers", None)
    if not callable(towers):
        return []
    units: dict[int, nn.Module] = {}
    for module, _ in towers().values():
        units.setdefault(id(module), module)
    return list(units.values())


def apply_fsdp2(
    system: nn.Module,
    mesh: DeviceMesh | None = None,
    param_dtype: torch.dtype | None = torch.bfloat16,
    reduce_dtype: torch.dtype | None = torch.float32,
    activation_checkpointing: bool = False,
    reshard_after_forward: bool = True,
) -> list[nn.Module]:
    """Shard `system` in place with `fully_shard`: each block (`shard_units`) is one unit, each tower
    (`tower_units`) one over what its blocks leave, and the system itself the root over the rest (the
    temperatures, the MLM's embeddings and heads). Returns the units in the order sharded. With
    `activation_checkpointing` each block's forward is recomputed in backward.

    The root's entry points are the step methods Lightning calls (`STEP_METHODS`, those the system defines), not
    every method: `train()` and `eval()` gather nothing. Blocks cast their inputs (activations) to `param_dtype`;
    the root passes batches on as they come, and a tower casts its inputs unless it reads them in float32
    (`float32_inputs`: the log-mel speech tower's waveforms).

    One function for every system: the LightningModules call it from `configure_model` (through
    `CheckpointExtras`) when the trainer's strategy is `FSDP2Strategy`."""

    def shard(module: nn.Module, cast_inputs: bool) -> None:
        policy = MixedPrecisionPolicy(
            param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=cast_inputs
        )
        fully_shard(module, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)

    # fully_shard refuses non-contiguous parameters: a channels-last image tower's convolutions are sharded in the
    # default format (their inputs stay channels-last; values and names are unchanged)
    for param in system.parameters():
        if not param.is_contiguous():
            param.data = param.data.contiguous()
    units = shard_units(system)
    if activation_checkpointing:
        units = [_checkpointed(system, unit) for unit in units]
    for unit in units:
        shard(unit, cast_inputs=True)
    towers = [t for t in tower_units(system) if any(not isinstance(p, DTensor) for p in t.parameters())]
    for tower in towers:
        shard(tower, cast_inputs=not getattr(tower, "float32_inputs", False))
    methods = [name for name in STEP_METHODS if is_overridden(name, system, L.LightningModule)]
    shard(system, cast_inputs=False)
    for name in methods:
        register_fsdp_forward_method(system, name)
    return [*units, *towers, system]


def _checkpointed(system: nn.Module, block: nn.Module) -> nn.Module:
    """Put `block` in a checkpoint wrapper, in its parent's place; the wrapper's state-dict hooks keep the
    parameter names, so checkpoints do not change."""
    for module in system.modules():
        for name, child in module.named_children():
            if child is block:
                wrapped = checkpoint_wrapper(block)
                setattr(module, name, wrapped)
                return wrapped
    return block


DTypeName = Literal["bfloat16", "float16", "float32"]


class FSDP2Strategy(ModelParallelStrategy):
    """Per-parameter fully sharded data parallel (`fully_shard`, FSDP2) over all devices, each tower's blocks the
    unit, through Lightning's `ModelParallelStrategy`. Checkpoints are folders of shards (torch.distributed
    .checkpoint) that resume directly; `python cli.py consolidate` turns one into a single file."""

    def __init__(
        self,
        param_dtype: DTypeName = "bfloat16",
        reduce_dtype: DTypeName = "float32",
        activation_checkpointing: bool = False,
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta = timedelta(minutes=30),
    ) -> None:
        """
        Args:
            param_dtype: the dtype blocks compute in (parameters are gathered in it; the sharded master weights
                and the optimizer state stay float32).
            reduce_dtype: the dtype gradients are reduce-scattered in.
            activation_checkpointing: recompute each block's activations in the backward pass (less memory,
                about a third more compute).
            reshard_after_forward: free the gathered parameters after each block's forward (ZeRO-3); False keeps
                them until the backward (ZeRO-2-like: more memory, one all-gather less).
            save_distributed_checkpoint: a folder of shards, one file per rank (fast, scales); False gathers a
                single file on rank 0.
            process_group_backend: "nccl" on GPUs, "gloo" on CPUs by default.
            timeout: collective operations' timeout.
        """
        super().__init__(
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.param_dtype = getattr(torch, param_dtype)
        self.reduce_dtype = getattr(torch, reduce_dtype)
        self.activation_checkpointing = activation_checkpointing
        self.reshard_after_forward = reshard_after_forward

    def setup_environment(self) -> None:
        # pure data parallelism: one mesh dimension over every process (Lightning's default is tensor parallel)
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        if self._tensor_parallel_size == "auto":
            self._tensor_parallel_size = 1
        super().setup_environment()

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None
    ) -> None:
        """A sharded checkpoint is written into a new folder beside `filepath` (`.<name>.tmp-<host>-<pid>` of
        rank 0), then, once every rank has written its part, rank 0 swaps it into place in one rename: a kill at
        any point leaves the previous checkpoint whole at `filepath`. Single files and object-store paths are
        written as Lightning writes them."""
        if not self._save_distributed_checkpoint or "://" in str(filepath):
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        target = Path(self.broadcast(str(filepath)))
        folder = Path(self.broadcast(str(temporary_name(target))))

        def prepare() -> str | None:
            refused = _not_replaceable(target)
            if refused is None:
                target.parent.mkdir(parents=True, exist_ok=True)
                for path in clean_interrupted_saves(target.parent):
                    log.warning("removed %s, left by a sharded checkpoint write that was killed", path)
            return refused

        refused = self._on_rank_zero(prepare, target)
        if refused is not None:  # on every rank, so none waits in the write's collectives
            raise IsADirectoryError(refused)
        error: BaseException | None = None
        try:
            super().save_checkpoint(checkpoint, folder, storage_options)
            if self.is_global_zero:
                _fsync_file(folder / "meta.pt")  # torch.distributed.checkpoint syncs its own files
                fsync_folder(folder)
        except BaseException as err:  # torch.distributed.checkpoint's CheckpointException is one
            error = err
        if not self.reduce_boolean_decision(error is None, all=True):  # also the barrier before the swap
            if self.is_global_zero:
                shutil.rmtree(folder, ignore_errors=True)
            if error is not None:
                raise error
            raise RuntimeError(f"another rank failed to write its part of {target}; the previous one is kept")

        def swap() -> None:
            try:
                swap_into_place(folder, target)
            except BaseException:  # what is left under the temporary name: the new one, or the previous one
                shutil.rmtree(folder, ignore_errors=True)
                raise

        self._on_rank_zero(swap, target)  # also the barrier after the swap

    def _on_rank_zero(self, step: Callable[[], T], target: Path) -> T:
        """`step`'s result on rank 0, broadcast to every rank; when it raises there, every rank raises one line
        naming `target` and what went wrong (file system steps run on rank 0 alone: a failure there must not
        leave the other ranks waiting in the next collective)."""
        result, failure, cause = None, None, None
        if self.is_global_zero:
            try:
                result = step()
            except Exception as err:
                failure, cause = " ".join(f"{type(err).__name__}: {err}".split()), err
        result, failure = self.broadcast((result, failure))
        if failure is not None:
            raise OSError(f"cannot save the sharded checkpoint {target}: {failure}") from cause
        return result

    def shard(self, system: L.LightningModule) -> None:
        """`apply_fsdp2` with this strategy's settings on its data-parallel mesh; a sharded system is left as is."""
        if any(isinstance(m, FSDPModule) for m in system.modules()):
            return
        apply_fsdp2(
            system,
            self.device_mesh["data_parallel"],
            self.param_dtype,
            self.reduce_dtype,
            self.activation_checkpointing,
            self.reshard_after_forward,
        )


def configure_parallelism(system: L.LightningModule) -> None:
    """What every system's `configure_model` does: shard itself when the trainer's strategy is FSDP2."""
    trainer = system._trainer
    if trainer is not None and isinstance(trainer.strategy, FSDP2Strategy):
        trainer.strategy.shard(system)


# sharded checkpoints written atomically --------------------------------------------------------------------------
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # <fcntl.h>, <linux/fs.h>
# what a sharded checkpoint folder holds: Lightning's meta.pt, torch.distributed.checkpoint's .metadata and shards
_CHECKPOINT_PIECE = re.compile(r"^(meta\.pt|(__\d+)?\.metadata(\.tmp)?|__\d+_\d+\.distcp)$")


def exchange_paths(a: Path, b: Path) -> None:
    """Swap what `a` and `b` name in one step (Linux's renameat2 with RENAME_EXCHANGE); OSError where the system
    or the file system cannot (ENOSYS, EINVAL: NFS and some parallel file systems)."""
    try:
        renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    except (OSError, TypeError):  # no C library to open this way (Windows)
        renameat2 = None
    if renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available", str(a))
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(a), None, str(b))


def _old_name(target: Path) -> Path:
    """Where the previous checkpoint waits while a new one is renamed in, where paths cannot be exchanged."""
    return target.with_name(f".{target.name}.old-{socket.gethostname()}-{os.getpid()}")


def swap_into_place(folder: Path, target: Path) -> None:
    """Put the finished checkpoint `folder` at `target` and delete what was there. Readers of `target` see the
    previous checkpoint or the new one: one rename or one exchange. Where the file system cannot exchange, two
    renames; a kill between them leaves the previous one at `_old_name(target)`, which `clean_interrupted_saves`
    puts back."""
    if not os.path.lexists(target):
        os.rename(folder, target)
        fsync_folder(target.parent)
        return
    try:
        exchange_paths(folder, target)
        previous = folder
    except OSError as err:
        if err.errno not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        previous = _old_name(target)
        os.rename(target, previous)
        try:
            os.rename(folder, target)
        except BaseException:
            os.rename(previous, target)
            raise
    fsync_folder(target.parent)
    _delete(previous)


def _delete(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _not_replaceable(target: Path) -> str | None:
    """Why a new checkpoint may not replace `target`, or None: it may replace nothing, a file or link (a
    checkpoint, as Lightning would), or a folder of nothing but a sharded checkpoint's pieces."""
    if target.is_symlink() or not target.is_dir():
        return None
    other = next((p.name for p in target.iterdir() if not _CHECKPOINT_PIECE.match(p.name)), None)
    if other is None:
        return None
    return (
        f"{target} is a folder that holds more than a sharded checkpoint ({other}): not replaced; give the "
        "checkpoint another name or folder"
    )


def clean_interrupted_saves(folder: Path) -> list[Path]:
    """Deal with what sharded checkpoint writes of this host left in `folder` when they were killed (their
    process is gone): a new checkpoint folder not yet swapped in (`.<name>.tmp-<host>-<pid>`) or a previous one
    being deleted is removed; a previous checkpoint moved aside (`.<name>.old-<host>-<pid>`) goes back to
    `<name>` when nothing took its place, else is removed. Nothing else is touched: `.tmp-` files
    (`AtomicCheckpoints` deals with those), other hosts' leftovers, live writers'. Returns the removed paths."""
    own = re.compile(rf"^\.(.+)\.(tmp|old)-{re.escape(socket.gethostname())}-(\d+)$")
    removed = []
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        match = own.match(path.name)
        if match is None or path.is_symlink() or pid_is_alive(int(match.group(3))):
            continue
        name, kind = match.group(1), match.group(2)
        if kind == "tmp" and not path.is_dir():
            continue
        if kind == "old" and not os.path.lexists(folder / name):
            os.rename(path, folder / name)
            log.warning("%s was being replaced when its writer was killed: put back", folder / name)
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
