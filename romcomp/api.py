"""``romcomp.compress``: the whole run, from model resolution to a loadable output directory."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch
from threadpoolctl import threadpool_limits
from transformers import AutoConfig, AutoTokenizer

from romcomp import __version__
from romcomp.compress.allocation import allocate_asvd, allocate_auto, allocate_last_n, allocate_v2
from romcomp.compress.config import CompressConfig
from romcomp.compress.engine import BlockTimes, Engine, Target, build_shell, is_encoder, stream_blocks
from romcomp.compress.experts import projection_shape
from romcomp.compress.gradients import gradient_pass
from romcomp.compress.memory import MemoryPlan, ModelDims, peak_rss, plan
from romcomp.compress.output import Manifest, OutputDir, args_hash, check_out_dir
from romcomp.compress.ranks import LinearShape, allocate_uniform, linear_params
from romcomp.errors import BadInputError
from romcomp.methods import (
    CROSS_METHODS,
    FULL_GRADIENT_METHODS,
    GRADIENT_METHODS,
    get_method,
    get_output_method,
)
from romcomp.model.archs import ArchSpec
from romcomp.model.checkpoint import LazyCheckpoint
from romcomp.model.discovery import discover, text_config
from romcomp.model.layout import as_model_names


@dataclass
class CompressResult:
    """What a run produced and what it cost; the CLI prints it, tests and benchmarks read it."""

    out: Path
    source: str
    source_dir: Path
    calibration: str
    ratio: float
    method: str
    ranks: dict[str, int]
    shapes: list[LinearShape]
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    linear_before: int
    linear_after: int
    seconds: float
    peak_rss: int
    plan: MemoryPlan
    block_times: dict[int, BlockTimes] = field(default_factory=dict)
    notes: dict[str, list[str]] = field(default_factory=dict)
    resumed_blocks: int = 0
    allocation: str = "uniform"
    fit: str = "local"
    ratios: tuple[float, ...] = ()  # every ratio of the run that produced this output
    dense_other: tuple[str, ...] = ()  # block weights that are not nn.Linear (fused experts): kept dense

    @property
    def linear_ratio_removed(self) -> float:
        return 1 - self.linear_after / self.linear_before


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


def model_dims(hf_config, arch: ArchSpec, model: torch.nn.Module, output_stats: bool) -> ModelDims:
    """The sizes the memory plan needs; ``output_stats``: the method accumulates narrow outputs instead
    of wide inputs for one-linear groups (as :meth:`Engine._output_stats_cheaper` decides)."""
    block = model.get_submodule(arch.blocks)[0]
    lins = [block.get_submodule(n) for n in arch.linears]
    covs = []
    for group in arch.groups:
        first = block.get_submodule(group[0])
        narrow = output_stats and len(group) == 1 and first.out_features < first.in_features
        covs.append(first.out_features if narrow else first.in_features)
    experts = [projection_shape(block, n) for n in arch.experts]
    expert_covs = []
    for n, d_in, d_out, bias in experts:
        narrow = output_stats and d_out < d_in + int(bias)
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
        linear_inputs=tuple(block.get_submodule(g[0]).in_features for g in arch.groups),
        shared_inputs=tuple(block.get_submodule(g[0]).in_features for g in arch.groups if len(g) > 1),
    )


def default_budget() -> int:
    """Without ``--max-ram``: 80% of the memory available now."""
    return int(psutil.virtual_memory().available * 0.8)


def compress(
    model: str, ratio: float, max_ram: str | None = None, out: str | Path | None = None, **kwargs
) -> CompressResult:
    """Compress ``model`` (local dir, .gguf, alias or hub id) to ``out``; see :class:`CompressConfig`."""
    cfg = CompressConfig(model=model, ratio=ratio, max_ram=max_ram, out=Path(out) if out else None, **kwargs)
    return run(cfg)


def run(cfg: CompressConfig) -> CompressResult:
    """One ratio: validate everything cheap first, then stream the blocks; resumable from the manifest."""
    results = run_many(cfg)
    if len(results) != 1:
        raise BadInputError("several ratios give several outputs: call romcomp.api.run_many")
    return results[0]


@dataclass
class Prepared:
    """Everything cheap a streamed run needs, checked before any expensive work: the resolved source, the
    meta shell and lazy checkpoint, the discovered architecture, the memory plan and the calibration."""

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


def prepare(cfg: CompressConfig, budget: int | None, streams: int = 1) -> Prepared:
    """Resolve, verify and plan a run of ``cfg`` (compression or analysis) with ``streams`` activation
    streams; a bad input is refused here, before calibration."""
    from calib import calibration_tokens_description, calibration_windows, load_calibration
    from romcomp.model.sources import resolve_model

    calib = load_calibration(cfg.calib, cfg.data_dir)
    source = resolve_model(cfg.model)
    hf_config = AutoConfig.from_pretrained(source.path)
    cfg.resolve_calibration(is_encoder(hf_config))
    max_pos = getattr(text_config(hf_config), "max_position_embeddings", None)
    if max_pos and cfg.seq_len > max_pos:
        raise BadInputError(f"--seq-len {cfg.seq_len} exceeds the model's context of {max_pos} tokens")
    shell = build_shell(hf_config)
    ckpt = as_model_names(LazyCheckpoint(source.path), shell)
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    ckpt.verify(
        {n: tuple(t.shape) for n, t in shell.state_dict().items()}, {"lm_head.weight"} if tied else set()
    )
    arch = discover(shell, hf_config, ckpt)
    if cfg.method in GRADIENT_METHODS and arch.experts:
        raise BadInputError(
            f"--method {cfg.method} needs weight gradients, which romcomp streams for nn.Linear leaves only; "
            "this model has fused MoE experts (use rom, svd-llm, asvd or svd)"
        )
    if cfg.allocation == "asvd" and arch.experts and cfg.ranks is None:
        raise BadInputError(
            "--allocation asvd measures nn.Linear leaves only; this model has fused MoE experts"
        )
    n_blocks = text_config(hf_config).num_hidden_layers
    shapes = block_shapes(shell, arch, n_blocks)
    dims = model_dims(hf_config, arch, shell, get_output_method(cfg.method) is not None)
    cross = cfg.fit == "error-aware"
    grads = (2 if cfg.method in FULL_GRADIENT_METHODS else 1) if cfg.method in GRADIENT_METHODS else 0
    mem = plan(
        dims, cfg.n_samples, cfg.seq_len, budget or default_budget(), streams, cross, cfg.sequential, grads
    )
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
        threadpool_limits(cfg.threads)  # scipy's BLAS/LAPACK (syrk, eigh) has its own pool
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    windows = calibration_windows(tokenizer, calib, cfg.n_samples, cfg.seq_len, cfg.seed)
    calib_desc = calibration_tokens_description(calib, cfg.n_samples, cfg.seq_len, cfg.seed)
    return Prepared(source, hf_config, shell, ckpt, arch, n_blocks, shapes, mem, windows, calib_desc, tied)


def run_many(cfg: CompressConfig) -> list[CompressResult]:
    """Every ratio of ``cfg`` in one pass: one output directory per ratio, sharing the dense pre-pass,
    each block's load and the dense activation stream (the error-aware fit's targets)."""
    t_start = time.perf_counter()
    budget = cfg.validate()
    ratios = cfg.ratios
    out_paths = cfg.out_paths()
    for path in out_paths:
        check_out_dir(path, cfg.overwrite)
    p = prepare(cfg, budget, streams=len(ratios) + int(cfg.fit == "error-aware"))
    source, hf_config, shell, ckpt, arch, windows = p.source, p.hf_config, p.shell, p.ckpt, p.arch, p.windows
    n_blocks, shapes, mem, calib_desc, tied = p.n_blocks, p.shapes, p.mem, p.calib_desc, p.tied
    other = unfactorized_weights(shell, arch)
    fixed = [_ranks(cfg, r, shapes, n_blocks, arch) for r in ratios]  # None: after the dense pre-pass

    targets: list[Target] = []
    try:
        for ratio, path, ranks in zip(ratios, out_paths, fixed, strict=True):
            output = OutputDir(path, n_blocks)
            manifest = output.open(_manifest(cfg, ratio, mem, calib_desc, source, ranks), cfg.overwrite)
            targets.append(Target(output, manifest, manifest.ranks or ranks or {}))
        engine = Engine(
            model=shell,
            arch=arch,
            ckpt=ckpt,
            method=get_method(cfg.method),
            output_method=get_output_method(cfg.method),
            compute_dtype=getattr(torch, cfg.compute_dtype),
            out_dtype=ckpt.get(f"{arch.block_prefix(0)}{arch.linears[0]}.weight").dtype,
            batch_size=mem.batch_size,
            calib_stream=cfg.calib_stream,
            sequential=cfg.sequential,
            fit=cfg.fit,
            cross_method=CROSS_METHODS.get(cfg.method),
            density=cfg.density or 1.0,
        )
        if any(not t.ranks for t in targets):
            _data_driven_ranks(cfg, targets, engine, windows, mem, shapes, n_blocks)
        if cfg.method in GRADIENT_METHODS:
            full = cfg.method in FULL_GRADIENT_METHODS
            work = targets[0].output.work
            engine.gradients = gradient_pass(engine, work, windows, n_blocks, cfg.progress, full)
        resumed = [len(t.manifest.blocks_done) for t in targets]
        times = stream_blocks(engine, targets, windows, mem.activations_in_ram, n_blocks, cfg.progress)
        for t, ratio in zip(targets, ratios, strict=True):
            if t.manifest.status != "complete":
                t.output.copy_shard(n_blocks, engine.top_level_names(tied), ckpt)
                config = _output_config(hf_config, cfg, ratio, t.ranks, calib_desc, source.description)
                t.output.finalize(config, source.path, t.manifest)
    finally:
        for t in targets:
            t.output.close()
    seconds, peak = time.perf_counter() - t_start, peak_rss()
    results = []
    for t, ratio, n_resumed in zip(targets, ratios, resumed, strict=True):
        after = LazyCheckpoint(t.output.out)
        dense, kept = linear_params(shapes, t.ranks)
        results.append(
            CompressResult(
                out=t.output.out,
                source=source.description,
                source_dir=source.path,
                calibration=calib_desc,
                ratio=ratio,
                method=cfg.method,
                ranks=t.ranks,
                shapes=shapes,
                params_before=ckpt.num_params(),
                params_after=after.num_params(),
                bytes_before=ckpt.weight_bytes(),
                bytes_after=after.weight_bytes(),
                linear_before=dense,
                linear_after=kept,
                seconds=seconds,
                peak_rss=peak,
                plan=mem,
                block_times=times,
                notes=t.manifest.notes,
                resumed_blocks=n_resumed,
                allocation=_allocation(cfg),
                fit=cfg.fit,
                ratios=tuple(ratios),
                dense_other=other,
            )  # fmt: skip
        )
    return results


def _manifest(cfg: CompressConfig, ratio: float, mem: MemoryPlan, calib_desc: str, source,
              ranks: dict[str, int] | None) -> Manifest:  # fmt: skip
    """A fresh manifest for the output of ``ratio`` (``output.open`` returns the previous one on resume:
    same arguments, including every ratio of the run, or a refusal)."""
    args = {**cfg.result_args(), "ratio": ratio, "batch_size": mem.batch_size, "allocation": _allocation(cfg),
            "calibration": calib_desc, "version": __version__}  # fmt: skip
    return Manifest(
        args=args,
        args_hash=args_hash(args),
        source={"spec": cfg.model, "description": source.description, "fingerprint": source.fingerprint},
        calibration=calib_desc,
        ranks=ranks or {},
        threads=torch.get_num_threads(),
        plan={
            "budget": mem.budget,
            "estimate": mem.estimate,
            "batch_size": mem.batch_size,
            "activations_in_ram": mem.activations_in_ram,
        },  # fmt: skip
    )


def _allocation(cfg: CompressConfig) -> str:
    return "explicit" if cfg.ranks is not None else cfg.allocation


def _data_driven_ranks(cfg: CompressConfig, targets: list[Target], engine: Engine, windows: torch.Tensor,
                       mem: MemoryPlan, shapes: list[LinearShape], n_blocks: int) -> None:  # fmt: skip
    """Ranks from the dense pre-pass's spectra (``auto``, ``v2``) or sensitivities (``asvd``), one pre-pass
    for every ratio, fixed in
    each manifest once chosen: a resumed run reuses them (and the cached spectra) instead of profiling."""
    from romcomp.compress.profile import profile

    t0 = time.perf_counter()
    asvd = cfg.allocation == "asvd"
    in_ram = mem.activations_in_ram
    spectra = profile(engine, targets[0].output, windows, in_ram, n_blocks, cfg.progress, asvd)
    seconds = round(time.perf_counter() - t0, 3)
    allocate = {"auto": allocate_auto, "v2": allocate_v2, "asvd": allocate_asvd}[cfg.allocation]
    for t in targets:
        t.manifest.profile_seconds = seconds
        if not t.ranks:
            t.ranks = allocate(shapes, t.manifest.args["ratio"], spectra)
            t.manifest.ranks = t.ranks
            t.output.save_manifest(t.manifest)


def _ranks(
    cfg: CompressConfig, ratio: float, shapes: list[LinearShape], n_blocks: int, arch: ArchSpec
) -> dict[str, int] | None:
    """An explicit map checked against the model's linears, a shape-only allocation, or None when the
    allocation needs the dense pre-pass (``auto``, ``v2``, ``asvd``)."""
    if cfg.ranks is None:
        if cfg.allocation == "uniform":
            return allocate_uniform(shapes, ratio)
        if cfg.allocation == "last-n":
            block_of = {s.name: arch.block_index(s.name) for s in shapes}
            return allocate_last_n(shapes, ratio, n_blocks, cfg.last_n, block_of)
        return None
    known = {s.name: s for s in shapes}
    unknown = sorted(set(cfg.ranks) - set(known))
    if unknown:
        raise BadInputError(f"rank map names unknown linears: {', '.join(unknown[:5])}")
    top = {n: min(s.d_in + int(s.bias), s.d_out) for n, s in known.items()}  # the outputs' possible rank
    bad = [n for n, r in cfg.ranks.items() if not 1 <= r <= top[n]]
    if bad:
        raise BadInputError(f"rank out of range for {', '.join(bad[:5])}")
    return {n: int(r) for n, r in cfg.ranks.items()}


def _output_config(
    hf_config,
    cfg: CompressConfig,
    ratio: float,
    ranks: dict[str, int],
    calib: str,
    source: str,
) -> dict:
    """config.json of the output: the dense config unchanged (its own ``model_type`` and architectures, so
    tokenizers and tools see the family they know) plus a ``quantization_config`` of ``quant_method``
    ``romcomp`` holding the rank map and the record of the run, and an ``auto_map`` for
    ``trust_remote_code`` loading without romcomp installed."""
    from romcomp.hf.modeling_romcomp import QUANT_METHOD

    config = hf_config.to_dict()
    for key in ("auto_map", "transformers_version", "_name_or_path"):
        config.pop(key, None)
    config["quantization_config"] = {
        "quant_method": QUANT_METHOD,
        "version": __version__,
        "method": cfg.method,
        "ratio": ratio,
        "allocation": _allocation(cfg),
        "calibration": calib,
        "fit": cfg.fit,
        "calib_stream": cfg.calib_stream,
        "sequential": cfg.sequential,
        **({"density": cfg.density} if cfg.density is not None else {}),
        "source": source,
        "ranks": ranks,
    }
    if is_encoder(hf_config):
        config["auto_map"] = {"AutoModel": "modeling_romcomp.RomcompModel"}
    else:
        config["auto_map"] = {"AutoModelForCausalLM": "modeling_romcomp.RomcompForCausalLM"}
    return config
