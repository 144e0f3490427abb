"""Config classes of romcomp-compressed models: the dense family's config plus a rank map.

A distinct ``model_type`` (``romcomp_<family>``) makes loading the output as a plain dense model fail
loudly instead of silently building dense layers with missing weights. Self-contained on purpose.
"""

from transformers import LlamaConfig, MistralConfig, Qwen2Config


def _romcomp_config(base: type, family: str) -> type:
    """Subclass ``base`` with model_type ``romcomp_<family>`` and a ``romcomp`` dict attribute."""

    def __init__(self, romcomp=None, **kwargs):  # noqa: N807 - becomes a method
        self.romcomp = dict(romcomp or {})
        base.__init__(self, **kwargs)

    attrs = {"model_type": f"romcomp_{family}", "__init__": __init__, "__module__": __name__}
    return type(f"Romcomp{base.__name__}", (base,), attrs)


RomcompLlamaConfig = _romcomp_config(LlamaConfig, "llama")
RomcompMistralConfig = _romcomp_config(MistralConfig, "mistral")
RomcompQwen2Config = _romcomp_config(Qwen2Config, "qwen2")

CONFIGS = {"llama": RomcompLlamaConfig, "mistral": RomcompMistralConfig, "qwen2": RomcompQwen2Config}
