"""Error-aware fitting (reduced-rank regression to the dense outputs): the math as pure functions."""

from __future__ import annotations

import pytest
import torch

from romcomp.compression.stats import accumulate, accumulate_cross
from romcomp.methods import error_aware, get_method
from romcomp.methods.base import CrossStats, InputStats


def cross_stats(x: torch.Tensor, x_hat: torch.Tensor) -> CrossStats:
    s = CrossStats.zeros(x.shape[-1])
    for a, b in zip(x.split(300), x_hat.split(300), strict=True):  # several batches
        accumulate_cross(s, a, b)
    return s


def outputs(f, x: torch.Tensor) -> torch.Tensor:
    y = (x.double() @ f.down.double().T) @ f.up.double().T
    return y + f.bias.double() if f.bias is not None else y


def test_cross_accumulation_equals_direct_products():
    torch.manual_seed(0)
    x, x_hat = torch.randn(900, 12), torch.randn(900, 12) + 0.5
    s = cross_stats(x, x_hat)
    torch.testing.assert_close(s.cross, x.double().T @ x_hat.double(), rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(s.xsum, x.double().sum(0), rtol=1e-9, atol=1e-9)
    assert s.count == 900 and s.hat.count == 900


def test_equals_local_rom_when_streams_are_identical():
    """x̂ = x: the regression target is the layer itself, so the fit is local ROM (bias folded in)."""
    torch.manual_seed(1)
    for bias in (False, True):
        w, b = torch.randn(20, 32), (torch.randn(20) if bias else None)
        x = torch.randn(1200, 32) * torch.logspace(0, -1.5, 32) + 0.2
        local = InputStats.zeros(32)
        accumulate(local, x)
        a = error_aware.decompose(w, b, cross_stats(x, x), 7)
        ref = get_method("rom")(w, b, local, 7)
        torch.testing.assert_close(outputs(a, x), outputs(ref, x), rtol=1e-5, atol=1e-5)


def _ridge_reference(w, b, x, x_hat, delta):
    """``argmin_M ‖W̃ x̃ − M x̃̂‖² / n + ‖(M − W̃) Δ^½‖²`` by least squares on stacked rows (``Δ`` = the
    ridge's diagonal): an independent route to the regression map, not the implementation's closed form."""
    n = x.shape[0]
    ones = torch.ones(n, 1, dtype=torch.float64)
    xt = torch.cat([x.double(), ones], 1) if b is not None else x.double()
    xh = torch.cat([x_hat.double(), ones], 1) if b is not None else x_hat.double()
    wt = torch.cat([w.double(), b.double()[:, None]], 1) if b is not None else w.double()
    root = torch.as_tensor(delta, dtype=torch.float64).expand(xh.shape[1]).sqrt()
    design = torch.cat([xh / n**0.5, torch.diag(root)], 0)
    target = torch.cat([xt @ wt.T / n**0.5, torch.diag(root) @ wt.T], 0)
    return torch.linalg.lstsq(design, target).solution.T


def test_regression_map_equals_an_independent_ridge_solve(monkeypatch):
    """The map ``M₀`` equals the ridge least-squares solution computed from the raw rows, for both ridge
    shapes, with and without a bias, where the dense stream is the compressed one distorted *and shifted*
    (so the bias column has a real correction to carry). Mutation-checked by hand: a flipped sign of the
    correction, a 5× scale of it, or a dropped shift column (``W (x̄ − μ̂)``) each fail by ≥ 10×."""
    torch.manual_seed(11)
    d, n = 24, 6000
    x_hat = torch.randn(n, d) * torch.logspace(0, -1, d) + 0.3
    x = x_hat @ (torch.eye(d) + 0.3 * torch.randn(d, d) / d**0.5).T + 0.5  # distorted and shifted
    stats = cross_stats(x, x_hat)
    assert not stats.identical
    for shape in ("mean", "channel"):
        monkeypatch.setattr(error_aware, "RIDGE", shape)
        for bias in (None, torch.randn(16)):
            w = torch.randn(16, d)
            m0 = error_aware.target_map(w, bias, cross_stats(x, x_hat))
            sigma = error_aware.augmented_sigma(stats.hat, bias is not None)
            delta = error_aware.ridge(sigma.diagonal())
            ref = _ridge_reference(w, bias, x, x_hat, delta)
            dense = error_aware.augmented_weight(w, bias)
            correction = (ref - dense).norm()
            assert correction > 0.05 * dense.norm()  # a real correction, and in the bias column too
            if bias is not None:
                assert (ref[:, -1] - dense[:, -1]).norm() > 0.05 * dense[:, -1].norm()
            assert (m0 - ref).norm() < 1e-3 * correction, (shape, bias is None)


def test_identical_streams_take_the_local_rom_shortcut():
    """Equal streams are detected from the values (the sums cannot tell: their GEMM and ``syrk`` round
    differently), the map is the dense weight bit for bit; one differing element turns it off."""
    torch.manual_seed(12)
    x = torch.randn(700, 20) + 0.1
    same = cross_stats(x, x.clone())
    assert same.identical
    w, b = torch.randn(8, 20), torch.randn(8)
    assert torch.equal(error_aware.target_map(w, b, same), error_aware.augmented_weight(w, b))
    bumped = x.clone()
    bumped[650, 3] += 1e-3  # in the last batch
    assert not cross_stats(x, bumped).identical
    assert not error_aware.target_map(w, b, cross_stats(x, bumped)).equal(error_aware.augmented_weight(w, b))


def test_recovers_a_planted_reduced_rank_regression(monkeypatch):
    """Dense inputs are a known linear distortion of the compressed ones, x = T x̂, and W T has rank k:
    the rank-k fit must reproduce the dense outputs exactly from x̂ (local ROM cannot: it fits W)."""
    monkeypatch.setattr(error_aware, "DAMP", 1e-10)
    torch.manual_seed(2)
    d, k = 24, 5
    w = torch.randn(16, k) @ torch.randn(k, d)  # rank k
    t = torch.eye(d) + 0.3 * torch.randn(d, d)
    x_hat = torch.randn(3000, d)
    x = x_hat @ t.T
    target = x.double() @ w.double().T
    fit = error_aware.decompose(w, None, cross_stats(x, x_hat), k)
    err = (outputs(fit, x_hat) - target).norm() / target.norm()
    assert err < 1e-4
    local = InputStats.zeros(d)
    accumulate(local, x_hat)
    naive = (outputs(get_method("rom")(w, None, local, k), x_hat) - target).norm() / target.norm()
    assert naive > 0.1  # the planted distortion is real: fitting W alone misses it


def test_beats_local_on_its_objective_and_damping_keeps_dense_weight():
    """On noisy paired data the error-aware fit has lower dense-output error than local ROM at the same
    rank; with an enormous ridge it falls back to local ROM (M₀ → W)."""
    torch.manual_seed(3)
    d, k = 32, 16
    w = torch.randn(24, d)
    x = torch.randn(4000, d) * torch.logspace(0, -1, d)
    drift = torch.eye(d) + 0.2 * torch.randn(d, d) / d**0.5  # systematic upstream error plus noise
    x_hat = x @ drift.T + 0.05 * torch.randn(4000, d) * x.std(0)
    target = x.double() @ w.double().T
    stats = cross_stats(x, x_hat)
    aware = error_aware.decompose(w, None, stats, k)
    local = InputStats.zeros(d)
    accumulate(local, x_hat)
    naive = get_method("rom")(w, None, local, k)
    e_aware = (outputs(aware, x_hat) - target).norm()
    e_naive = (outputs(naive, x_hat) - target).norm()
    assert e_aware < 0.9 * e_naive
    m0 = error_aware.target_map(w, None, stats)
    assert not torch.allclose(m0, w.double(), atol=1e-3)
    old = error_aware.DAMP
    try:
        error_aware.DAMP = 1e12
        torch.testing.assert_close(error_aware.target_map(w, None, stats), w.double(), rtol=1e-6, atol=1e-6)
    finally:
        error_aware.DAMP = old


WORKSPACE_PROBE = """
import torch
from romcomp.compression.memory import ModelDims, _workspace, proc_status_bytes, resident_bytes
from romcomp.methods import error_aware
from romcomp.methods.base import CrossStats
d_in, d_out = 3000, 1000
torch.manual_seed(0)
s = CrossStats.zeros(d_in)
a = torch.randn(d_in, 64, dtype=torch.float64)
torch.mm(a, a.T, out=s.hat.xtx)  # no temporaries: the high-water mark is the RSS before the fit
s.hat.xtx.diagonal().add_(1.0)
s.cross.copy_(s.hat.xtx).diagonal().add_(0.1)
s.hat.count = 1
w = torch.randn(d_out, d_in)
del a
before = resident_bytes()[0]
f = error_aware.decompose(w, None, s, 300)
used = proc_status_bytes("VmHWM")[0] - before  # this process image's high-water mark
dims = ModelDims(1, 1, 1, 1, 1, ((d_in, d_out),), (d_in,), (d_in,))
print(used, _workspace(dims, cross=True))
"""


def test_fit_workspace_stays_within_the_memory_plan():
    """The error-aware fit of a wide-input linear (down_proj) holds at most the two (d_in+1)² squares and
    four d_out-row products the memory plan counts: a fit that materialized the cross moment, Σ and the
    root at once (three squares: 1.8× the squares here, as before the plan was tightened) fails."""
    import subprocess
    import sys

    # VmHWM, not ru_maxrss: Linux carries the forking parent's high-water mark across exec into the
    # child's ru_maxrss, so after a big test in this process the latter reads hundreds of MB too high.
    # A fixed mmap threshold: glibc's adaptive one otherwise serves some 24 MB blocks from the heap after
    # the first frees, and the high-water mark then varies by ±40 MB between identical runs
    env = {"OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", WORKSPACE_PROBE], capture_output=True, text=True, env=env,
                         check=True).stdout.split()  # fmt: skip
    used, counted = int(out[0]), int(out[1])
    assert 0.5 * counted < used <= counted, (used, counted)


