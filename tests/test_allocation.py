"""Rank allocation: budgets, determinism, where the parameters go (pure functions, planted spectra)."""

from __future__ import annotations

import pytest
import torch

from romcomp.compression import allocation
from romcomp.compression.allocation import (
    ASVD_CANDIDATES,
    LinearSpectrum,
    allocate_asvd,
    allocate_auto,
    allocate_last_n,
    allocate_v2,
    dense_breakeven,
)
from romcomp.compression.ranks import LinearShape, linear_params
from romcomp.errors import BadInputError, RomcompError

KINDS = {"q": (64, 64), "o": (64, 64), "up": (64, 160), "down": (160, 64)}


def model_shapes(blocks: int = 4) -> list[LinearShape]:
    return [LinearShape(f"layers.{i}.{k}", *dims) for i in range(blocks) for k, dims in KINDS.items()]


def spectrum(n: int, decay: float, sublayer: float = 1.0) -> LinearSpectrum:
    return LinearSpectrum(torch.logspace(0, -decay, n, dtype=torch.float64), sublayer, 1000)


def spectra_for(shapes: list[LinearShape], seed: int = 0) -> dict[str, LinearSpectrum]:
    g = torch.Generator().manual_seed(seed)
    return {
        s.name: spectrum(min(s.d_in, s.d_out), float(torch.rand(1, generator=g)) * 4 + 0.5) for s in shapes
    }


@pytest.mark.parametrize("mode", ["step", "bundle"])
@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.3, 0.4, 0.6])
def test_auto_spends_the_budget_exactly_within_one_rank_step(ratio, mode, monkeypatch):
    monkeypatch.setattr(allocation, "AUTO_DENSE", mode)
    shapes = model_shapes()
    ranks = allocate_auto(shapes, ratio, spectra_for(shapes))
    dense, kept = linear_params(shapes, ranks)
    assert kept <= (1 - ratio) * dense
    assert kept > (1 - ratio) * dense - max(s.d_in + s.d_out for s in shapes)
    for s in shapes:  # never a rank costlier than dense, never beyond the outputs' rank
        if s.name in ranks:
            assert 1 <= ranks[s.name] < dense_breakeven(s)


def test_auto_is_deterministic_and_follows_the_spectra():
    shapes = model_shapes()
    spectra = spectra_for(shapes, seed=3)
    assert allocate_auto(shapes, 0.3, spectra) == allocate_auto(shapes, 0.3, dict(reversed(spectra.items())))
    # planted: one matrix with a flat (full-rank) spectrum, one with a single dominant direction
    spectra["layers.1.up"] = LinearSpectrum(torch.ones(64, dtype=torch.float64), 1.0, 1000)
    low = torch.full((64,), 1e-9, dtype=torch.float64)
    low[:2] = 1.0
    spectra["layers.2.up"] = LinearSpectrum(low, 1.0, 1000)
    ranks = allocate_auto(shapes, 0.3, spectra)
    assert "layers.1.up" not in ranks  # left dense
    assert ranks["layers.2.up"] <= 3  # compressed to its planted rank


def test_auto_bundle_prices_the_jump_to_dense_by_everything_it_recovers(monkeypatch):
    """A matrix with a flat spectrum recovers its whole tail by going dense, for a little more than the
    factors it would otherwise keep. Priced one direction at a time (``step``) it stops short of
    break-even — factors that cost nearly the dense matrix and drop part of its spectrum; ``bundle`` makes
    it dense and takes the parameters from the steep matrices instead."""
    shapes = model_shapes()
    spectra = {s.name: spectrum(min(s.d_in, s.d_out), 1.0) for s in shapes}
    flat = "layers.1.up"
    spectra[flat] = LinearSpectrum(torch.full((64,), 0.02, dtype=torch.float64), 1.0, 1000)
    monkeypatch.setattr(allocation, "AUTO_DENSE", "step")
    by_step = allocate_auto(shapes, 0.3, spectra)
    assert flat in by_step and by_step[flat] > dense_breakeven(shapes[6]) // 2  # factored, and large
    monkeypatch.setattr(allocation, "AUTO_DENSE", "bundle")
    by_bundle = allocate_auto(shapes, 0.3, spectra)
    assert flat not in by_bundle  # dense
    dense, kept = linear_params(shapes, by_bundle)
    assert (1 - 0.3) * dense - max(s.d_in + s.d_out for s in shapes) < kept <= (1 - 0.3) * dense


def test_auto_weighs_damage_to_the_residual_stream():
    """Same spectra, but one block's sublayer writes 100x more into the residual: it keeps more rank."""
    shapes = model_shapes()
    spectra = {s.name: spectrum(min(s.d_in, s.d_out), 3.0) for s in shapes}
    spectra["layers.3.down"] = spectrum(64, 3.0, sublayer=100.0)
    ranks = allocate_auto(shapes, 0.4, spectra)
    assert ranks.get("layers.3.down", 64) > ranks["layers.0.down"]


def test_auto_refuses_a_ratio_that_leaves_less_than_rank_one():
    with pytest.raises(BadInputError):
        allocate_auto(model_shapes(), 0.999, spectra_for(model_shapes()))


def test_v2_gives_lossier_matrices_more_rank_and_keeps_each_type_near_the_ratio():
    shapes = model_shapes()
    spectra = {s.name: spectrum(min(s.d_in, s.d_out), 4.0) for s in shapes}
    spectra["layers.2.q"] = spectrum(64, 0.3)  # slow decay: large truncation loss
    ranks = allocate_v2(shapes, 0.3, spectra)
    assert ranks["layers.2.q"] > ranks["layers.0.q"]
    dense, kept = linear_params(shapes, ranks)
    assert abs((1 - kept / dense) - 0.3) < 0.05


