"""The float32 eigensolver's range guard (``linalg.FLOAT32_TAIL_FLOOR``) on planted spectra.

Massive activations make one or a few output directions 1e8-1e10 x the rest. float32's round-off
(~1e-7·λ_max) then swamps the whole tail, so the kept top-k subspace is arbitrary in it. The guard must
notice (a note), redo the solve in float64 (same tail energy as a float64 reference), and stay out of the
way on ordinary spectra. Energies are compared on the *tail* (everything below the spikes): the total is
the spikes' to ~1e-9 and would hide any tail error.
"""

from __future__ import annotations

import pytest
import torch

from romcomp.methods import linalg
from romcomp.methods.linalg import top_eigvecs, top_left_singular

NOTE = "float32 eigensolver could not resolve the kept tail"


def orthogonal(n: int, seed: int) -> torch.Tensor:
    q, r = torch.linalg.qr(
        torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    )
    return q * torch.sign(torch.diagonal(r))


def planted(
    n: int, spikes: int, ratio: float, alpha: float = 1.0, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A, B, λ)``: a PSD ``A = B Bᵀ`` in a random basis with descending spectrum ``λ``: ``spikes``
    eigenvalues ``ratio`` x the largest of a power-law tail ``i^-alpha``."""
    tail = torch.arange(1, n - spikes + 1, dtype=torch.float64) ** -alpha
    lam = torch.cat([ratio * torch.linspace(1.0, 0.5, spikes, dtype=torch.float64), tail])
    b = orthogonal(n, seed) * lam.sqrt()
    a = b @ b.T
    return (a + a.T) / 2, b, lam


def tail_energy(b: torch.Tensor, v: torch.Tensor, lam: torch.Tensor, spikes: int) -> float:
    """Tail energy captured by span(v) of ``A = B Bᵀ``: the tail's total minus what the projection misses,
    ``‖(I - QQᵀ) B‖²`` (no cancellation against the spikes' 1e10, unlike ``trace(Vᵀ A V)``)."""
    q, _ = torch.linalg.qr(v.double())
    missed = b - q @ (q.T @ b)
    return float(lam[spikes:].sum() - (missed * missed).sum())


def reference_tail_energy(a: torch.Tensor, b: torch.Tensor, lam: torch.Tensor, spikes: int, k: int) -> float:
    """The same for float64 ``torch.linalg.eigh``'s top-k eigenvectors."""
    _, evecs = torch.linalg.eigh(a)
    return tail_energy(b, evecs[:, -k:], lam, spikes)


@pytest.mark.parametrize("spikes,ratio", [(1, 1e8), (3, 1e10)])
def test_planted_spike_is_solved_in_float64(monkeypatch, spikes, ratio):
    n, k = 256, 64  # k covers the spikes and part of the power-law tail
    a, b, lam = planted(n, spikes, ratio)
    ref = reference_tail_energy(a, b, lam, spikes, k)
    assert ref == pytest.approx(float(lam[spikes:k].sum()), rel=1e-9)  # the reference is the optimum

    notes: list[str] = []
    guarded = tail_energy(b, top_eigvecs(a, k, notes=notes), lam, spikes)
    assert len(notes) == 1 and notes[0].startswith(NOTE), notes  # (a) the guard triggered, once
    assert "solved in float64" in notes[0]
    assert abs(guarded - ref) <= 1e-6 * ref  # (b) float64's tail energy

    monkeypatch.setattr(linalg, "FLOAT32_TAIL_FLOOR", 0.0)  # the guard off: float32 alone
    unguarded_notes: list[str] = []
    unguarded = tail_energy(b, top_eigvecs(a, k, notes=unguarded_notes), lam, spikes)
    assert not unguarded_notes
    assert abs(unguarded - ref) > 1e-2 * ref, (unguarded, ref)  # measurably worse: the test can fail


def test_without_notes_the_guard_still_applies():
    """Existing callers (``decompose_outputs``) pass no ``notes``: same float64 answer, nothing recorded."""
    n, k, spikes = 256, 48, 1
    a, b, lam = planted(n, spikes, 1e9, seed=1)
    ref = reference_tail_energy(a, b, lam, spikes, k)
    assert abs(tail_energy(b, top_eigvecs(a, k), lam, spikes) - ref) <= 1e-6 * ref
    upper_only = torch.triu(a)  # the ``upper`` route reads one triangle, as for syrk's accumulators
    assert abs(tail_energy(b, top_eigvecs(upper_only, k, upper=True), lam, spikes) - ref) <= 1e-6 * ref


def spy_on_solver(monkeypatch) -> list[torch.dtype]:
    """Record the precision of every eigensolve."""
    calls: list[torch.dtype] = []
    solve = linalg._syevd

    def spy(sym, upper, dtype):
        calls.append(dtype)
        return solve(sym, upper, dtype)

    monkeypatch.setattr(linalg, "_syevd", spy)
    return calls


def test_benign_spectrum_stays_float32(monkeypatch):
    """(c) A power law without spikes (λ_k/λ_max = 1/64 here): one float32 solve, no note, same energy."""
    calls = spy_on_solver(monkeypatch)
    n, k = 256, 64
    a, b, lam = planted(n, 0, 1.0, seed=2)
    notes: list[str] = []
    v = top_eigvecs(a, k, notes=notes)
    assert not notes and calls == [torch.float32]
    ref = reference_tail_energy(a, b, lam, 0, k)
    assert abs(tail_energy(b, v, lam, 0) - ref) <= 1e-6 * ref  # float32 is enough here

    calls.clear()
    spiked, _, _ = planted(n, 1, 1e9, seed=2)
    top_eigvecs(spiked, n, notes=notes)  # keeping every direction needs no tail resolved
    assert not notes and calls == [torch.float32]


@pytest.mark.parametrize("margin,triggers", [(10.0, False), (0.1, True)])
def test_floor_is_relative_to_largest_eigenvalue(monkeypatch, margin, triggers):
    """λ_k/λ_max 10x above the floor keeps float32; 10x below redoes the solve in float64."""
    calls = spy_on_solver(monkeypatch)
    n, k = 128, 32
    target = margin * linalg.FLOAT32_TAIL_FLOOR
    alpha = -torch.log(torch.tensor(target)).item() / torch.log(torch.tensor(float(k))).item()
    a, _, lam = planted(n, 0, 1.0, alpha=alpha, seed=3)  # λ_k/λ_1 = k^-alpha = target
    assert float(lam[k - 1] / lam[0]) == pytest.approx(target)
    notes: list[str] = []
    top_eigvecs(a, k, notes=notes)
    assert bool(notes) == triggers
    assert calls == ([torch.float32, torch.float64] if triggers else [torch.float32])


@pytest.mark.parametrize("d_out,d_in", [(96, 256), (256, 96)])  # wide: M Mᵀ; tall: Mᵀ M mapped back
def test_top_left_singular_passes_the_note_through(monkeypatch, d_out, d_in):
    """(d) A whitened weight ``M`` with one singular value 3e4 x the rest (λ ratio 1e9): the note comes
    back, and the basis keeps the float64 reference's tail energy of the float32 ``M`` it was given."""
    gen = torch.Generator().manual_seed(4)
    r = min(d_out, d_in)
    left = torch.linalg.qr(torch.randn(d_out, r, generator=gen, dtype=torch.float64))[0]
    right = torch.linalg.qr(torch.randn(d_in, r, generator=gen, dtype=torch.float64))[0]
    s = torch.arange(1, r + 1, dtype=torch.float64) ** -0.5
    s[0] = 3e4
    m = (left * s) @ right.T
    k = 40

    b = m.float().double()  # what the solver sees: M rounded to EIGH_DTYPE (float32)
    lam = torch.linalg.svdvals(b) ** 2  # the output covariance B Bᵀ's nonzero spectrum
    ref = reference_tail_energy(b @ b.T, b, lam, 1, k)

    basis, notes = top_left_singular(m, k)
    assert basis.shape == (d_out, k)
    assert sum(n.startswith(NOTE) for n in notes) == 1, notes
    torch.testing.assert_close(basis.T @ basis, torch.eye(k, dtype=torch.float64), atol=1e-10, rtol=0)
    assert abs(tail_energy(b, basis, lam, 1) - ref) <= 1e-6 * ref

    monkeypatch.setattr(linalg, "FLOAT32_TAIL_FLOOR", 0.0)
    basis32, notes32 = top_left_singular(m, k)
    assert not any(n.startswith(NOTE) for n in notes32)
    assert abs(tail_energy(b, basis32, lam, 1) - ref) > 1e-2 * ref