def _out_err(fit, x_hat: torch.Tensor, target: torch.Tensor) -> float:
    return float((outputs(fit, x_hat) - target).pow(2).sum() / target.pow(2).sum())


def test_output_side_fit_picks_the_subspace_of_the_dense_outputs():
    """A linear narrower at its output (down_proj) fits from paired output moments: ``y = W x + b`` of
    the dense stream against ``ŷ = W x̂ + b`` of the compressed one. The chosen ``V_k`` must reproduce
    the *dense* outputs better than ROM on either stream alone, and equal ROM by output when the streams
    coincide (a wrong sign in ``S = D + Dᵀ + Σ_ŷ`` or a dropped term fails one of the two)."""
    torch.manual_seed(3)
    d_in, d_out, k = 40, 12, 4
    for bias in (False, True):
        w, b = torch.randn(d_out, d_in), (torch.randn(d_out) if bias else None)
        x_hat = torch.randn(4000, d_in) * torch.logspace(0, -1, d_in)
        mix = torch.randn(d_in, d_in) * 0.6
        x = x_hat + x_hat @ mix.T  # the dense stream: the compressed one plus a large correlated error
        y = x.double() @ w.double().T + (b.double() if bias else 0)
        y_hat = x_hat.double() @ w.double().T + (b.double() if bias else 0)
        fit = error_aware.decompose_outputs(w, b, cross_stats(y.float(), y_hat.float()), k)
        rom = get_method("rom").decompose_outputs
        own = InputStats.zeros(d_out)
        accumulate(own, y_hat.float())
        dense = InputStats.zeros(d_out)
        accumulate(dense, y.float())
        err = _out_err(fit, x_hat, y)
        assert err < 0.97 * _out_err(rom(w, b, own, k), x_hat, y)
        assert err < 0.97 * _out_err(rom(w, b, dense, k), x_hat, y)
        same = error_aware.decompose_outputs(w, b, cross_stats(y_hat.float(), y_hat.float()), k)
        torch.testing.assert_close(
            outputs(same, x_hat), outputs(rom(w, b, own, k), x_hat), rtol=1e-4, atol=1e-4
        )


