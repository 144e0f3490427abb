"""``romcomp.compress``: the whole run, from model resolution to a loadable output directory."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch
from threadpoolctl import threadpool_limits
from tqdm import tqdm
from transformers import AutoConfig, AutoTokenizer

from romcomp import __version__
from romcomp.activations import Boundary
from romcomp.archs import ArchSpec, arch_for
from romcomp.checkpoint import LazyCheckpoint
from romcomp.config import CompressConfig
from romcomp.engine import BlockTimes, Engine, build_shell
from romcomp.errors import BadInputError
from romcomp.memory import MemoryPlan, ModelDims, peak_rss, plan, resident_bytes
from romcomp.methods import get_method, get_output_method
from romcomp.output import Manifest, OutputDir, args_hash, check_out_dir
from romcomp.ranks import LinearShape, allocate_uniform, linear_params


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

    @property
    def linear_ratio_removed(self) -> float:
        return 1 - self.linear_after / self.linear_before


def block_shapes(model: torch.nn.Module, arch: ArchSpec, n_blocks: int) -> list[LinearShape]:
    """Every compressible linear of every block, read from the meta shell (no weights needed)."""
    shapes = []
    layers = model.get_submodule(arch.blocks)
    for i in range(n_blocks):
        for name in arch.linears:
            lin = layers[i].get_submodule(name)
            shapes.append(
                LinearShape(
                    arch.block_prefix(i) + name, lin.in_features, lin.out_features, lin.bias is not None
                )
            )
    return shapes


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
    return ModelDims(
        hidden=hf_config.hidden_size,
        intermediate=getattr(hf_config, "intermediate_size", 4 * hf_config.hidden_size),
        heads=hf_config.num_attention_heads,
        vocab=hf_config.vocab_size,
        block_params=sum(p.numel() for p in block.parameters()),
        linear_shapes=tuple((lin.in_features, lin.out_features) for lin in lins),
        cov_dims=tuple(covs),
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
    """Validate everything cheap first, then stream the blocks; resumable from the manifest."""
    from calib import calibration_tokens_description, calibration_windows, load_calibration
    from romcomp.sources import resolve_model

    t_start = time.perf_counter()
    budget = cfg.validate()
    out_path = Path(cfg.out) if cfg.out else cfg.default_out()
    check_out_dir(out_path, cfg.overwrite)
    calib = load_calibration(cfg.calib, cfg.data_dir)
    source = resolve_model(cfg.model)
    hf_config = AutoConfig.from_pretrained(source.path)
    arch = arch_for(hf_config.model_type)
    max_pos = getattr(hf_config, "max_position_embeddings", None)
    if max_pos and cfg.seq_len > max_pos:
        raise BadInputError(f"--seq-len {cfg.seq_len} exceeds the model's context of {max_pos} tokens")
    ckpt = LazyCheckpoint(source.path)
    shell = build_shell(hf_config)
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    ckpt.verify(
        {n: tuple(t.shape) for n, t in shell.state_dict().items()}, {"lm_head.weight"} if tied else set()
    )
    n_blocks = hf_config.num_hidden_layers
    shapes = block_shapes(shell, arch, n_blocks)
    ranks = _ranks(cfg, shapes)
    dims = model_dims(hf_config, arch, shell, get_output_method(cfg.method) is not None)
    mem = plan(dims, cfg.n_samples, cfg.seq_len, budget or default_budget())
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
        threadpool_limits(cfg.threads)  # scipy's BLAS/LAPACK (syrk, eigh) has its own pool
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    windows = calibration_windows(tokenizer, calib, cfg.n_samples, cfg.seq_len, cfg.seed)
    calib_desc = calibration_tokens_description(calib, cfg.n_samples, cfg.seq_len, cfg.seed)

    result_args = {**cfg.result_args(), "batch_size": mem.batch_size, "allocation": _allocation(cfg),
                   "calibration": calib_desc, "version": __version__}  # fmt: skip
    output = OutputDir(out_path, n_blocks)
    manifest = output.open(
        Manifest(
            args=result_args,
            args_hash=args_hash(result_args),
            source={"spec": cfg.model, "description": source.description, "fingerprint": source.fingerprint},
            calibration=calib_desc,
            ranks=ranks,
            threads=torch.get_num_threads(),
            plan={
                "budget": mem.budget,
                "estimate": mem.estimate,
                "batch_size": mem.batch_size,
                "activations_in_ram": mem.activations_in_ram,
            },  # fmt: skip
        ),
        cfg.overwrite,
    )
    try:
        engine = Engine(
            model=shell,
            arch=arch,
            ckpt=ckpt,
            method=get_method(cfg.method),
            output_method=get_output_method(cfg.method),
            compute_dtype=getattr(torch, cfg.compute_dtype),
            ranks=ranks,
            out_dtype=ckpt.get(f"{arch.block_prefix(0)}{arch.linears[0]}.weight").dtype,
            batch_size=mem.batch_size,
            calib_stream=cfg.calib_stream,
            sequential=cfg.sequential,
        )
        resumed = len(manifest.blocks_done)
        times = _stream_blocks(engine, output, manifest, windows, mem, n_blocks, cfg.progress)
        if manifest.status != "complete":
            output.copy_shard(n_blocks, engine.top_level_names(tied), ckpt)
            output.finalize(
                _output_config(hf_config, arch, cfg, ranks, calib_desc, source.description),
                source.path,
                manifest,
            )
    finally:
        output.close()
    after = LazyCheckpoint(out_path)
    dense, kept = linear_params(shapes, ranks)
    return CompressResult(
        out=out_path,
        source=source.description,
        source_dir=source.path,
        calibration=calib_desc,
        ratio=cfg.ratio,
        method=cfg.method,
        ranks=ranks,
        shapes=shapes,
        params_before=ckpt.num_params(),
        params_after=after.num_params(),
        bytes_before=ckpt.weight_bytes(),
        bytes_after=after.weight_bytes(),
        linear_before=dense,
        linear_after=kept,
        seconds=time.perf_counter() - t_start,
        peak_rss=peak_rss(),
        plan=mem,
        block_times=times,
        notes=manifest.notes,
        resumed_blocks=resumed,
        allocation=_allocation(cfg),
    )


def _allocation(cfg: CompressConfig) -> str:
    return "explicit" if cfg.ranks is not None else "uniform"


def _ranks(cfg: CompressConfig, shapes: list[LinearShape]) -> dict[str, int]:
    """The uniform allocation, or an explicit map checked against the model's linears."""
    if cfg.ranks is None:
        return allocate_uniform(shapes, cfg.ratio)
    known = {s.name: s for s in shapes}
    unknown = sorted(set(cfg.ranks) - set(known))
    if unknown:
        raise BadInputError(f"rank map names unknown linears: {', '.join(unknown[:5])}")
    top = {n: min(s.d_in + int(s.bias), s.d_out) for n, s in known.items()}  # the outputs' possible rank
    bad = [n for n, r in cfg.ranks.items() if not 1 <= r <= top[n]]
    if bad:
        raise BadInputError(f"rank out of range for {', '.join(bad[:5])}")
    return {n: int(r) for n, r in cfg.ranks.items()}


