"""romcomp: layer-by-layer reduced-order (low-rank) compression of decoder LLMs on a CPU."""

from __future__ import annotations

__version__ = "0.1.0"


def _register_auto_classes() -> None:
    """Let ``AutoModelForCausalLM.from_pretrained(out)`` work without ``trust_remote_code`` once romcomp
    is imported."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from romcomp.hf.configuration_romcomp import CONFIGS
    from romcomp.hf.modeling_romcomp import MODELS

    for family, config_cls in CONFIGS.items():
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, MODELS[family], exist_ok=True)


_register_auto_classes()

from romcomp.api import CompressResult, compress  # noqa: E402

__all__ = ["CompressResult", "__version__", "compress"]
