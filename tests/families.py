"""Tiny random models of every family romcomp is checked on (transformers builds them from a config).

Each config keeps the family's peculiarities switched on at a tiny size: sliding-window layers mixed with
full-attention ones, q/k norms, soft-capping, fused projections, biases, ``head_dim`` ≠ hidden/heads,
experts. Used by ``tests/test_families.py`` and ``tools/bench_families.py`` (the README table).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, VOCAB, CONTEXT = 64, 128, 4, 2, 24, 258, 256
SLIDING = 8  # shorter than the calibration windows, so a wrong mask changes the outputs

_COMMON: dict[str, Any] = dict(
    hidden_size=HIDDEN, intermediate_size=INTER, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
    vocab_size=VOCAB, max_position_embeddings=CONTEXT, bos_token_id=256, eos_token_id=257, pad_token_id=257,
)  # fmt: skip

FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": SLIDING, "head_dim": HEAD_DIM}),
    "qwen2": ("Qwen2Config", {"use_sliding_window": True, "sliding_window": SLIDING, "max_window_layers": 1}),
    "qwen3": (
        "Qwen3Config",
        {"head_dim": HEAD_DIM, "use_sliding_window": True, "sliding_window": SLIDING, "max_window_layers": 1},
    ),  # fmt: skip
    "gemma2": (
        "Gemma2Config",
        {"head_dim": HEAD_DIM, "sliding_window": SLIDING, "tie_word_embeddings": True},
    ),
    "gemma3_text": (
        "Gemma3TextConfig",
        {
            "head_dim": HEAD_DIM,
            "sliding_window": SLIDING,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
        },
    ),  # fmt: skip
    "phi3": ("Phi3Config", {"sliding_window": SLIDING}),
    "olmo2": ("Olmo2Config", {}),
    "granite": (
        "GraniteConfig",
        {
            "embedding_multiplier": 2.0,
            "residual_multiplier": 0.5,
            "attention_multiplier": 0.2,
            "logits_scaling": 4.0,
        },
    ),  # fmt: skip
    "starcoder2": ("Starcoder2Config", {"sliding_window": SLIDING, "use_bias": True}),
    "stablelm": ("StableLmConfig", {"partial_rotary_factor": 0.5, "use_qkv_bias": True}),
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 48,
            "shared_expert_intermediate_size": 96,
        },
    ),  # fmt: skip
    "qwen3_moe": (
        "Qwen3MoeConfig",
        {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 48, "head_dim": HEAD_DIM},
    ),  # fmt: skip
    "olmoe": ("OlmoeConfig", {"num_experts": 4, "num_experts_per_tok": 2}),
    "gpt_oss": (  # experts stored transposed (experts × in × out), with biases and a clamped SwiGLU gate
        "GptOssConfig",
        {
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "head_dim": HEAD_DIM,
            "sliding_window": SLIDING,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
        },
    ),  # fmt: skip
}


def tiny_config(family: str, layers: int = 3):
    import transformers

    name, extra = FAMILIES[family]
    return getattr(transformers, name)(**{**_COMMON, "num_hidden_layers": layers, **extra})


def make_family_model(path: Path, family: str, layers: int = 3, seed: int = 0) -> Path:
    """A random tiny ``family`` model saved as sharded safetensors with a byte tokenizer."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import save_random

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, layers), dtype=torch.float32)
    return save_random(model, path, max_shard_size="150KB")


def make_bert(path: Path, seed: int = 0) -> Path:
    """A random tiny BERT encoder (``BertModel``, as sentence-transformers ship it), byte tokenizer."""
    from transformers import BertConfig, BertModel

    from tests.conftest import save_random

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=3, num_attention_heads=HEADS,
                        intermediate_size=INTER, max_position_embeddings=128, pad_token_id=257)  # fmt: skip
    return save_random(BertModel(config), path)


def tiny_causal_lm(kind: str, config: dict) -> torch.nn.Module:
    """A random Llama, Gemma 2 (logit soft-capping after the head) or Granite (logits scaled by the head)
    causal LM of ``config``'s sizes, weights large enough that its logits are far from uniform."""
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        GraniteConfig,
        GraniteForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(0)
    if kind == "gemma2":
        model = Gemma2ForCausalLM(Gemma2Config(**config, head_dim=16, final_logit_softcapping=2.0))
    elif kind == "granite":
        model = GraniteForCausalLM(GraniteConfig(**config, logits_scaling=4.0))
    else:
        model = LlamaForCausalLM(LlamaConfig(**config))
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0, 0.2)
    return model.eval()
