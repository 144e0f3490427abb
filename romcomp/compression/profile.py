"""The dense pre-pass for data-driven rank allocation: every linear's output spectrum, and energies.

One streamed pass of the *dense* model over the first ``--prepass-samples`` calibration windows (the caller
passes them; :func:`romcomp.compression.config.prepass_windows` is the default), one block in memory:
for each linear, the eigenvalues of its output second moment ``W̃ Σ̃ W̃ᵀ`` (per token); for each residual
sublayer, the energy of the residual stream entering it and of what it writes back. Per-block results are
cached in ``<out>/.romcomp/spectra/`` (atomic files), so a killed run resumes the pre-pass where it stopped
and a resumed main pass does not repeat it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from romcomp.compression import allocation, distributed
from romcomp.compression.activations import Boundary
from romcomp.compression.allocation import LinearSpectrum
from romcomp.compression.blocks import BlockIO, emit, narrower_at_output
from romcomp.compression.experts import expert_bias, expert_matrices, expert_passes, projection_shape
from romcomp.compression.experts import narrow as experts_narrow
from romcomp.compression.runner import Runner, Streams
from romcomp.compression.sensitivity import block_sensitivity, measured_ranks
from romcomp.compression.stats import collect_expert_stats, collect_input_stats, collect_output_stats
from romcomp.methods import rom
from romcomp.methods.base import Factors
from romcomp.methods.linalg import scaled_syevd, symmetric_from_upper, syrk_upper
from romcomp.methods.projection import augmented_weight, whitening_root
from romcomp.model.archs import ArchSpec
from romcomp.model.checkpoint import atomic_save_safetensors


def spectra_path(work: Path, index: int) -> Path:
    return work / "spectra" / f"block-{index:05d}.safetensors"


SPECTRA_DTYPE = torch.float32
"""The precision of the pre-pass's spectra: the whitened products and Grams feeding them, and their
eigenvalues (the whitening root itself stays float64; a non-finite float32 Gram or solve is redone in
float64). Measured (docs/results.md, "Pre-pass speed"): at Llama-2-7B shapes one block's spectra take 60 s
of one core in float32 against 111 s in float64 (q/k/v/o 7.8 vs 13.7 s each, gate/up 11.0 vs 22.6 s,
down_proj's 4096² moment 4.1 vs 7.8 s); on SmolLM2-135M (C4, massive activations) the eigenvalues agree to
7.7e-7 of each linear's largest and the auto allocation's ranks at 0.2 and 0.3 are identical. The
allocation reads only sums of eigenvalues against one global threshold, where float32's ~1e-6·λ_max
round-off moves no rank (unlike the fit's eigenvectors, :func:`romcomp.methods.linalg.top_eigvecs`)."""


def eigvals_desc(sym: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """All eigenvalues, descending, as float64 (no eigenvectors: a fraction of a full solve), solved in
    ``dtype`` by :func:`romcomp.methods.linalg.scaled_syevd` (scaled first; float64 fallback)."""
    vals, _, scale = scaled_syevd(sym, False, dtype, vectors=False)
    return (vals.flip(0) * scale).clamp_min(0)


def output_spectrum(weight: torch.Tensor, bias: torch.Tensor | None, stats, by_output: bool,
                    dtype: torch.dtype | None = None) -> torch.Tensor:  # fmt: skip
    """Eigenvalues of the output second moment per token: from the outputs' own moment, or through the
    whitened weight ``M = W̃ L`` (the Gram of its smaller side has the same nonzero eigenvalues); in
    ``dtype`` (default :data:`SPECTRA_DTYPE`), float64 again where that gives anything not finite."""
    dtype = SPECTRA_DTYPE if dtype is None else dtype
    if by_output:
        return eigvals_desc(stats.second_moment, dtype)
    root, _ = whitening_root(stats, bias is not None)
    if dtype != torch.float64:
        root = stats.memo(("spectra root", bias is not None, dtype), lambda: root.to(dtype))
    m = augmented_weight(weight, bias, dtype) @ root
    gram = syrk_upper(m.T) if m.shape[0] <= m.shape[1] else syrk_upper(m)
    del m
    if dtype != torch.float64 and not bool(torch.isfinite(gram).all()):
        return output_spectrum(weight, bias, stats, by_output, torch.float64)
    return eigvals_desc(symmetric_from_upper(gram), dtype)


@dataclass
class BlockEnergy:
    """Energies (sums of squares over the calibration tokens) of the residual stream entering each
    sublayer (``in0``, ``in1``) and of what the MoE experts write back."""

    in0: float = 0.0
    in1: float = 0.0
    experts: float = 0.0


def profile_block(
    io: BlockIO,
    index: int,
    block: nn.Module,
    source: Boundary,
    sink: Boundary | None,
    sensitivity: bool = False,
    expert_chunk: int | None = None,
    measure: bool = False,
) -> dict[str, torch.Tensor]:
    """Spectra and energy weights of the loaded block ``index`` on the dense stream; its outputs go to
    ``sink``. With ``sensitivity``, also every linear's ASVD sensitivity per candidate
    (:mod:`romcomp.compression.sensitivity`). MoE experts' moments are held ``expert_chunk`` experts at
    a time (the memory plan's choice): the first chunk in the forward that fills ``sink``, each further
    one in a forward stopped after the experts. With ``measure``, also each linear's block-output damage at
    the ``auto`` allocation's measured cuts (``allocation.SIGNAL == "block"``)."""
    arch = io.arch
    narrow = [g for g in arch.groups if len(g) == 1 and narrower_at_output(block.get_submodule(g[0]))]
    wide = [g for g in arch.groups if g not in narrow]
    energy = BlockEnergy()
    t0 = time.perf_counter()
    with (
        collect_input_stats(block, wide) as stats,
        collect_output_stats(block, [g[0] for g in narrow]) as out_stats,
        collect_expert_stats(
            block,
            arch.experts,
            lambda n: experts_narrow(block, n),
            experts=_chunks(block, arch, expert_chunk)[0],
        ) as expert_stats,
        _energy_hooks(block, arch, energy) as current,
        torch.inference_mode(),
    ):
        for start, stop in io.batches(source.shape[0]):
            current["x"] = source.read(start, stop)
            energy.in0 += float(current["x"].double().pow(2).sum())
            emit(io.call_block(block, index, current["x"]), sink, start, stop)
        tokens = _reduced(stats, out_stats, energy, source.shape[0] * source.shape[1])
        t1 = time.perf_counter()
        eig = _block_spectra(block, arch, narrow, stats, out_stats, keep_roots=sensitivity or measure)
        for name in arch.experts:
            eig[name] = experts_spectrum(block, name, expert_stats, tokens)
    for chunk in _chunks(block, arch, expert_chunk)[1:]:
        with collect_expert_stats(block, arch.experts, lambda n: experts_narrow(block, n), stop=True,
                                  experts=chunk) as expert_stats:  # fmt: skip
            io.forward_until_stopped(index, block, source)
            for name in arch.experts:
                eig[name] = _padded_sum(eig[name], experts_spectrum(block, name, expert_stats, tokens))
    result: dict[str, torch.Tensor] = {"tokens": torch.tensor(float(tokens), dtype=torch.float64)}
    result["seconds.forward"] = torch.tensor(t1 - t0, dtype=torch.float64)  # forwards + statistics
    prefix = arch.block_prefix(index)
    if sensitivity:
        damage = block_sensitivity(
            io, index, block, source, list(arch.linears), _rom_factors(block, wide, stats, out_stats)
        )
        result.update({f"{prefix}{name}.sensitivity": values for name, values in damage.items()})
    if measure:
        factors = _rom_factors(block, wide, stats, out_stats)
        names = list(arch.linears)
        damage = block_sensitivity(io, index, block, source, names, factors, measured_ranks, "output")
        result.update({f"{prefix}{name}.measured": values for name, values in damage.items()})
    for name, share in _sublayer_shares(arch, eig, energy, tokens).items():
        result[f"{prefix}{name}.eigvals"] = eig[name]
        result[f"{prefix}{name}.sublayer"] = torch.tensor(share, dtype=torch.float64)
    result["seconds.spectra"] = torch.tensor(time.perf_counter() - t1, dtype=torch.float64)
    return result


def _reduced(stats: dict, out_stats: dict, energy: BlockEnergy, tokens: int) -> int:
    """Distributed: the block's statistics and energies summed over the ranks in place; returns the
    tokens they cover (every rank's)."""
    world = distributed.current()
    if not world.active:
        return tokens
    world.reduce_stats(stats, out_stats)
    sums = torch.tensor([energy.in0, energy.in1, energy.experts, tokens], dtype=torch.float64)
    world.all_reduce_([sums])
    energy.in0, energy.in1, energy.experts = (float(v) for v in sums[:3])
    return int(sums[3])


@contextmanager
def _energy_hooks(block: nn.Module, arch: ArchSpec, energy: BlockEnergy) -> Iterator[dict[str, torch.Tensor]]:
    """Hooks that add the residual stream after the first sublayer's writer (``in1``) and the experts'
    outputs to ``energy``; the caller puts each batch's block input under ``"x"`` of the yielded dict."""
    current: dict[str, torch.Tensor] = {}
    writers = [arch.groups[sub[-1]][0] for sub in arch.sublayers]

    def after_first_writer(_m: nn.Module, _args: tuple, out: torch.Tensor) -> None:
        energy.in1 += float((current["x"] + out).double().pow(2).sum())

    def moe_output(_m: nn.Module, _args: tuple, out: torch.Tensor) -> None:
        energy.experts += float(out.double().pow(2).sum())

    handles = [block.get_submodule(writers[0]).register_forward_hook(after_first_writer)]
    handles += [block.get_submodule(o).register_forward_hook(moe_output) for o in _owners(arch.experts)]
    try:
        yield current
    finally:
        for h in handles:
            h.remove()


def _block_spectra(block: nn.Module, arch: ArchSpec, narrow: list, stats: dict, out_stats: dict,
                   keep_roots: bool) -> dict[str, torch.Tensor]:  # fmt: skip
    """Every linear's output spectrum from the statistics just collected (a group's whitening root is
    dropped after the group unless ``keep_roots``: the sensitivity measurement reuses it)."""
    world = distributed.current()
    eig: dict[str, torch.Tensor] = {}
    for group in arch.groups:
        for name in group:
            if world.owner(arch.linears, name) != world.rank:
                continue  # another rank's (distributed): broadcast below
            linear = block.get_submodule(name)
            bias = None if linear.bias is None else linear.bias.data
            by_output = group in narrow
            st = out_stats[name] if by_output else stats[group[0]]
            eig[name] = output_spectrum(linear.weight.data, bias, st, by_output)
        if group[0] in stats and not keep_roots:
            stats[group[0]].derived.clear()
    if world.active:
        eig = {n: world.broadcast_object(eig.get(n), world.owner(arch.linears, n)) for n in arch.linears}
    return eig


def _rom_factors(block: nn.Module, wide: list, stats: dict, out_stats: dict) -> Callable[[str, int], Factors]:
    """ROM's local factors of a linear at a rank, whatever the run's method: the allocation's proxy."""
    leader = {name: g[0] for g in wide for name in g}

    def factors(name: str, rank: int) -> Factors:
        linear = block.get_submodule(name)
        bias = None if linear.bias is None else linear.bias.data
        if name in leader:
            return rom.decompose(linear.weight.data, bias, stats[leader[name]], rank)
        return rom.decompose_outputs(linear.weight.data, bias, out_stats[name], rank)

    return factors


def _sublayer_shares(arch: ArchSpec, eig: dict[str, torch.Tensor], energy: BlockEnergy,
                     tokens: int) -> dict[str, float]:  # fmt: skip
    """Each linear's sublayer weight: the energy its sublayer writes into the residual stream relative
    to the stream's energy entering it (per token)."""
    writers = [arch.groups[sub[-1]][0] for sub in arch.sublayers]
    shares: dict[str, float] = {}
    for n_sub, sub in enumerate(arch.sublayers):
        written = float(eig[writers[n_sub]].sum())
        residual = (energy.in0 if n_sub == 0 else energy.in1) / tokens
        for gi in sub:
            for name in arch.groups[gi]:
                shares[name] = written / residual if residual > 0 else 0.0
    residual = (energy.in1 if len(arch.sublayers) > 1 else energy.in0) / tokens
    for name in arch.experts:  # the MoE writes its routed, weighted sum into the stream after attention
        shares[name] = energy.experts / tokens / residual if residual > 0 else 0.0
    return shares


def _owners(projections) -> list[str]:
    return list(dict.fromkeys(name.rpartition(".")[0] for name in projections))


def _chunks(block: nn.Module, arch: ArchSpec, size: int | None) -> list[range | None]:
    """The experts of each statistics pass (:func:`~romcomp.compression.experts.expert_passes`); one
    pass (``[None]``) for a block without experts."""
    if not arch.experts:
        return [None]
    return list(expert_passes(projection_shape(block, arch.experts[0])[0], size))


def experts_spectrum(block: nn.Module, name: str, stats: dict, tokens: int) -> torch.Tensor:
    """The eigenvalues a shared rank of fused projection ``name`` discards, per token of the layer: each
    expert's output spectrum over its routed tokens, weighted by the share of tokens it sees (an expert no
    token reached adds nothing)."""
    owner, _, proj = name.rpartition(".")
    module = block.get_submodule(owner)
    by_output = experts_narrow(block, name)
    total = None
    weights = expert_matrices(module, proj)
    for expert in range(weights.shape[0]):
        st = stats.pop((name, expert), None)
        if st is None:
            continue
        bias = expert_bias(module, proj, expert)
        eig = output_spectrum(weights[expert], bias, st, by_output) * (st.count / tokens)
        total = eig if total is None else _padded_sum(total, eig)
    if total is None:
        _, d_in, d_out, bias = projection_shape(block, name)
        return torch.zeros(min(d_in + int(bias), d_out), dtype=torch.float64)
    return total


def _padded_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    n = max(a.numel(), b.numel())
    out = torch.zeros(n, dtype=torch.float64)
    out[: a.numel()] += a
    out[: b.numel()] += b
    return out


@dataclass
class ProfilePass:
    """The runner's work for the dense pre-pass: one spectra file per block, the dense stream between."""

    io: BlockIO
    work: Path
    acts: Callable[[int], Path]  # the dense stream's boundary file before block i
    n_blocks: int
    sensitivity: bool = False
    expert_chunk: int | None = None
    label: str = "profile"
    _tensors: dict[str, torch.Tensor] | None = None

    def sources(self, index: int) -> dict[str, Path]:
        return {"dense": self.acts(index)}

    def sinks(self, index: int) -> dict[str, Path]:
        return {} if index == self.n_blocks - 1 else {"dense": self.acts(index + 1)}

    def process(self, index: int, block: nn.Module, sources: Streams, sinks: Streams) -> None:
        world = distributed.current()
        before = replace(world.traffic)
        measure = allocation.SIGNAL == "block" and not self.sensitivity
        self._tensors = profile_block(self.io, index, block, sources["dense"], sinks.get("dense"),
                                      self.sensitivity, self.expert_chunk, measure)  # fmt: skip
        if world.active:  # the block's collectives: seconds, bytes all-reduced and broadcast
            for kind, value in world.traffic.since(before).items():
                key = "seconds.comm" if kind == "comm" else f"comm.{kind}"
                self._tensors[key] = torch.tensor(float(value), dtype=torch.float64)

    def finish(self, index: int, sources: Streams) -> None:
        atomic_save_safetensors(self._tensors, spectra_path(self.work, index))  # after the sink is durable
        self._tensors = None
        distributed.current().barrier()  # recorded on every rank before any drops its input
        os.remove(sources["dense"].path)


def profile(io: BlockIO, output, windows: torch.Tensor, in_ram: bool, n_blocks: int,
            progress: bool, sensitivity: bool = False,
            expert_chunk: int | None = None) -> dict[str, LinearSpectrum]:  # fmt: skip
    """Run (or resume) the dense pre-pass into ``output``'s work directory; returns every block linear's
    :class:`LinearSpectrum` (with ASVD's sensitivities when ``sensitivity``)."""
    work = output.work
    todo = [i for i in range(n_blocks) if not spectra_path(work, i).exists()]
    first = distributed.current().agree_min(todo[0] if todo else n_blocks)  # the rank furthest behind
    todo = list(range(first, n_blocks))
    if todo:
        spectra_path(work, 0).parent.mkdir(parents=True, exist_ok=True)
        task = ProfilePass(io, work, lambda i: output.acts_path(i, "profile"), n_blocks, sensitivity,
                           expert_chunk)  # fmt: skip
        runner = Runner(io, io.stream_shape(windows), in_ram, progress)
        carry = runner.start(windows, task.sources(todo[0]), fresh=todo[0] == 0)
        runner.run(task, range(todo[0], n_blocks), carry, total=n_blocks, done=todo[0])
    return load_spectra(work, n_blocks)


def profile_times(work: Path, n_blocks: int) -> dict[str, dict[str, float]]:
    """Seconds per block of the pre-pass (``forward``: forwards and statistics, which scale with the
    calibration tokens; ``spectra``: eigensolves and sensitivities, which do not), from its cache."""
    times = {}
    for i in range(n_blocks):
        with safe_open(str(spectra_path(work, i)), "pt") as f:
            keys = set(f.keys())
            if "seconds.forward" in keys:
                times[str(i)] = {
                    k: round(float(f.get_tensor(f"seconds.{k}")), 3)
                    for k in ("forward", "spectra", "comm")
                    if f"seconds.{k}" in keys
                }
                times[str(i)].update({k.removeprefix("comm."): float(f.get_tensor(k))
                                      for k in keys if k.startswith("comm.")})  # fmt: skip
    return times


def load_spectra(work: Path, n_blocks: int) -> dict[str, LinearSpectrum]:
    spectra: dict[str, LinearSpectrum] = {}
    for i in range(n_blocks):
        t = load_file(str(spectra_path(work, i)))
        tokens = int(t.pop("tokens"))
        for key in [k for k in t if k.startswith(("seconds.", "comm."))]:
            t.pop(key)
        for key in [k for k in t if k.endswith(".eigvals")]:
            name = key[: -len(".eigvals")]
            found = t.get(f"{name}.sensitivity")
            spectra[name] = LinearSpectrum(t[key], float(t[f"{name}.sublayer"]), tokens, found,
                                           t.get(f"{name}.measured"))  # fmt: skip
    return spectra
