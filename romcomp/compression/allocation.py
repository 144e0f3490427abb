"""Rank allocation: how the parameter budget of ``--ratio`` is spread over the block linears.

All functions are pure: shapes (and, for the data-driven schemes, each linear's output spectrum from the
dense pre-pass, :mod:`romcomp.compression.profile`) in, ``{linear name: rank}`` out; a linear absent
from the map stays dense. Ratio convention (SVD-LLM's): ``ratio`` is the fraction of block-linear
parameters removed.

- ``uniform``: every linear at the same per-matrix ratio (SVD-LLM, ROM).
- ``last-n``: only the last N blocks, at the per-matrix ratio that removes the same total (LLM-ROM).
- ``v2``: SVD-LLM V2's heterogeneous ratios: within each matrix type, a ratio inversely proportional to
  the log of the matrix's theoretical truncation loss at the uniform ratio.
- ``auto``: one global budget, spent direction by direction where the estimated damage to the residual
  stream per parameter is lowest, across types and depth; a matrix whose rank reaches break-even is kept
  dense (it then costs no more than its factors would).
- ``asvd``: ASVD's sensitivity-based search — every linear measured at each of ASVD's candidate kept
  fractions, one linear at a time, and a binary search for the sensitivity threshold that meets the budget
  (:func:`allocate_asvd`; the measurement is :mod:`romcomp.compression.sensitivity`).
"""

from __future__ import annotations

import heapq
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from romcomp.compression.ranks import LinearShape, allocate_uniform, uniform_rank
from romcomp.errors import BadInputError, RomcompError

ENERGY_EXPONENT = 1.5
"""How strongly a sublayer's share of the residual stream weighs its linears (see :class:`LinearSpectrum`).
Chosen on *validation* text (``tools/sweep_knobs.py``, SmolLM2-135M, C4 32 × 512, per-channel ridge; the
geometric mean of WikiText-2/PTB validation perplexity at ratios 0.2 and 0.3, docs/results.md):
1 → 70.95, **1.5 → 68.39**, 2 → 70.52."""


SIGNAL = "proxy"
"""What converts a linear's discarded output energy into damage (``auto``): ``"proxy"``, the sublayer's
share of the residual stream to ``ENERGY_EXPONENT`` over the linear's output energy; ``"block"``, measured
in the pre-pass — the block run with the linear cut to each of ``MEASURED_FRACTIONS`` of its rank (ROM's
local fit), the relative change of the block's output (what reaches the residual stream, after any norm,
scale or routing the family applies) over the energy the cut discards."""

MEASURED_FRACTIONS = (0.125, 0.25, 0.5)
"""Where the ``"block"`` signal cuts each linear, as fractions of its outputs' rank."""


def measured_cuts(top: int) -> list[int]:
    """The ranks the ``"block"`` signal cuts a linear to, given its outputs' rank ``top``: the pre-pass
    measures at them and :meth:`LinearSpectrum.measured_weight` reads the spectrum's tails at them."""
    return [max(1, round(f * top)) for f in MEASURED_FRACTIONS]


@dataclass
class LinearSpectrum:
    """What the dense pre-pass measured for one linear.

    ``eigvals``: eigenvalues (descending, float64) of the output second moment ``W̃ Σ̃ W̃ᵀ`` per token
    (``λ_{k+1} + …`` is what rank ``k`` discards under local ROM). ``sublayer``: the energy the linear's
    residual sublayer writes back over the energy of the residual stream entering it.
    """

    eigvals: torch.Tensor
    sublayer: float
    tokens: int
    sensitivity: torch.Tensor | None = None  # per ASVD_CANDIDATES entry (``--allocation asvd`` only)
    measured: torch.Tensor | None = None  # block-output damage per MEASURED_FRACTIONS entry (SIGNAL "block")

    @property
    def weight(self) -> float:
        """Converts discarded output energy into damage to the residual stream: the discarded share of the
        linear's own output energy, times the sublayer's relative size to the power ``ENERGY_EXPONENT``
        (1 would be the first-order share; larger values protect sublayers that rewrite much of the stream,
        which the measurements favour: errors there also change what every later layer sees)."""
        if SIGNAL == "block" and self.measured is not None:
            return self.measured_weight()
        trace = float(self.eigvals.sum())
        return self.sublayer**ENERGY_EXPONENT / trace if trace > 0 and self.sublayer > 0 else 0.0

    def measured_weight(self) -> float:
        """Measured damage per unit of discarded output energy: ``Σ_j damage_j / Σ_j tail(k_j)`` over the
        measured cuts ``k_j`` (a ratio of sums: the large cuts, measured most precisely, dominate)."""
        tail = _tails(self.eigvals)
        tails = sum(float(tail[k]) for k in measured_cuts(self.eigvals.numel()))
        damage = float(self.measured.clamp_min(0).sum())
        return damage / tails if tails > 0 else 0.0


