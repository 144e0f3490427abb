"""Modeling code of romcomp-compressed models: the dense family's model with low-rank linear leaves.

The transformers ``forward`` is reused untouched; only the ``nn.Linear`` leaves named in the config's
rank map are swapped for ``LowRankLinear`` (``up(down(x))``). Self-contained on purpose.
"""

import torch
from torch import nn
from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM

from .configuration_romcomp import RomcompLlamaConfig, RomcompMistralConfig, RomcompQwen2Config


class LowRankLinear(nn.Module):
    """``y = up(down(x))``: a k×d_in projection followed by a d_out×k expansion (bias on ``up``)."""

    def __init__(self, in_features, out_features, rank, bias=False, dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.up = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def swap_linear(root: nn.Module, name: str, rank: int) -> LowRankLinear:
    """Replace the ``nn.Linear`` at dotted ``name`` under ``root`` by an (uninitialized) low-rank pair."""
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = getattr(parent, leaf)
    new = LowRankLinear(
        old.in_features,
        old.out_features,
        rank,
        bias=old.bias is not None,
        dtype=old.weight.dtype,
        device=old.weight.device,
    )
    setattr(parent, leaf, new)
    return new


def apply_rank_map(model: nn.Module, ranks: dict) -> None:
    """Swap every linear named in ``ranks`` (``{"model.layers.0.self_attn.q_proj": 96, ...}``)."""
    for name, rank in ranks.items():
        swap_linear(model, name, int(rank))


def _romcomp_model(base: type, config_class: type) -> type:
    def __init__(self, config):  # noqa: N807 - becomes a method
        base.__init__(self, config)
        apply_rank_map(self, config.romcomp.get("ranks", {}))

    attrs = {"config_class": config_class, "__init__": __init__, "__module__": __name__}
    return type(f"Romcomp{base.__name__}", (base,), attrs)


RomcompLlamaForCausalLM = _romcomp_model(LlamaForCausalLM, RomcompLlamaConfig)
RomcompMistralForCausalLM = _romcomp_model(MistralForCausalLM, RomcompMistralConfig)
RomcompQwen2ForCausalLM = _romcomp_model(Qwen2ForCausalLM, RomcompQwen2Config)

MODELS = {
    "llama": RomcompLlamaForCausalLM,
    "mistral": RomcompMistralForCausalLM,
    "qwen2": RomcompQwen2ForCausalLM,
}
