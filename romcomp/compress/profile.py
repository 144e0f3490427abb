"""The dense pre-pass for data-driven rank allocation: every linear's output spectrum, and energies.

One streamed pass of the *dense* model over the calibration set (one block in memory, like the main pass):
for each linear, the eigenvalues of its output second moment ``W̃ Σ̃ W̃ᵀ`` (per token); for each residual
sublayer, the energy of the residual stream entering it and of what it writes back. Per-block results are
cached in ``<out>/.romcomp/spectra/`` (atomic files), so a killed run resumes the pre-pass where it stopped
and a resumed main pass does not repeat it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
from safetensors.torch import load_file
from torch import nn
from tqdm import tqdm

from romcomp.compress.activations import Boundary
from romcomp.compress.allocation import LinearSpectrum
from romcomp.compress.engine import Engine
from romcomp.compress.experts import expert_bias, expert_matrices, projection_shape
from romcomp.compress.experts import narrow as experts_narrow
from romcomp.compress.sensitivity import block_sensitivity
from romcomp.compress.stats import collect_expert_stats, collect_input_stats, collect_output_stats
from romcomp.errors import RomcompError
from romcomp.methods import get_method, get_output_method
from romcomp.methods.base import Factors
from romcomp.methods.linalg import symmetric_from_upper, syrk_upper
from romcomp.methods.rom import augmented_weight, whitening_root
from romcomp.model.checkpoint import atomic_save_safetensors
from romcomp.model.discovery import text_config


def spectra_path(work: Path, index: int) -> Path:
    return work / "spectra" / f"block-{index:05d}.safetensors"


def eigvals_desc(sym: torch.Tensor) -> torch.Tensor:
    """All eigenvalues, descending, float64 (no eigenvectors: a fraction of a full solve). LAPACK's
    divide and conquer can fail to converge on degenerate matrices; the QR-based solver then serves."""
    try:
        vals = scipy.linalg.eigh(sym.double().numpy(), eigvals_only=True, driver="evd", check_finite=False)
    except (np.linalg.LinAlgError, ValueError):
        vals = torch.linalg.eigvalsh(sym.double()).numpy()
    return torch.from_numpy(np.ascontiguousarray(vals[::-1])).clamp_min(0)


def output_spectrum(weight: torch.Tensor, bias: torch.Tensor | None, stats, by_output: bool) -> torch.Tensor:
    """Eigenvalues of the output second moment per token: from the outputs' own moment, or through the
    whitened weight ``M = W̃ L`` (the Gram of its smaller side has the same nonzero eigenvalues)."""
    if by_output:
        return eigvals_desc(stats.second_moment)
    root, _ = whitening_root(stats, bias is not None)
    m = augmented_weight(weight, bias) @ root
    gram = syrk_upper(m.T) if m.shape[0] <= m.shape[1] else syrk_upper(m)
    return eigvals_desc(symmetric_from_upper(gram))


def profile_block(
    engine: Engine, index: int, source: Boundary, sink: Boundary | None, sensitivity: bool = False
) -> dict[str, torch.Tensor]:
    """Spectra and energy weights of block ``index`` on the dense stream; its outputs go to ``sink``.
    With ``sensitivity``, also every linear's ASVD sensitivity per candidate
    (:mod:`romcomp.compress.sensitivity`)."""
    block = engine.load_block(index)
    arch = engine.arch
    narrow = [g for g in arch.groups if len(g) == 1 and _narrow(block.get_submodule(g[0]))]
    wide = [g for g in arch.groups if g not in narrow]
    writers = [arch.groups[sub[-1]][0] for sub in arch.sublayers]
    energy = {"in0": 0.0, "in1": 0.0}
    current: dict[str, torch.Tensor] = {}

    def after_first_writer(_m: nn.Module, _args: tuple, out: torch.Tensor) -> None:
        energy["in1"] += float((current["x"] + out).double().pow(2).sum())

    def moe_output(_m: nn.Module, _args: tuple, out: torch.Tensor) -> None:
        energy["experts"] += float(out.double().pow(2).sum())

    energy["experts"] = 0.0
    handles = [block.get_submodule(writers[0]).register_forward_hook(after_first_writer)]
    handles += [block.get_submodule(o).register_forward_hook(moe_output) for o in _owners(arch.experts)]
    try:
        with (
            collect_input_stats(block, wide) as stats,
            collect_output_stats(block, [g[0] for g in narrow]) as out_stats,
            collect_expert_stats(block, arch.experts, lambda n: experts_narrow(block, n)) as expert_stats,
            torch.inference_mode(),
        ):
            for start, stop in engine.batches(source.shape[0]):
                current["x"] = source.read(start, stop)
                energy["in0"] += float(current["x"].double().pow(2).sum())
                out = engine.call_block(block, index, current["x"])
                if not torch.isfinite(out).all():
                    raise RomcompError(f"non-finite activations after block samples {start}..{stop}")
                if sink is not None:
                    sink.write(start, out.float())
            tokens = source.shape[0] * source.shape[1]
            result: dict[str, torch.Tensor] = {"tokens": torch.tensor(float(tokens), dtype=torch.float64)}
            prefix = arch.block_prefix(index)
            eig: dict[str, torch.Tensor] = {}
            for group in arch.groups:
                for name in group:
                    linear = block.get_submodule(name)
                    bias = None if linear.bias is None else linear.bias.data
                    by_output = group in narrow
                    st = out_stats[name] if by_output else stats[group[0]]
                    eig[name] = output_spectrum(linear.weight.data, bias, st, by_output)
                if group[0] in stats and not sensitivity:
                    stats[group[0]].derived.clear()
            for name in arch.experts:
                eig[name] = experts_spectrum(block, name, expert_stats, tokens)
    finally:
        for h in handles:
            h.remove()

    if sensitivity:
        leader = {name: g[0] for g in wide for name in g}

        def factors(name: str, rank: int) -> Factors:
            linear = block.get_submodule(name)
            bias = None if linear.bias is None else linear.bias.data
            if name in leader:
                return get_method("rom")(linear.weight.data, bias, stats[leader[name]], rank)
            return get_output_method("rom")(linear.weight.data, bias, out_stats[name], rank)

        damage = block_sensitivity(engine, index, block, source, list(arch.linears), factors)
        for name, values in damage.items():
            result[f"{prefix}{name}.sensitivity"] = values

    def record(name: str, share: float) -> None:
        result[f"{prefix}{name}.eigvals"] = eig[name]
        result[f"{prefix}{name}.sublayer"] = torch.tensor(share, dtype=torch.float64)

    for n_sub, sub in enumerate(arch.sublayers):
        written = float(eig[writers[n_sub]].sum())
        residual = energy[f"in{min(n_sub, 1)}"] / tokens
        for gi in sub:
            for name in arch.groups[gi]:
                record(name, written / residual if residual > 0 else 0.0)
    residual = energy["in1" if len(arch.sublayers) > 1 else "in0"] / tokens
    for name in arch.experts:  # the MoE writes its routed, weighted sum into the stream after attention
        record(name, energy["experts"] / tokens / residual if residual > 0 else 0.0)
    return result


def _owners(projections) -> list[str]:
    return list(dict.fromkeys(name.rpartition(".")[0] for name in projections))


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


def _narrow(linear: nn.Linear) -> bool:
    return linear.out_features < linear.in_features + int(linear.bias is not None)


def profile(engine: Engine, output, windows: torch.Tensor, in_ram: bool, n_blocks: int,
            progress: bool, sensitivity: bool = False) -> dict[str, LinearSpectrum]:  # fmt: skip
    """Run (or resume) the dense pre-pass; returns every block linear's :class:`LinearSpectrum` (with
    ASVD's sensitivities when ``sensitivity``)."""
    work = output.work
    todo = [i for i in range(n_blocks) if not spectra_path(work, i).exists()]
    if todo:
        spectra_path(work, 0).parent.mkdir(parents=True, exist_ok=True)
        shape = (windows.shape[0], windows.shape[1], text_config(engine.model.config).hidden_size)
        first = todo[0]
        if first == 0:
            source = Boundary.create(output.acts_path(0, "profile"), shape, in_ram)
            engine.capture_inputs(windows, [source])
            source.commit()
        else:
            engine.capture_inputs(windows, [])
            source = Boundary.load(output.acts_path(first, "profile"), shape, in_ram)
        bar = tqdm(total=n_blocks, initial=first, desc="profile", unit="block", disable=not progress,
                   file=sys.stderr)  # fmt: skip
        for index in range(first, n_blocks):
            last = index == n_blocks - 1
            sink = None if last else Boundary.create(output.acts_path(index + 1, "profile"), shape, in_ram)
            tensors = profile_block(engine, index, source, sink, sensitivity)
            if sink is not None:
                sink.commit()
            atomic_save_safetensors(tensors, spectra_path(work, index))
            engine.free_block(index)
            source.release()
            os.remove(source.path)
            source = sink
            bar.update(1)
        bar.close()
    return load_spectra(work, n_blocks)


def load_spectra(work: Path, n_blocks: int) -> dict[str, LinearSpectrum]:
    spectra: dict[str, LinearSpectrum] = {}
    for i in range(n_blocks):
        t = load_file(str(spectra_path(work, i)))
        tokens = int(t.pop("tokens"))
        for key in [k for k in t if k.endswith(".eigvals")]:
            name = key[: -len(".eigvals")]
            found = t.get(f"{name}.sensitivity")
            spectra[name] = LinearSpectrum(t[key], float(t[f"{name}.sublayer"]), tokens, found)
    return spectra
