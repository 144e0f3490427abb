"""Architecture knowledge as data: one spec per model family, looked up by ``config.model_type``.

The engine never copies a transformers ``forward``. It only needs to know where the decoder blocks live,
which ``nn.Linear`` leaves inside a block share an input (so one covariance serves the whole group),
and which top-level tensors stay dense. Adding a family is adding one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass

from romcomp.errors import BadInputError

_LLAMA_GROUPS: tuple[tuple[str, ...], ...] = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


@dataclass(frozen=True)
class ArchSpec:
    """Where things are in one family's module tree."""

    family: str
    blocks: str  # dotted path of the ModuleList of decoder blocks
    groups: tuple[tuple[str, ...], ...]  # linears (relative to a block) grouped by shared input
    # residual sublayers as indices into ``groups``; the last group's one linear writes into the residual
    # stream (attention: q/k/v, o; MLP: gate/up, down). Used to weigh truncation error for allocation.
    sublayers: tuple[tuple[int, ...], ...] = ((0, 1), (2, 3))
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    rotary: str = "model.rotary_emb"
    lm_head: str = "lm_head"

    @property
    def linears(self) -> tuple[str, ...]:
        """All compressible linears of a block, in forward order."""
        return tuple(name for group in self.groups for name in group)

    def block_prefix(self, index: int) -> str:
        """State-dict prefix of block ``index`` (e.g. ``model.layers.3.``)."""
        return f"{self.blocks}.{index}."


ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec("llama", "model.layers", _LLAMA_GROUPS),
    "mistral": ArchSpec("mistral", "model.layers", _LLAMA_GROUPS),
    "qwen2": ArchSpec("qwen2", "model.layers", _LLAMA_GROUPS),
}


def arch_for(model_type: str) -> ArchSpec:
    """The spec for ``model_type`` or a clear error naming the supported families."""
    spec = ARCHS.get(model_type)
    if spec is None:
        raise BadInputError(f"unsupported architecture '{model_type}'; supported: {', '.join(sorted(ARCHS))}")
    return spec
