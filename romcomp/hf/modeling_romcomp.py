"""Loading romcomp outputs: the family's own transformers classes with low-rank linear leaves.

An output's ``config.json`` is the dense model's (same ``model_type``, same architectures, so the
tokenizer and every tool that reads the config see the family they know) plus a ``quantization_config``
with ``quant_method: "romcomp"`` carrying the rank map. transformers hands such a config to the quantizer
registered under that name, which swaps each named ``nn.Linear`` for a :class:`LowRankLinear` on the meta
device before the weights load; the family's ``forward`` runs untouched.

The quantizer is registered when this module is imported: by ``import romcomp``, or by transformers itself
with ``trust_remote_code=True`` (``auto_map`` points at :class:`RomcompForCausalLM`, which only forwards to
the family's class). Self-contained on purpose (torch + transformers only): transformers copies this file
out of the output directory and imports it without romcomp installed.
"""

from typing import Any

import torch
from torch import nn
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
        return self.up(self.down(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


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


def apply_rank_map(model: nn.Module, ranks: dict) -> None:
    """Swap every linear named in ``ranks`` (``{"model.layers.0.self_attn.q_proj": 96, ...}``)."""
    for name, rank in ranks.items():
        swap_linear(model, name, int(rank))


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