def max_rank(s: LinearShape) -> int:
    return min(s.d_in + int(s.bias), s.d_out)


def dense_breakeven(s: LinearShape) -> int:
    """The smallest rank at which the factors cost as much as the dense matrix."""
    return math.ceil(s.dense_params / s.rank_cost)


def allocate_last_n(shapes: Sequence[LinearShape], ratio: float, n_blocks: int, last_n: int | None,
                    block_of: dict[str, int]) -> dict[str, int]:  # fmt: skip
    """Compress only the last ``last_n`` blocks (default: the fewest at which the per-matrix ratio is at
    most 0.6), each at the per-matrix ratio that removes ``ratio`` of all block-linear parameters: the
    chosen blocks' share of the parameters sets it (blocks need not be equal, e.g. MoE layers among dense
    ones). Each rank rounds down, so at most one rank step per matrix more is removed."""
    dense_total = sum(s.dense_params for s in shapes)

    def inner(n: int) -> float:
        chosen = sum(s.dense_params for s in shapes if block_of[s.name] >= n_blocks - n)
        return ratio * dense_total / chosen if chosen else math.inf

    if last_n is None:
        last_n = next((n for n in range(1, n_blocks + 1) if inner(n) <= 0.6), n_blocks)
    if last_n > n_blocks:
        raise BadInputError(f"--last-n {last_n} exceeds the model's {n_blocks} blocks")
    if inner(last_n) >= 0.95:
        raise BadInputError(
            f"--last-n {last_n} blocks cannot remove {ratio:g} of all block linears "
            f"(needs {inner(last_n):.2f} of each); use more blocks"
        )
    chosen = [s for s in shapes if block_of[s.name] >= n_blocks - last_n]
    return allocate_uniform(chosen, inner(last_n))


def truncation_loss(spec: LinearSpectrum, rank: int) -> float:
    """SVD-LLM's theoretical truncation loss: the Frobenius norm of the whitened truncation residual,
    ``sqrt(Σ_{i>k} σ_i²)`` over the calibration tokens (sums, not means, as their code computes it)."""
    return math.sqrt(float(spec.eigvals[rank:].clamp_min(0).sum()) * spec.tokens)


V2_CAP = 0.99
"""The largest share of one matrix ``v2`` removes (its log-loss weights can ask for more than all)."""


def allocate_v2(
    shapes: Sequence[LinearShape], ratio: float, spectra: dict[str, LinearSpectrum]
) -> dict[str, int]:
    """SVD-LLM V2: per matrix type (q_proj, …), ratio_i ∝ 1/log L_i with the type's parameters removed at
    ``ratio`` (``|G|·r·(1/log L_i) / Σ_j 1/log L_j`` for equal shapes). A share above ``V2_CAP`` is capped
    and the excess goes to the type's other matrices in the same proportions (water-filling), so the
    budget is spent, not dropped; each rank rounds down (at most one rank step more removed)."""
    groups: dict[str, list[LinearShape]] = defaultdict(list)
    for s in shapes:
        groups[s.name.rsplit(".", 1)[-1] + (" (experts)" if s.count > 1 else "")].append(s)
    ranks: dict[str, int] = {}
    for members in groups.values():
        inv = []
        for s in members:
            k = uniform_rank(s.d_in, s.d_out, ratio) or max_rank(s)
            loss = truncation_loss(spectra[s.name], k)
            inv.append(1.0 / math.log(max(loss, math.e)))  # log L ≥ 1 keeps every share positive
        shares = _water_fill([s.dense_params for s in members], inv, ratio, V2_CAP)
        for s, r in zip(members, shares, strict=True):
            k = uniform_rank(s.d_in, s.d_out, r)
            if k is not None:
                ranks[s.name] = min(k, max_rank(s))
    return ranks


