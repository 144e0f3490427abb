"""What a run records about itself: the manifest it resumes from, and the ``quantization_config`` of the
output's config.json (the rank map and the run's settings, for loading and for the reader)."""

from __future__ import annotations

import torch

from romcomp import __version__
from romcomp.compression import distributed
from romcomp.compression.config import RunSpec
from romcomp.compression.memory import MemoryPlan
from romcomp.compression.output import Manifest, args_hash
from romcomp.hf.modeling_romcomp import QUANT_METHOD
from romcomp.model.shell import is_encoder


def new_manifest(spec: RunSpec, ratio: float, mem: MemoryPlan, calib_desc: str, source,
                 ranks: dict[str, int] | None) -> Manifest:  # fmt: skip
    """A fresh manifest for the output of ``ratio`` (``OutputDir.open`` returns the previous one on
    resume: same arguments, including every ratio of the run and the thread count, or a refusal)."""
    threads = torch.get_num_threads()
    args = {**spec.resume_args(threads), "ratio": ratio, "batch_size": mem.batch_size,
            "allocation": spec.allocation_name, "calibration": calib_desc,
            "world_size": distributed.current().size,
            "version": __version__}  # fmt: skip
    return Manifest(
        args=args,
        args_hash=args_hash(args),
        source={"spec": spec.model, "description": source.description, "fingerprint": source.fingerprint},
        calibration=calib_desc,
        ranks=ranks or {},
        threads=threads,
        plan={
            "budget": mem.budget,
            "estimate": mem.estimate,
            "batch_size": mem.batch_size,
            "activations_in_ram": mem.activations_in_ram,
            **({"fallback": spec.fallback} if spec.fallback else {}),
        },
    )


def output_config(
    hf_config, spec: RunSpec, ratio: float, ranks: dict[str, int], calib: str, source: str
) -> dict:
    """config.json of the output: the dense config unchanged (its own ``model_type`` and architectures, so
    tokenizers and tools see the family they know) plus a ``quantization_config`` of ``quant_method``
    ``romcomp`` holding the rank map and the record of the run, and an ``auto_map`` for
    ``trust_remote_code`` loading without romcomp installed."""
    config = hf_config.to_dict()
    for key in ("auto_map", "transformers_version", "_name_or_path"):
        config.pop(key, None)
    config["quantization_config"] = {
        "quant_method": QUANT_METHOD,
        "version": __version__,
        "method": spec.method.name,
        "ratio": ratio,
        "allocation": spec.allocation_name,
        "calibration": calib,
        "fit": spec.fit,
        "calib_stream": spec.calib_stream,
        "sequential": spec.sequential,
        **spec.options,
        "source": source,
        "ranks": ranks,
    }
    if is_encoder(hf_config):
        config["auto_map"] = {"AutoModel": "modeling_romcomp.RomcompModel"}
    else:
        config["auto_map"] = {"AutoModelForCausalLM": "modeling_romcomp.RomcompForCausalLM"}
    return config
