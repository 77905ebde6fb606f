"""Lightning's strategies, set up for this framework's models, so a YAML snippet can choose them.

DDP and DeepSpeed need nothing model-specific: `configs/strategy/ddp.yaml` and `deepspeed.yaml` name Lightning's
own classes. FSDP needs to know its wrap unit; `BlockFSDPStrategy` (FSDP1) and `FSDP2Strategy` (per-parameter
sharding, `fully_shard`) shard at the Transformer block of every tower (the shared encoder's `EncoderBlock`,
torchvision's ViT block, torchaudio's Conformer layer, ResNet's bottleneck, and the entries of any tower's
`blocks` list) and optionally recompute those blocks' activations in the backward pass.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Literal

import lightning as L
import torch
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