def _water_fill(sizes: Sequence[int], weights: Sequence[float], ratio: float, cap: float) -> list[float]:
    """Shares ``min(c·w_i, cap)`` with ``Σ share_i·size_i = ratio·Σ size_i`` (``c`` found exactly: the
    capped set only grows as ``c`` does)."""
    target = ratio * sum(sizes)
    capped: set[int] = set()
    while True:
        free = [i for i in range(len(sizes)) if i not in capped]
        rest = target - cap * sum(sizes[i] for i in capped)
        scale = rest / max(sum(weights[i] * sizes[i] for i in free), 1e-300)
        over = {i for i in free if scale * weights[i] > cap}
        if not over or len(capped | over) == len(sizes):
            capped |= over
            return [cap if i in capped else min(scale * weights[i], cap) for i in range(len(sizes))]
        capped |= over


AUTO_DENSE = "step"
"""How ``auto`` prices keeping a decoder's matrix dense: ``"step"`` only at break-even, as one more
direction worth one eigenvalue (the Lagrangian optimum of the additive proxy); ``"bundle"`` offers the
jump to dense at every rank, worth every eigenvalue not yet kept for what the jump costs (a greedy step).
Chosen on validation text over three ratios and two models (``tools/sweep_knobs.py``, C4 32 × 512,
docs/results.md): SmolLM2-135M a tie (step 56.58, bundle 56.59), Qwen2.5-Coder-0.5B step better at every
ratio (0.1 / 0.2 / 0.3 WikiText-2 validation 33.08 / 41.27 / 51.04 vs 33.91 / 42.45 / 54.22)."""

AUTO_DENSE_ENCODER = "bundle"
""":data:`AUTO_DENSE` for encoders, chosen on the same validation text: all-MiniLM-L6-v2 (512 × 64) keeps
a mean embedding cosine of 0.965 / 0.934 / 0.887 with the dense model at 0.1 / 0.2 / 0.3 under ``bundle``
against 0.958 / 0.926 / 0.845 under ``step`` (WikiText-2 validation lines; PTB alike): its small square
matrices have flat spectra, for which going dense is often the better buy."""


def allocate_auto(
    shapes: Sequence[LinearShape],
    ratio: float,
    spectra: dict[str, LinearSpectrum],
    encoder: bool = False,
) -> dict[str, int]:
    """Global greedy allocation over every output direction of every linear.

    Each matrix starts at rank 1. The next direction ``i`` of matrix ``m`` is worth ``w_m λ_i`` of
    residual-stream damage avoided and costs ``d_in + d_out`` parameters (times the experts of a fused MoE
    projection, which share one rank); directions are taken in order of worth per parameter while the
    kept parameters stay within ``(1 − ratio)`` of dense (a matrix's worth per direction only falls, so
    with step pricing this is the Lagrangian optimum of the additive proxy). Reaching break-even turns a
    matrix dense (cost ``d_in·d_out``, never more than its factors); with bundle pricing (an ``encoder``'s
    default, :data:`AUTO_DENSE_ENCODER`; a decoder reads :data:`AUTO_DENSE`) the jump to dense is on offer
    at every rank, a greedy step rather than an exact optimum. Deterministic: ties are broken by the order
    of ``shapes``.
    """
    dense_total = sum(s.dense_params for s in shapes)
    budget = (1.0 - ratio) * dense_total
    ranks = {s.name: 1 for s in shapes}
    spent = sum(s.rank_cost for s in shapes)
    if spent > budget:
        raise BadInputError(f"--ratio {ratio:g} leaves less than rank 1 per linear")
    weights = {s.name: spectra[s.name].weight for s in shapes}
    tails = {s.name: _tails(spectra[s.name].eigvals) for s in shapes}
    bundle = (AUTO_DENSE_ENCODER if encoder else AUTO_DENSE) == "bundle"
    no_jump: set[str] = set()  # the jump to dense no longer fits the budget (it never will again)

    def key(s: LinearShape, k: int) -> tuple[float, bool]:
        """(best worth per parameter at rank k, whether that is the jump to dense)."""
        step = _worth(spectra[s.name], weights[s.name], s, k)
        if not bundle or s.name in no_jump or k + 1 >= dense_breakeven(s):
            return step, False
        jump = weights[s.name] * float(tails[s.name][k]) / (s.dense_params - k * s.rank_cost)
        return (jump, True) if jump > step else (step, False)

    heap = []
    for order, s in enumerate(shapes):
        if max_rank(s) > 1:
            heap.append((-key(s, 1)[0], order))
    heapq.heapify(heap)
    by_order = list(shapes)
    dense: set[str] = set()
    while heap:
        _, order = heapq.heappop(heap)
        s = by_order[order]
        k = ranks[s.name]
        if key(s, k)[1]:  # the jump to dense is the better buy
            if spent + s.dense_params - k * s.rank_cost <= budget:
                spent += s.dense_params - k * s.rank_cost
                dense.add(s.name)
                continue
            no_jump.add(s.name)  # does not fit: offer the next direction instead
            heapq.heappush(heap, (-key(s, k)[0], order))
            continue
        step = s.dense_params - k * s.rank_cost if k + 1 >= dense_breakeven(s) else s.rank_cost
        if spent + step > budget:
            continue  # this matrix's next direction does not fit; cheaper ones of others may
        spent += step
        ranks[s.name] = k + 1
        if k + 1 >= dense_breakeven(s) or k + 1 >= max_rank(s):
            if k + 1 >= dense_breakeven(s):
                dense.add(s.name)
            continue
        heapq.heappush(heap, (-key(s, k + 1)[0], order))
    return {n: r for n, r in ranks.items() if n not in dense}


