"""Everything cheap a streamed run needs, checked before any expensive work: the resolved source, the
meta shell and lazy checkpoint, the discovered architecture, the shapes, the memory plan, the calibration."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import psutil
import torch
from threadpoolctl import threadpool_limits
from transformers import AutoConfig, AutoTokenizer

from romcomp.compression import distributed
from romcomp.compression.blocks import narrower_at_output, outputs_narrower
from romcomp.compression.config import RunSpec
from romcomp.compression.experts import projection_shape
from romcomp.compression.memory import MemoryPlan, ModelDims, PlanRefused, fmt_bytes, plan
from romcomp.compression.ranks import LinearShape
from romcomp.errors import BadInputError
from romcomp.methods.registry import methods_with
from romcomp.model.archs import ArchSpec
from romcomp.model.checkpoint import LazyCheckpoint
from romcomp.model.discovery import discover, text_config
from romcomp.model.layout import as_model_names
from romcomp.model.shell import build_shell, is_encoder

DimsFor = Callable[[bool], ModelDims]
"""The model's sizes for the plan, by whether the error-aware fit pairs narrow linears' outputs."""

GRADIENT_COPIES = {None: 0, "fisher": 1, "full": 2}
"""What the memory plan holds for a method's gradient pass, in weight-sized accumulators per linear."""


@dataclass
class Prepared:
    """A run ready to stream: ``spec`` with its calibration shape filled in for this model."""

    spec: RunSpec
    source: Any
    hf_config: Any
    shell: torch.nn.Module
    ckpt: LazyCheckpoint
    arch: ArchSpec
    n_blocks: int
    shapes: list[LinearShape]
    mem: MemoryPlan
    windows: torch.Tensor
    calib_desc: str
    tied: bool


def prepare(spec: RunSpec, streams: int = 1) -> Prepared:
    """Resolve, verify and plan a run of ``spec`` (compression or analysis) with ``streams`` activation
    streams; a bad input is refused here, before calibration."""
    from calib import calibration_tokens_description, calibration_windows, load_calibration
    from romcomp.model.sources import resolve_model

    calib = load_calibration(spec.calib, spec.data_dir)
    source = resolve_model(spec.model)
    hf_config = AutoConfig.from_pretrained(source.path)
    spec = spec.with_calibration(is_encoder(hf_config))
    max_pos = getattr(text_config(hf_config), "max_position_embeddings", None)
    if max_pos and spec.seq_len > max_pos:
        raise BadInputError(f"--seq-len {spec.seq_len} exceeds the model's context of {max_pos} tokens")
    shell = build_shell(hf_config)
    ckpt = as_model_names(LazyCheckpoint(source.path), shell)
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    ckpt.verify(
        {n: tuple(t.shape) for n, t in shell.state_dict().items()}, {"lm_head.weight"} if tied else set()
    )
    arch = discover(shell, hf_config, ckpt)
    _check_supported(spec, arch)
    distributed.check_supported(spec, arch)
    n_blocks = text_config(hf_config).num_hidden_layers
    shapes = block_shapes(shell, arch, n_blocks)
    spec, mem = plan_or_fall_back(
        spec, lambda narrow: model_dims(hf_config, arch, shell, spec.method.decompose_outputs is not None,
                                        narrow, spec.compute_dtype == "float32"), streams
    )  # fmt: skip
    if spec.threads:
        torch.set_num_threads(spec.threads)
        threadpool_limits(spec.threads)  # scipy's BLAS/LAPACK (syrk, eigh) has its own pool
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    windows = calibration_windows(tokenizer, calib, spec.n_samples, spec.seq_len, spec.seed)
    calib_desc = calibration_tokens_description(calib, spec.n_samples, spec.seq_len, spec.seed)
    return Prepared(
        spec, source, hf_config, shell, ckpt, arch, n_blocks, shapes, mem, windows, calib_desc, tied
    )


def plan_or_fall_back(spec: RunSpec, dims: DimsFor, streams: int) -> tuple[RunSpec, MemoryPlan]:
    """The memory plan of ``spec``. When the method's default error-aware fit does not fit the cap, the
    run steps down rather than refusing, and says why in ``spec.fallback``: first the error-aware fit
    with narrow linears (``down_proj``) fitted from paired *outputs* (no d_in² regression moments), then
    the local fit (no dense stream). A fit the user named is planned as given (refused if it does not
    fit). ``dims(narrow_outputs)`` gives the model's sizes for either error-aware variant."""
    budget = spec.budget or default_budget()
    grads = GRADIENT_COPIES[spec.method.gradients]

    share = distributed.current().largest_shard  # each rank holds its shard of the windows

    def planned(s: RunSpec, n_streams: int) -> MemoryPlan:
        return plan(dims(s.narrow_outputs), share(s.n_samples), s.seq_len, budget, n_streams,
                    s.fit == "error-aware", s.sequential, grads, s.prepass_samples is not None)  # fmt: skip

    try:
        return spec, planned(spec, streams)
    except PlanRefused as refused:
        if spec.fit_chosen or spec.fit != "error-aware":
            raise
        first = refused
    needed, cap = fmt_bytes(first.needed), fmt_bytes(budget)
    why = f"the error-aware fit needs about {needed}, more than --max-ram {cap}: "
    steps = []
    if spec.method.decompose_cross_outputs is not None:
        steps.append(
            (replace(spec, narrow_outputs=True), streams, "narrow linears fitted from their outputs")
        )
    if "local" in spec.method.fits:
        steps.append((replace(spec, fit="local"), streams - 1, "every linear fitted locally"))
    for step, n_streams, what in steps:
        try:
            mem = planned(step, n_streams)
        except PlanRefused as refused:
            first = refused  # the leanest step's refusal names the smallest budget that would work
            continue
        return replace(step, fallback=why + what), mem
    raise first