@pytest.mark.parametrize("shape", ["mean", "channel"])
def test_float32_correction_matches_float64_with_massive_activations(monkeypatch, shape):
    """The regression's correction ``W D (Σ̂ + δI)⁻¹`` in float32 (``SOLVE_DTYPE``) stays within 1e-3 of
    the float64 one, relative to the correction itself, with two massive channels (100× the median) that
    stretch Σ̂'s spectrum; with and without a bias column."""
    monkeypatch.setattr(error_aware, "RIDGE", shape)
    torch.manual_seed(4)
    d = 256
    scale = torch.logspace(0, -1, d)
    scale[[7, 100]] = 300.0  # 10⁵× the median variance, as SmolLM2's residual stream has
    x_hat = torch.randn(6000, d) * scale
    x = x_hat + x_hat @ (0.3 * torch.randn(d, d) / d**0.5).T + 0.05  # a correlated upstream error
    for bias in (None, torch.randn(48)):
        w = torch.randn(48, d)
        maps = {}
        for dtype in (torch.float32, torch.float64):
            monkeypatch.setattr(error_aware, "SOLVE_DTYPE", dtype)
            maps[dtype] = error_aware.target_map(w, bias, cross_stats(x, x_hat))
        dense = error_aware.augmented_weight(w, bias)
        correction = (maps[torch.float64] - dense).norm()
        assert correction > 0.02 * dense.norm()  # a real correction to compare
        assert (maps[torch.float32] - maps[torch.float64]).norm() < 1e-3 * correction


