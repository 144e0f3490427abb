"""The meta-device model shell: the whole architecture without weights, and the Auto class a checkpoint
loads with. Blocks are materialized one at a time into it (:mod:`romcomp.compression.blocks`)."""

from __future__ import annotations

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM

from romcomp.hf.modeling_romcomp import QUANT_METHOD
from romcomp.model.discovery import is_experts_module


def identity_block(hidden_states=None, *args, **kwargs):
    """A block's forward that hands its hidden states on unchanged (captures and the gradient head)."""
    return hidden_states if hidden_states is not None else args[0]


def is_encoder(hf_config) -> bool:
    """A checkpoint of a bare (encoder) model such as ``BertModel``, loaded with ``AutoModel``, rather
    than a causal LM: decided by the architectures the checkpoint declares."""
    archs = getattr(hf_config, "architectures", None) or []
    return bool(archs) and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


def auto_class(hf_config) -> type:
    """The transformers Auto class a checkpoint loads with: ``AutoModel`` for an encoder, else
    ``AutoModelForCausalLM``."""
    return AutoModel if is_encoder(hf_config) else AutoModelForCausalLM


def build_shell(hf_config) -> nn.Module:
    """The whole model on the meta device (no memory), float32, in eval mode, with no KV cache; MoE
    experts run through romcomp's experts implementation (one routed expert at a time)."""
    auto = auto_class(hf_config)
    with init_empty_weights():
        model = auto.from_config(hf_config, dtype=torch.float32)
    if any(is_experts_module(m) for m in model.modules()):
        model.set_experts_implementation(QUANT_METHOD)  # runs factored experts, feeds their statistics
    model.eval()
    model.config.use_cache = False
    return model
