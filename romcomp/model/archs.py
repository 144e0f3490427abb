"""What the engine knows about a model's layout: found by :mod:`romcomp.model.discovery`, not a family table.

The engine never copies a transformers ``forward``. It only needs to know where the blocks live, which
``nn.Linear`` leaves inside a block share an input (so one covariance serves the whole group), which
module runs the embeddings (``base``) and which top-level module is the output head.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ArchSpec:
    """Where things are in one model's module tree."""

    blocks: str  # dotted path of the ModuleList of blocks
    groups: tuple[
        tuple[str, ...], ...
    ]  # linears (relative to a block) grouped by shared input, in call order
    # residual sublayers as indices into ``groups``; each ends with the one linear that writes into the
    # residual stream (attention: q/k/v, o; MLP: gate/up, down). Used to weigh truncation error.
    sublayers: tuple[tuple[int, ...], ...] = ((0, 1), (2, 3))
    base: str = "model"  # the module that takes ``input_ids`` and runs the embeddings, then the blocks
    lm_head: str | None = "lm_head"  # the output head (not needed before block 0); None for encoders
    # fused 3-D expert projections (relative to a block, call order: ``mlp.experts.gate_up_proj``, then
    # ``mlp.experts.down_proj``): one matrix per expert, factored expert by expert after the linears
    experts: tuple[str, ...] = ()

    @property
    def compressible(self) -> tuple[str, ...]:
        """Everything a rank map may name, relative to a block: the linears, then the expert projections."""
        return self.linears + self.experts

    @property
    def linears(self) -> tuple[str, ...]:
        """All compressible linears of a block, in forward order."""
        return tuple(name for group in self.groups for name in group)

    def block_prefix(self, index: int) -> str:
        """State-dict prefix of block ``index`` (e.g. ``model.layers.3.``)."""
        return f"{self.blocks}.{index}."

    def block_index(self, name: str) -> int:
        """The block a module of a block belongs to (``model.layers.3.mlp.up_proj`` → 3)."""
        return int(name[len(self.blocks) + 1 :].split(".")[0])
