"""romcomp: layer-by-layer reduced-order (low-rank) compression of decoder LLMs on a CPU.

``import romcomp`` stays light: it registers the ``romcomp`` quantization method with transformers (so a
compressed output loads with ``from_pretrained``) and loads the compression pipeline only when
:func:`compress` is first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from romcomp.hf.modeling_romcomp import register as _register  # noqa: E402

_register()  # transformers now loads romcomp outputs (quant_method "romcomp") without trust_remote_code

if TYPE_CHECKING:
    from romcomp.api import CompressResult, compress

__all__ = ["CompressResult", "__version__", "compress"]


def __getattr__(name: str) -> Any:
    """``romcomp.compress`` / ``romcomp.CompressResult`` / ``romcomp.api``: imported on first use."""
    if name in ("compress", "CompressResult", "api"):
        import importlib

        api = importlib.import_module("romcomp.api")
        return api if name == "api" else getattr(api, name)
    raise AttributeError(f"module 'romcomp' has no attribute {name!r}")
