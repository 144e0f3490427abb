"""Loading romcomp outputs: the family's own transformers classes with low-rank linear leaves.

An output's ``config.json`` is the dense model's (same ``model_type``, same architectures, so the
tokenizer and every tool that reads the config see the family they know) plus a ``quantization_config``
with ``quant_method: "romcomp"`` carrying the rank map. transformers hands such a config to the quantizer
registered under that name, which swaps each named ``nn.Linear`` for a :class:`LowRankLinear` on the meta
device before the weights load; the family's ``forward`` runs untouched. Mixture-of-experts layers, which
transformers 5 stores as fused 3-D parameters (``experts.gate_up_proj``: experts × out × in), get a
:class:`LowRankExperts` per named projection and run through the experts implementation registered here as
``"romcomp"`` (transformers' own hook for swapping how an experts module computes).

The quantizer is registered when this module is imported: by ``import romcomp``, or by transformers itself
with ``trust_remote_code=True`` (``auto_map`` points at :class:`RomcompForCausalLM`, which only forwards to
the family's class). Self-contained on purpose (torch + transformers only): transformers copies this file
out of the output directory and imports it without romcomp installed.
"""

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

QUANT_METHOD = "romcomp"


class LowRankLinear(nn.Module):
    """``y = up(down(x))``: a k×d_in projection followed by a d_out×k expansion (bias on ``up``)."""

    def __init__(self, in_features, out_features, rank, bias=False, dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.up = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down, up = self.down, self.up
        if _plain(down) and _plain(up):  # the same two products without two module calls' overhead
            return F.linear(F.linear(x, down.weight), up.weight, up.bias)
        return up(down(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def _plain(m: nn.Module) -> bool:
    """Whether calling ``m`` is exactly ``F.linear`` with its parameters: a plain ``nn.Linear`` with no
    hooks and no patched ``forward`` (accelerate's offloading, quantizers and observers keep the module
    call). Decoding one token calls every pair once; the module calls cost ~7 µs a pair here, ~1.5 ms a
    token over SmolLM2-135M's 210 pairs."""
    return (
        type(m) is nn.Linear
        and not (m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__)
        and not (nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks)
    )


def swap_linear(root: nn.Module, name: str, rank: int) -> LowRankLinear:
    """Replace the ``nn.Linear`` at dotted ``name`` under ``root`` by an (uninitialized) low-rank pair."""
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = getattr(parent, leaf)
    if not isinstance(old, nn.Linear):
        raise ValueError(f"romcomp rank map names {name}, which is a {type(old).__name__}, not an nn.Linear")
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


class LowRankExperts(nn.Module):
    """One fused projection of every expert, factored: ``W_e ≈ up[e] @ down[e]`` with ``down`` of shape
    (experts, k, d_in) and ``up`` (experts, d_out, k), whatever the dense layout (``transposed``: the family
    stores (experts, d_in, d_out)). Indexing gives dense expert matrices in the family's own layout, so
    transformers' ``eager`` and ``batched_mm`` experts still run (slowly); ``"romcomp"`` uses the factors."""

    def __init__(
        self, num_experts, in_features, out_features, rank, transposed=False, dtype=None, device=None
    ):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.transposed = transposed
        self.down = nn.Parameter(torch.empty(num_experts, rank, in_features, dtype=dtype, device=device))
        self.up = nn.Parameter(torch.empty(num_experts, out_features, rank, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        return F.linear(F.linear(x, self.down[expert]), self.up[expert])

    def __getitem__(self, index: Any) -> torch.Tensor:
        dense = self.up[index] @ self.down[index]
        return dense.transpose(-1, -2) if self.transposed else dense

    def extra_repr(self) -> str:
        n, shape = self.down.shape[0], f"in_features={self.in_features}, out_features={self.out_features}"
        return f"experts={n}, {shape}, rank={self.rank}"


def is_fused_experts(param: Any) -> bool:
    """A 3-D parameter: one matrix per expert (transformers 5's fused experts)."""
    return isinstance(param, nn.Parameter) and param.dim() == 3


def low_rank_experts(root: nn.Module, name: str, rank: int) -> LowRankExperts:
    """Zeroed factors for the fused 3-D parameter at dotted ``name`` (``...experts.gate_up_proj``), in its
    dtype and layout, not yet swapped in."""
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name)
    old = getattr(parent, leaf)
    transposed = bool(getattr(parent, "is_transposed", False))
    n, rows, cols = old.shape
    d_in, d_out = (rows, cols) if transposed else (cols, rows)
    new = LowRankExperts(n, d_in, d_out, rank, transposed, dtype=old.dtype, device=old.device)
    new.down.data.zero_()
    new.up.data.zero_()
    return new


def swap_experts(root: nn.Module, name: str, rank: int, new: LowRankExperts | None = None) -> LowRankExperts:
    """Replace the fused 3-D parameter at dotted ``name`` by factors (``new``, or zeroed ones of ``rank``)."""
    new = low_rank_experts(root, name, rank) if new is None else new
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name)
    delattr(parent, leaf)
    setattr(parent, leaf, new)
    return new


def _project(experts: nn.Module, name: str, index: int, x: torch.Tensor, observe: Any) -> torch.Tensor:
    """Expert ``index``'s projection ``name`` of ``x`` (factored or dense, with the family's bias)."""
    weight = getattr(experts, name)
    if isinstance(weight, LowRankExperts):
        y = weight(x, index)
    else:
        y = x @ weight[index] if experts.is_transposed else F.linear(x, weight[index])
    if experts.has_bias:
        y = y + getattr(experts, f"{name}_bias")[index]
    if observe is not None:
        observe(name, index, x, y)
    return y


def romcomp_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The experts of a transformers 5 MoE layer, one routed expert at a time (the family's gate
    activation, bias and post-expert norm as its flags say), dense or factored per projection. A callable
    ``romcomp_observer`` attribute sees every projection's input and output (romcomp's calibration)."""
    observe = getattr(self, "romcomp_observer", None)
    final = torch.zeros_like(hidden_states)
    first = "gate_up_proj" if self.has_gate else "up_proj"
    with torch.no_grad():
        hit = torch.bincount(top_k_index.reshape(-1), minlength=self.num_experts)[: self.num_experts]
    for index in hit.nonzero().flatten().tolist():
        token, slot = torch.where(top_k_index == index)
        h = _project(self, first, index, hidden_states[token], observe)
        h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
        h = _project(self, "down_proj", index, h, observe)
        if self.has_post_expert_norm:
            h = self.post_expert_norm(h)
        final.index_add_(0, token, (h * top_k_weights[token, slot, None]).to(final.dtype))
    return final


ALL_EXPERTS_FUNCTIONS.register(QUANT_METHOD, romcomp_experts_forward)


def apply_rank_map(model: nn.Module, ranks: dict) -> None:
    """Swap every linear or fused experts projection named in ``ranks``
    (``{"model.layers.0.self_attn.q_proj": 96, "model.layers.0.mlp.experts.down_proj": 40, ...}``); with
    experts among them, the model's experts implementation becomes ``"romcomp"``."""
    experts = False
    for name, rank in ranks.items():
        parent_name, _, leaf = name.rpartition(".")
        if is_fused_experts(getattr(model.get_submodule(parent_name), leaf, None)):
            swap_experts(model, name, int(rank))
            experts = True
        else:
            swap_linear(model, name, int(rank))
    if experts:
        model.set_experts_implementation(QUANT_METHOD)


class RomcompConfig(QuantizationConfigMixin):
    """``quantization_config`` of an output: the rank map plus the record of how it was made."""

    def __init__(self, ranks: dict | None = None, **record: Any) -> None:
        self.quant_method = QUANT_METHOD
        self.ranks = {str(k): int(v) for k, v in (ranks or {}).items()}
        record.pop("quant_method", None)
        for key, value in record.items():
            setattr(self, key, value)

    def to_dict(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if not key.startswith("_")}


class RomcompQuantizer(HfQuantizer):
    """Builds the low-rank leaves before the weights load; the weights themselves load unchanged."""

    requires_calibration = False

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        apply_rank_map(model, self.quantization_config.ranks)
        return model

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True


def register() -> None:
    """Make ``quant_method: romcomp`` known to transformers (idempotent: romcomp and a copy of this file
    loaded as remote code may both call it)."""
    AUTO_QUANTIZATION_CONFIG_MAPPING.setdefault(QUANT_METHOD, RomcompConfig)
    AUTO_QUANTIZER_MAPPING.setdefault(QUANT_METHOD, RomcompQuantizer)


register()


class _FamilyDispatch:
    """The ``auto_map`` target: forwards to the family's own class (found from the config) once the
    quantizer is registered, so the loaded model is e.g. a ``LlamaForCausalLM`` with low-rank leaves."""

    auto_class = "AutoModelForCausalLM"

    @classmethod
    def _family_class(cls, config: Any) -> type:
        import transformers

        mapping = getattr(transformers, cls.auto_class)._model_mapping
        if type(config) in mapping:
            return mapping[type(config)]
        for name in getattr(config, "architectures", None) or []:
            if hasattr(transformers, name):
                return getattr(transformers, name)
        raise ValueError(f"no {cls.auto_class} class for model type {config.model_type}")

    @classmethod
    def from_pretrained(cls, path: Any, *args: Any, config: Any = None, **kwargs: Any) -> nn.Module:
        if config is None:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(path)
        return cls._family_class(config).from_pretrained(path, *args, config=config, **kwargs)

    @classmethod
    def from_config(cls, config: Any, **kwargs: Any) -> nn.Module:
        return cls._family_class(config)._from_config(config, **kwargs)

    _from_config = from_config

    @classmethod
    def register_for_auto_class(cls, auto_class: Any = None) -> None:
        """transformers calls this on remote classes; the family's class is registered already."""


class RomcompForCausalLM(_FamilyDispatch):
    auto_class = "AutoModelForCausalLM"


class RomcompModel(_FamilyDispatch):
    auto_class = "AutoModel"