def test_last_n_compresses_only_the_last_blocks_to_the_same_total():
    shapes = model_shapes(8)
    block_of = {s.name: int(s.name.split(".")[1]) for s in shapes}
    ranks = allocate_last_n(shapes, 0.2, 8, 4, block_of)
    assert {block_of[n] for n in ranks} == {4, 5, 6, 7}
    dense, kept = linear_params(shapes, ranks)
    assert 0.2 <= 1 - kept / dense < 0.21  # floor of each rank: at most one rank step over
    with pytest.raises(BadInputError):
        allocate_last_n(shapes, 0.6, 8, 2, block_of)  # 2 of 8 blocks cannot remove 60% of all


def test_v2_spends_the_share_a_capped_matrix_cannot_take():
    """One matrix per type with a negligible truncation loss asks for more than all of itself; the cap
    keeps 1 − V2_CAP of it and the rest of the type's budget goes to the others: the total removed is the
    ratio within the rounding (one rank step per matrix), where dropping the excess removed ~0.18 less."""
    shapes = model_shapes()
    huge = {s.name: LinearSpectrum(torch.full((min(s.d_in, s.d_out),), 1e80, dtype=torch.float64), 1.0, 1000)
            for s in shapes}  # fmt: skip
    for kind, (d_in, d_out) in KINDS.items():
        tiny = torch.full((min(d_in, d_out),), 1e-12, dtype=torch.float64)
        huge[f"layers.0.{kind}"] = LinearSpectrum(tiny, 1.0, 1000)
    ranks = allocate_v2(shapes, 0.5, huge)
    dense, kept = linear_params(shapes, ranks)
    step = sum(s.d_in + s.d_out for s in shapes)
    assert 0.5 * dense <= dense - kept <= 0.5 * dense + step
    assert ranks["layers.0.q"] == 1  # capped: the most the type's weights could give it


def test_last_n_counts_parameters_when_blocks_differ_in_size():
    """The last blocks four times as large (experts): their per-matrix ratio comes from their share of the
    parameters, not from the block count (which would remove 0.64 instead of 0.4 with the last four)."""
    shapes = [LinearShape(s.name, s.d_in, s.d_out, count=4 if int(s.name.split(".")[1]) >= 4 else 1)
              for s in model_shapes(8)]  # fmt: skip
    block_of = {s.name: int(s.name.split(".")[1]) for s in shapes}
    for last_n in (3, 4, None):
        ranks = allocate_last_n(shapes, 0.4, 8, last_n, block_of)
        dense, kept = linear_params(shapes, ranks)
        assert 0.4 <= 1 - kept / dense < 0.42, (last_n, 1 - kept / dense)
    assert {block_of[n] for n in allocate_last_n(shapes, 0.4, 8, None, block_of)} == {4, 5, 6, 7}


def planted_sensitivity(shapes: list[LinearShape], scale: dict[str, float]) -> dict[str, LinearSpectrum]:
    """Damage ``scale × (1 − candidate)`` at each of ASVD's candidates (more removed, more damage)."""
    spectra = spectra_for(shapes)
    for s in shapes:
        damage = [scale[s.name] * (1 - c) for c in ASVD_CANDIDATES]
        spectra[s.name].sensitivity = torch.tensor(damage, dtype=torch.float64)
    return spectra


@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.3, 0.5])
def test_asvd_search_meets_the_budget_and_compresses_the_least_sensitive_layers_most(ratio):
    shapes = model_shapes()
    g = torch.Generator().manual_seed(1)
    scale = {s.name: float(torch.rand(1, generator=g)) * 10 + 0.1 for s in shapes}
    ranks = allocate_asvd(shapes, ratio, planted_sensitivity(shapes, scale))
    dense, kept = linear_params(shapes, ranks)
    assert kept <= (1 - ratio) * dense
    assert kept > (1 - ratio - 0.1) * dense  # within one candidate step of one matrix kind, not far below
    # a threshold rule: every linear sits at the smallest candidate whose damage is within one common bound
    chosen = {}
    for s in shapes:
        candidates = [c for c in ASVD_CANDIDATES if s.name in ranks and ranks[s.name] == _rank(s, c)]
        chosen[s.name] = max(candidates) if candidates else 1.0
    admitted = [scale[n] * (1 - c) for n, c in chosen.items() if c < 1]
    bound = max(admitted)
    for s in shapes:  # nobody stops short of a candidate the bound admits
        smaller = [c for c in ASVD_CANDIDATES if c < chosen[s.name] and scale[s.name] * (1 - c) < bound]
        assert not smaller, (s.name, chosen[s.name], smaller)
    # same shape, less sensitive: never keeps more
    for a in shapes:
        for b in shapes:
            if (
                KINDS[a.name.rsplit(".", 1)[1]] == KINDS[b.name.rsplit(".", 1)[1]]
                and scale[a.name] < scale[b.name]
            ):
                assert chosen[a.name] <= chosen[b.name]


def _rank(s: LinearShape, candidate: float) -> int | None:
    from romcomp.compression.ranks import uniform_rank

    return uniform_rank(s.d_in, s.d_out, 1 - candidate)


def test_asvd_search_refuses_beyond_its_smallest_candidate_and_without_sensitivities():
    shapes = model_shapes()
    with pytest.raises(BadInputError, match="at most 0.6"):
        allocate_asvd(shapes, 0.7, planted_sensitivity(shapes, dict.fromkeys((s.name for s in shapes), 1.0)))
    with pytest.raises(RomcompError, match="no ASVD sensitivity"):
        allocate_asvd(shapes, 0.3, spectra_for(shapes))
