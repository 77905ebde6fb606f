"""Lightning's strategies, set up for this framework's models, so a YAML snippet can choose them.

DDP and DeepSpeed need nothing model-specific: `configs/strategy/ddp.yaml` and `deepspeed.yaml` name Lightning's
own classes. FSDP needs to know its wrap unit; `BlockFSDPStrategy` shards at the Transformer block of every
tower (the shared encoder's `EncoderBlock`, torchvision's ViT block, torchaudio's Conformer layer, ResNet's
bottleneck) and optionally recomputes those blocks' activations in the backward pass.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Literal

from lightning.pytorch.strategies import FSDPStrategy
from torch import nn
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