def _check_supported(spec: RunSpec, arch: ArchSpec) -> None:
    """A model with fused MoE experts needs a method (and allocation) that can factor them."""
    if not arch.experts:
        return
    if not spec.method.experts:
        able = ", ".join(methods_with(lambda m: m.experts))
        raise BadInputError(
            f"--method {spec.method.name} cannot factor fused MoE experts, which this model has "
            f"(romcomp streams gradients for nn.Linear leaves only); use one of: {able}"
        )
    if spec.allocation == "asvd" and spec.ranks is None:
        raise BadInputError(
            "--allocation asvd measures nn.Linear leaves only; this model has fused MoE experts"
        )


def block_shapes(model: torch.nn.Module, arch: ArchSpec, n_blocks: int) -> list[LinearShape]:
    """Every compressible linear of every block, read from the meta shell (no weights needed)."""
    shapes = []
    layers = model.get_submodule(arch.blocks)
    for i in range(n_blocks):
        prefix = arch.block_prefix(i)
        for name in arch.linears:
            lin = layers[i].get_submodule(name)
            shapes.append(LinearShape(prefix + name, lin.in_features, lin.out_features, lin.bias is not None))
        for name in arch.experts:
            n, d_in, d_out, bias = projection_shape(layers[i], name)
            shapes.append(LinearShape(prefix + name, d_in, d_out, bias, count=n))
    return shapes


def unfactorized_weights(model: torch.nn.Module, arch: ArchSpec) -> tuple[str, ...]:
    """Matrix-shaped block weights neither in ``nn.Linear`` leaves nor among the expert projections
    romcomp factors (3-D experts of a module transformers' experts interface does not drive): dense."""
    block = model.get_submodule(arch.blocks)[0]
    linear = {f"{n}.weight" for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    linear |= set(arch.experts)
    return tuple(n for n, p in block.named_parameters() if p.dim() >= 2 and n not in linear)


def model_dims(hf_config, arch: ArchSpec, model: torch.nn.Module, output_stats: bool,
               cross_outputs: bool = False, dense_outputs: bool = False) -> ModelDims:  # fmt: skip
    """The sizes the memory plan needs; ``output_stats`` / ``cross_outputs``: the method accumulates
    narrow outputs instead of wide inputs for one-linear groups in the local / error-aware fit (as
    :meth:`romcomp.compression.fit.FitContext.by_output` decides); ``dense_outputs``: otherwise the
    error-aware fit pairs their dense outputs with the compressed inputs (``FitContext.dense_outputs``)."""
    block = model.get_submodule(arch.blocks)[0]
    lins = [block.get_submodule(n) for n in arch.linears]
    covs, paired, dense, regressed = [], [], [], []
    for group in arch.groups:
        first = block.get_submodule(group[0])
        narrow = len(group) == 1 and narrower_at_output(first)
        covs.append(first.out_features if narrow and output_stats else first.in_features)
        paired.append(first.out_features if narrow and cross_outputs else first.in_features)
        dense.append(first.out_features if narrow and (cross_outputs or dense_outputs) else paired[-1])
        if not (narrow and cross_outputs):
            regressed += [block.get_submodule(n) for n in group]
    experts = [projection_shape(block, n) for n in arch.experts]
    expert_covs = []
    for n, d_in, d_out, bias in experts:
        narrow = output_stats and outputs_narrower(d_in, d_out, bias)
        expert_covs += [d_out if narrow else d_in] * n  # every expert's moment, held until its stage fits
    cfg = text_config(hf_config)
    return ModelDims(
        hidden=cfg.hidden_size,
        intermediate=getattr(cfg, "intermediate_size", None) or 4 * cfg.hidden_size,
        heads=cfg.num_attention_heads,
        vocab=cfg.vocab_size,
        block_params=sum(p.numel() for p in block.parameters()),
        linear_shapes=tuple((lin.in_features, lin.out_features) for lin in lins)
        + tuple((d_in, d_out) for _, d_in, d_out, _ in experts),
        cov_dims=tuple(covs),
        expert_covs=tuple(expert_covs),
        n_experts=max((n for n, *_ in experts), default=0),
        linear_inputs=tuple(paired),
        paired_dense=tuple(dense),
        cross_shapes=tuple((lin.in_features, lin.out_features) for lin in regressed)
        + tuple((d_in, d_out) for _, d_in, d_out, _ in experts),
        shared_inputs=tuple(block.get_submodule(g[0]).in_features for g in arch.groups if len(g) > 1),
        group_params=max(sum(block.get_submodule(n).weight.numel() for n in g) for g in arch.groups),
    )


def default_budget() -> int:
    """Without ``--max-ram``: 80% of the memory available now."""
    return int(psutil.virtual_memory().available * 0.8)