def _stream_blocks(engine: Engine, output: OutputDir, manifest: Manifest, windows: torch.Tensor,
                   mem: MemoryPlan, n_blocks: int, progress: bool) -> dict[int, BlockTimes]:  # fmt: skip
    """The block loop, skipping blocks the manifest records as done."""
    times: dict[int, BlockTimes] = {}
    done = set(manifest.blocks_done)
    if len(done) == n_blocks:
        return times
    shape = (windows.shape[0], windows.shape[1], engine.model.config.hidden_size)
    first = min(set(range(n_blocks)) - done)
    if first == 0:
        source = Boundary.create(output.acts_path(0), shape, mem.activations_in_ram)
        engine.capture_inputs(windows, source)
        source.commit()
    else:
        engine.capture_inputs(windows, None)
        source = Boundary.load(output.acts_path(first), shape, mem.activations_in_ram)
    bar = tqdm(
        total=n_blocks, initial=first, desc="blocks", unit="block", disable=not progress, file=sys.stderr
    )
    for index in range(first, n_blocks):
        sink = Boundary.create(output.acts_path(index + 1), shape, mem.activations_in_ram)
        block, bt, notes = engine.compress_block(index, source, sink)
        t0 = time.perf_counter()
        output.write_shard(index, engine.block_tensors(index, block))
        sink.commit()
        bt.write = time.perf_counter() - t0
        del block
        engine.free_block(index)
        source.release()
        bt.rss, rss_anon = resident_bytes()
        manifest.blocks_done.append(index)
        if notes:
            manifest.notes[str(index)] = notes
        manifest.block_times[str(index)] = {
            "forward": round(bt.forward, 3), "decompose": round(bt.decompose, 3), "write": round(bt.write, 3),
            "rss": bt.rss, "rss_anon": rss_anon,
        }  # fmt: skip
        output.save_manifest(manifest)
        os.remove(source.path)
        times[index] = bt
        source = sink
        bar.update(1)
    bar.close()
    source.release()
    return times


def _output_config(
    hf_config, arch: ArchSpec, cfg: CompressConfig, ranks: dict[str, int], calib: str, source: str
) -> dict:
    """config.json of the output: the dense config, a distinct model_type, auto_map and the romcomp record."""
    from romcomp.hf.configuration_romcomp import CONFIGS
    from romcomp.hf.modeling_romcomp import MODELS

    config_cls, model_cls = CONFIGS[arch.family], MODELS[arch.family]
    d = hf_config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path"):
        d.pop(key, None)
    romcomp = {
        "version": __version__,
        "method": cfg.method,
        "ratio": cfg.ratio,
        "allocation": _allocation(cfg),
        "calibration": calib,
        "calib_stream": cfg.calib_stream,
        "sequential": cfg.sequential,
        "source": source,
        "ranks": ranks,
    }
    config = config_cls(**d, romcomp=romcomp).to_dict()
    config["architectures"] = [model_cls.__name__]
    config["auto_map"] = {
        "AutoConfig": f"configuration_romcomp.{config_cls.__name__}",
        "AutoModelForCausalLM": f"modeling_romcomp.{model_cls.__name__}",
    }
    return config