def _tails(eigvals: torch.Tensor) -> torch.Tensor:
    """``tails[k] = Σ_{i ≥ k} λ_i`` (negative round-off clamped), with ``tails[n] = 0``."""
    lam = eigvals.clamp_min(0).double()
    return torch.cat([lam.flip(0).cumsum(0).flip(0), lam.new_zeros(1)])


def _worth(spec: LinearSpectrum, weight: float, s: LinearShape, k: int) -> float:
    """Damage avoided per parameter by keeping direction ``k`` (0-based) of ``s``."""
    lam = float(spec.eigvals[k]) if k < spec.eigvals.numel() else 0.0
    return weight * max(lam, 0.0) / s.rank_cost


ASVD_CANDIDATES = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
"""ASVD's candidate parameter ratios (the factors' parameters over the dense matrix's), as in its official
``calib_sensitivity_ppl``; a linear not chosen at any of them stays dense."""


def check_asvd_ratio(ratio: float) -> None:
    """ASVD's candidates keep at least ``min(ASVD_CANDIDATES)`` of each matrix: a larger ratio is refused."""
    if ratio > 1 - min(ASVD_CANDIDATES):
        raise BadInputError(
            f"--allocation asvd removes at most {1 - min(ASVD_CANDIDATES):g} of the parameters "
            f"(ASVD's smallest candidate keeps {min(ASVD_CANDIDATES):g}); got --ratio {ratio:g}"
        )


def allocate_asvd(
    shapes: Sequence[LinearShape], ratio: float, spectra: dict[str, LinearSpectrum]
) -> dict[str, int]:
    """ASVD's ``binary_search_truncation_rank``: every (linear, candidate) pair sorted by sensitivity,
    most damaging first; a threshold position ``t`` lets each linear take the smallest candidate among
    the pairs at or after ``t`` (the less damaging ones); the search finds the largest ``t`` — the fewest
    damaging pairs admitted — whose nominal kept parameters (``Σ numel · candidate``, as ASVD counts
    them) do not exceed ``1 − ratio`` of dense. (ASVD's own loop stops one step either side of that
    point; here the budget is never overshot.) Ranks: ASVD's ``⌊numel · candidate / (d_in + d_out)⌋``."""
    check_asvd_ratio(ratio)
    pairs = []
    for order, s in enumerate(shapes):
        found = spectra[s.name].sensitivity
        if found is None or found.numel() != len(ASVD_CANDIDATES):
            raise RomcompError(f"no ASVD sensitivity for {s.name}: the pre-pass ran without it")
        pairs += [(-float(v), order, c) for v, c in zip(found.tolist(), ASVD_CANDIDATES, strict=True)]
    pairs.sort()  # most damaging first; ties in the order of ``shapes``, then larger candidates first
    dense_total = sum(s.dense_params for s in shapes)

    def chosen(t: int) -> dict[int, float]:
        kept: dict[int, float] = {}
        for _, order, c in pairs[t:]:
            kept[order] = min(kept.get(order, 1.0), c)
        return kept

    def kept_fraction(t: int) -> float:
        kept = chosen(t)
        return sum(s.dense_params * kept.get(i, 1.0) for i, s in enumerate(shapes)) / dense_total

    low, high = 0, len(pairs)  # kept_fraction grows with t: find the largest t within the budget
    while low < high:
        mid = (low + high + 1) // 2
        if kept_fraction(mid) <= 1.0 - ratio:
            low = mid
        else:
            high = mid - 1
    ranks = {}
    for order, c in chosen(low).items():
        s = shapes[order]
        k = uniform_rank(s.d_in, s.d_out, 1.0 - c)
        if k is not None:
            ranks[s.name] = min(k, max_rank(s))
    return ranks
