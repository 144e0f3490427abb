"""Known answers of the peer methods (issue 11) on planted weights and statistics: no model needed.

ASVD with every channel scale equal is plain SVD, and otherwise the best rank-k fit in its own scaled norm
(Eckart–Young: no other rank-k matrix, SVD's or ROM's, does better there); SVD-LLM is ROM's projection at
the same rank (both are the top-k subspace of ``W S``), up to its float32 steps, and keeps its official
damping when ``X Xᵀ`` is singular.
"""

from __future__ import annotations

import pytest
import torch

from romcomp.compression.stats import accumulate
from romcomp.methods import METHODS, GradStats, InputStats, asvd, fwsvd, lpaf, rom, svd, svd_llm

D_IN, D_OUT, RANK = 48, 40, 12


def planted(tokens: int = 2000, seed: int = 0, dead: int = 0) -> tuple[torch.Tensor, InputStats]:
    """A weight and the statistics of correlated inputs with channel magnitudes spread over 100x; the last
    ``dead`` channels are always zero (a singular ``X Xᵀ``)."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(D_OUT, D_IN, generator=g)
    mix = torch.randn(D_IN, D_IN, generator=g) / D_IN**0.5
    x = (torch.randn(tokens, D_IN, generator=g) @ mix) * torch.logspace(0, 2, D_IN)
    if dead:
        x[:, -dead:] = 0
    stats = InputStats.zeros(D_IN)
    accumulate(stats, x)
    return weight, stats


def product(f) -> torch.Tensor:
    return f.up.double() @ f.down.double()


def test_the_registry_has_every_method_of_the_cli() -> None:
    assert {"rom", "svd", "svd-llm", "asvd", "fwsvd", "lpaf"} <= set(METHODS)


def test_asvd_with_equal_channel_scales_is_plain_svd() -> None:
    weight, stats = planted()
    stats.abs_sum = torch.full((D_IN,), 3.0 * stats.count, dtype=torch.float64)  # mean |x| = 3 everywhere
    got, plain = asvd.decompose(weight, None, stats, RANK), svd.decompose(weight, None, stats, RANK)
    assert (product(got) - product(plain)).norm() < 1e-6 * product(plain).norm()


def test_asvd_is_the_best_rank_k_fit_in_its_scaled_norm_and_differs_from_svd() -> None:
    weight, stats = planted()
    scale = asvd.channel_scale(stats)
    assert float(scale.max() / scale.min()) > 5  # the planted magnitudes reach the scales

    def scaled_error(f) -> float:
        return float(((weight.double() - product(f)) * scale[None, :]).norm())

    ours = scaled_error(asvd.decompose(weight, None, stats, RANK))
    for other in (svd.decompose, rom.decompose):
        assert ours < 0.95 * scaled_error(other(weight, None, stats, RANK)), other.__module__


def test_asvd_scale_is_the_mean_magnitude_to_the_power_alpha() -> None:
    x = torch.tensor([[1.0, -4.0], [-3.0, 0.0]])
    stats = InputStats.zeros(2)
    accumulate(stats, x)
    expected = torch.tensor([2.0, 2.0], dtype=torch.float64).sqrt() + 1e-6  # mean |x| = 2, 2; α = 0.5
    torch.testing.assert_close(asvd.channel_scale(stats), expected)


def test_svd_llm_is_roms_projection_at_the_same_rank() -> None:
    """``U_k Σ_k V_kᵀ S⁻¹ = U_k U_kᵀ W``: the two products agree to float32 round-off (relative to what
    truncation discards, which is ~10⁵ times larger)."""
    weight, stats = planted()
    ours, reference = svd_llm.decompose(weight, None, stats, RANK), rom.decompose(weight, None, stats, RANK)
    discarded = (weight.double() - product(reference)).norm()
    assert (product(ours) - product(reference)).norm() < 1e-4 * discarded
    assert ours.notes == [] and ours.rank == RANK


def test_svd_llm_damps_a_singular_input_moment_as_the_official_code() -> None:
    weight, stats = planted(dead=3)
    f = svd_llm.decompose(weight, None, stats, RANK)
    assert torch.isfinite(f.down).all() and torch.isfinite(f.up).all()
    assert len(f.notes) == 1 and "not positive definite" in f.notes[0]
    # the dead channels carry no data: the fit reproduces the outputs on the inputs that occur
    _, live = planted(dead=3)
    sigma = live.second_moment
    err = ((weight.double() - product(f)) @ sigma @ (weight.double() - product(f)).T).trace()
    ref = rom.decompose(weight, None, live, RANK)
    err_rom = ((weight.double() - product(ref)) @ sigma @ (weight.double() - product(ref)).T).trace()
    assert float(err) < 1.01 * float(err_rom)


@pytest.mark.parametrize("name", ["svd-llm", "asvd"])
def test_peer_methods_keep_the_bias(name: str) -> None:
    weight, stats = planted()
    bias = torch.arange(D_OUT, dtype=torch.float32)
    f = METHODS[name](weight, bias, stats, RANK)
    assert torch.equal(f.bias, bias)


def test_fwsvd_with_equal_importances_is_plain_svd_and_otherwise_the_best_weighted_fit() -> None:
    weight, stats = planted()
    equal = GradStats(fisher_in=torch.full((D_IN,), 4.0, dtype=torch.float64))
    got, plain = fwsvd.decompose(weight, None, equal, RANK), svd.decompose(weight, None, stats, RANK)
    assert (product(got) - product(plain)).norm() < 1e-6 * product(plain).norm()
    fisher = torch.logspace(-2, 2, D_IN, dtype=torch.float64)  # importances spread over 10⁴
    ours = fwsvd.decompose(weight, None, GradStats(fisher_in=fisher), RANK)

    def weighted_error(f) -> float:
        return float(((weight.double() - product(f)) * fisher.sqrt()[None, :]).norm())

    assert weighted_error(ours) < 0.95 * weighted_error(plain)


def test_lpaf_at_density_one_is_its_factorization_alone_the_truncated_svd() -> None:
    weight, stats = planted()
    grad = torch.randn(D_OUT, D_IN, generator=torch.Generator().manual_seed(3))
    got = lpaf.decompose(weight, None, GradStats(torch.ones(D_IN), grad), RANK, density=1.0)
    plain = svd.decompose(weight, None, stats, RANK)
    assert (product(got) - product(plain)).norm() < 1e-5 * product(plain).norm()


def test_lpaf_prunes_the_least_salient_entries_and_fits_the_kept_ones_better_than_svd() -> None:
    weight, stats = planted()
    grad = torch.randn(D_OUT, D_IN, generator=torch.Generator().manual_seed(3))
    mask = lpaf.saliency_mask(weight, grad, 0.5)
    assert int(mask.sum()) == D_OUT * D_IN // 2
    saliency = (weight * grad).abs()
    assert float(saliency[mask].min()) >= float(saliency[~mask].max())  # first-order: |W ⊙ ∂L/∂W|
    ours = lpaf.decompose(weight, None, GradStats(torch.ones(D_IN), grad), RANK, density=0.5)
    plain = svd.decompose(weight, None, stats, RANK)

    def kept_error(f) -> float:
        return float(((weight.double() - product(f)) * mask).norm())

    assert kept_error(ours) < 0.9 * kept_error(plain)
