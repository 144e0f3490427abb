"""romcomp: layer-by-layer reduced-order (low-rank) compression of decoder LLMs on a CPU."""

from __future__ import annotations

__version__ = "0.1.0"


from romcomp.hf.modeling_romcomp import register as _register  # noqa: E402

_register()  # transformers now loads romcomp outputs (quant_method "romcomp") without trust_remote_code

from romcomp.api import CompressResult, compress  # noqa: E402

__all__ = ["CompressResult", "__version__", "compress"]
