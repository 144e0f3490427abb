"""Write a tiny random Hugging Face model as a GGUF file, as llama.cpp's ``convert_hf_to_gguf.py`` would.

Test fixtures only: what the GGUF conversion is checked against for families without a real GGUF here
(SmolLM2 and Qwen2.5-Coder, real llama.cpp files, cover llama and qwen2). Tensor names come from gguf-py's
``TensorNameMap`` (llama.cpp's own table); the three layout changes llama.cpp makes are applied: llama's
rotary permutation of q/k rows, Gemma's ``norm + 1`` and MoE experts split into gate/up stacks. Config
metadata is transformers' GGUF config table read backwards; the tokenizer is the byte vocabulary of the
tiny models (``tokenizer.ggml.model = gpt2``, no merges).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch

GGUF_ARCH = {"mistral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "gemma3_text": "gemma3"}
CONFIG_TABLE = {"gemma3_text": "gemma3"}  # transformers' GGUF config table key per model_type
GGUF_READABLE = {
    "qwen3": {"head_dim": 128},
    "qwen3_moe": {"head_dim": 128, "moe_intermediate_size": 768},
    "qwen2_moe": {"moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632},
}
"""Config values transformers' GGUF loader cannot read from the metadata (it has no key for them) and so
takes from the family's defaults: a tiny model must use those defaults to round-trip at all. (Real Qwen3 and
Qwen1.5-MoE files only load because their sizes happen to be the defaults.)"""


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` (q/k rows: two contiguous rotary halves → interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _metadata(writer: gguf.GGUFWriter, arch: str, config) -> None:
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    table = GGUF_CONFIG_MAPPING[CONFIG_TABLE.get(config.model_type, config.model_type)]
    for key, attr in table.items():
        value = getattr(config, attr, None) if attr else None
        if isinstance(value, bool):
            writer.add_bool(f"{arch}.{key}", value)
        elif isinstance(value, int):
            writer.add_uint32(f"{arch}.{key}", value)
        elif isinstance(value, float):
            writer.add_float32(f"{arch}.{key}", value)
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_theta")
    if rope is not None and "rope.freq_base" in table:
        writer.add_float32(f"{arch}.rope.freq_base", float(rope))
    writer.add_name(f"tiny-{config.model_type}")
    # the byte vocabulary of tests.conftest.make_tokenizer, GPT-2 style, with <s> and </s> on top
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = [bytes_to_unicode()[b] for b in range(256)] + ["<s>", "</s>"]
    tokens += [f"<extra_{i}>" for i in range(config.vocab_size - len(tokens))]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * 256 + [3] * (len(tokens) - 256))
    writer.add_token_merges([])
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_bos_token_id(256)
    writer.add_eos_token_id(257)
    writer.add_pad_token_id(257)


def _tensors(model: torch.nn.Module, arch: str) -> dict[str, np.ndarray]:
    config = model.config
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_id, config.num_hidden_layers)
    tied = getattr(config, "tie_word_embeddings", False)
    out: dict[str, np.ndarray] = {}
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        w = tensor.float().numpy().copy()
        if hf_name.endswith("experts.gate_up_proj"):  # fused (experts, 2·inter, hidden): gate, up stacks
            gate = names.get_name(hf_name.replace("gate_up_proj", "gate_proj"))
            up = names.get_name(hf_name.replace("gate_up_proj", "up_proj"))
            half = w.shape[1] // 2
            out[f"{gate}.weight"], out[f"{up}.weight"] = w[:, :half], w[:, half:]
            continue
        stem, _, suffix = hf_name.rpartition(".")
        if suffix not in ("weight", "bias"):  # 3-D expert parameters carry no suffix in transformers 5
            stem, suffix = hf_name, "weight"
        name = names.get_name(stem)
        if name is None:
            raise KeyError(f"gguf-py has no name for {hf_name} in {arch}")
        if arch == "llama" and name.endswith(("attn_q", "attn_k")):
            heads = config.num_attention_heads if name.endswith("attn_q") else config.num_key_value_heads
            w = _llama_cpp_permute(w, heads)
        if arch.startswith("gemma") and "norm" in name and suffix == "weight":
            w = w + 1
        if name.endswith("ffn_gate_inp_shexp"):
            w = w.reshape(-1)  # llama.cpp stores the shared-expert gate as a vector
        out[f"{name}.{suffix}"] = w
    return out


def write_gguf(model: torch.nn.Module, path: Path) -> Path:
    """``model`` (a tiny random CausalLM, float32) as an F32 GGUF file at ``path``."""
    arch = GGUF_ARCH.get(model.config.model_type, model.config.model_type)
    writer = gguf.GGUFWriter(str(path), arch)
    _metadata(writer, arch, model.config)
    for name, array in _tensors(model, arch).items():
        writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