def _paired_with_outputs(y: torch.Tensor, x_hat: torch.Tensor) -> CrossStats:
    s = CrossStats.zeros(x_hat.shape[-1], y.shape[-1])
    for a, b in zip(y.split(700), x_hat.split(700), strict=True):
        accumulate_cross(s, a, b)
    return s


def test_dense_outputs_pairing_gives_the_input_pairing_fit():
    """A linear narrower at its output (down_proj) pairs the dense *outputs* ``y = W x + b``, as the
    forward computes them in float32, with the compressed inputs: the regression map must be the one
    the paired inputs give (``W D = E[y x̂ᵀ] − b μ̂ᵀ − W Σ̂``), within 2e-3 of the correction, with a bias
    and without, with two massive channels; and it must differ from the dense weight (a real
    correction). Dropping ``b μ̂ᵀ`` or the shift column fails the bias case, a sign error both."""
    torch.manual_seed(5)
    d_in, d_out = 192, 64
    scale = torch.logspace(0, -1, d_in)
    scale[[3, 90]] = 30.0
    x_hat = torch.randn(5000, d_in) * scale + 0.1
    x = x_hat + x_hat @ (0.3 * torch.randn(d_in, d_in) / d_in**0.5).T + 0.05
    for bias in (None, torch.randn(d_out)):
        w = torch.randn(d_out, d_in)
        y = torch.nn.functional.linear(x, w, bias)  # the dense forward's outputs, float32
        by_inputs = error_aware.target_map(w, bias, cross_stats(x, x_hat))
        by_outputs = error_aware.target_map(w, bias, _paired_with_outputs(y, x_hat))
        correction = (by_inputs - error_aware.augmented_weight(w, bias)).norm()
        assert correction > 0.02 * by_inputs.norm()
        assert (by_outputs - by_inputs).norm() < 2e-3 * correction
        f_in = error_aware.decompose(w, bias, cross_stats(x, x_hat), 16)
        f_out = error_aware.decompose(w, bias, _paired_with_outputs(y, x_hat), 16)
        gap = (outputs(f_out, x_hat) - outputs(f_in, x_hat)).norm() / outputs(f_in, x_hat).norm()
        assert gap < 1e-4, gap
