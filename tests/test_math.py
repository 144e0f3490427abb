"""The decomposition math as pure functions: exactness at full rank, optimality, guards."""

from __future__ import annotations

import pytest
import torch

from romcomp.compression.ranks import LinearShape, allocate_uniform, linear_params, uniform_rank
from romcomp.compression.stats import accumulate
from romcomp.methods import get_method, linalg
from romcomp.methods.base import InputStats
from romcomp.methods.linalg import psd_root, top_left_singular


def stats_of(x: torch.Tensor) -> InputStats:
    s = InputStats.zeros(x.shape[-1])
    accumulate(s, x)
    return s


def test_accumulation_equals_direct_computation():
    torch.manual_seed(0)
    x = torch.randn(3, 50, 16)
    s = InputStats.zeros(16)
    for chunk in x:  # three batches
        accumulate(s, chunk)
    flat = x.reshape(-1, 16).double()
    torch.testing.assert_close(s.second_moment * s.count, flat.T @ flat, rtol=1e-6, atol=1e-5)
    assert (torch.tril(s.xtx, diagonal=-1) == 0).all()  # syrk fills one triangle; the other is never read
    torch.testing.assert_close(s.mean, flat.mean(0), rtol=1e-12, atol=1e-12)
    assert s.count == 150


def test_float32_chunk_products_cost_nothing():
    """The float32-per-chunk / float64-sum covariance gives the same ROM factors as all-float64."""
    torch.manual_seed(5)
    x = torch.randn(8192, 96) * torch.logspace(0, -2, 96) + 0.3  # anisotropic, non-zero mean
    w = torch.randn(96, 96)
    fast = stats_of(x)
    flat = x.double()
    exact = InputStats(flat.T @ flat, flat.sum(0), flat.shape[0])
    rel = ((fast.second_moment - exact.second_moment).norm() / exact.second_moment.norm()).item()
    assert rel < 1e-6
    a = get_method("rom")(w, None, fast, 24).dense()
    b = get_method("rom")(w, None, exact, 24).dense()
    assert ((a - b).norm() / b.norm()).item() < 1e-5


@pytest.mark.parametrize("d_in,d_out", [(24, 16), (16, 40)])  # both the d_out and the d_in-sized solver
@pytest.mark.parametrize("bias", [False, True])
def test_rom_full_rank_reproduces_outputs(d_in, d_out, bias):
    torch.manual_seed(1)
    w, b = torch.randn(d_out, d_in), (torch.randn(d_out) if bias else None)
    x = torch.randn(500, d_in)
    k = min(d_in + int(bias), d_out)  # the outputs span at most d_in (+1 with a bias) dimensions
    f = get_method("rom")(w, b, stats_of(x), k)
    y = x @ w.T + (b if bias else 0)
    y_hat = (x @ f.down.T) @ f.up.T + (f.bias if bias else 0)
    torch.testing.assert_close(y_hat, y, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-8), (torch.float32, 1e-5)])
def test_rom_subspace_is_top_eigvecs_of_output_covariance(monkeypatch, dtype, tol):
    monkeypatch.setattr(linalg, "EIGH_DTYPE", dtype)
    torch.manual_seed(2)
    w, x = torch.randn(40, 16).double(), torch.randn(300, 16).double()
    sigma = x.T @ x / 300
    root, _ = psd_root(sigma)
    basis, _ = top_left_singular(w @ root, 5)  # d_out > d_in: the small-side solver
    c = w @ sigma @ w.T
    evals, evecs = torch.linalg.eigh(c)
    ref = evecs[:, -5:]
    # Same subspace: the projectors agree.
    torch.testing.assert_close(basis @ basis.T, ref @ ref.T, rtol=tol, atol=tol)


def test_rom_beats_svd_on_calibration_outputs():
    """ROM minimizes the output error on the calibration distribution; plain SVD does not look at it."""
    torch.manual_seed(3)
    w = torch.randn(32, 32)
    x = torch.randn(1000, 32) * torch.logspace(0, -3, 32)  # strongly anisotropic inputs
    s = stats_of(x)
    errs = {}
    for m in ("rom", "svd"):
        f = get_method(m)(w, None, s, 8)
        errs[m] = ((x @ w.T - (x @ f.down.T) @ f.up.T) ** 2).mean().item()
    assert errs["rom"] < 0.5 * errs["svd"]


def test_singular_covariance_gives_finite_factors():
    torch.manual_seed(4)
    w = torch.randn(64, 16)
    x = torch.zeros(3, 16)
    x[:, :2] = torch.randn(3, 2)  # dead channels and only 3 tokens: Σ has rank 2
    f = get_method("rom")(w, None, stats_of(x), 10)
    assert torch.isfinite(f.down).all() and torch.isfinite(f.up).all()
    torch.testing.assert_close((x @ f.down.T) @ f.up.T, x @ w.T, rtol=1e-4, atol=1e-4)
    assert f.notes  # the degenerate directions are recorded


def test_uniform_rank_formula_and_dense_rule():
    assert uniform_rank(576, 1536, 0.2) == int(0.8 * 576 * 1536 / (576 + 1536))
    assert uniform_rank(4096, 4096, 0.3) == 1433
    assert uniform_rank(2, 2, 0.9) is None  # k would be 0; rank 1 (4 params) saves nothing over 2×2
    shapes = [LinearShape("a", 576, 192), LinearShape("b", 576, 576), LinearShape("c", 2, 2)]
    ranks = allocate_uniform(shapes, 0.3)
    assert "c" not in ranks and ranks["b"] == 201
    dense, kept = linear_params(shapes, ranks)
    assert 1 - kept / dense == pytest.approx(0.3, abs=0.01)
    for s in shapes:
        if s.name in ranks:
            f = get_method("svd")(torch.randn(s.d_out, s.d_in), None, InputStats.zeros(s.d_in), ranks[s.name])
            assert f.down.shape == (ranks[s.name], s.d_in) and f.up.shape == (s.d_out, ranks[s.name])


@pytest.mark.parametrize("bias", [False, True])
def test_output_statistics_give_the_input_route_factors(bias):
    """ROM from the outputs' second moment (used when d_out < d_in) equals ROM from the inputs' (W̃ Σ̃ W̃ᵀ)."""
    torch.manual_seed(3)
    d_in, d_out, k = 48, 20, 7
    w = torch.randn(d_out, d_in)
    b = torch.randn(d_out) if bias else None
    x = torch.randn(3000, d_in) @ torch.randn(d_in, d_in) / 5 + 0.3
    y = x @ w.T + (b if b is not None else 0)
    in_stats, out_stats = InputStats.zeros(d_in), InputStats.zeros(d_out)
    accumulate(in_stats, x)
    accumulate(out_stats, y)
    via_inputs = get_method("rom")(w, b, in_stats, k)
    via_outputs = get_method("rom").decompose_outputs(w, b, out_stats, k)
    torch.testing.assert_close(via_outputs.dense(), via_inputs.dense(), rtol=1e-4, atol=1e-4)
    if bias:
        torch.testing.assert_close(via_outputs.bias, via_inputs.bias, rtol=1e-4, atol=1e-4)
    assert get_method("svd").decompose_outputs is None  # SVD works on W alone: no output variant


def test_memory_estimate_sizes_each_linear_on_its_own():
    """Qwen2.5-1.5B-like block (gate/up 1536->8960, down 8960->1536, down accumulated on its outputs):
    the decomposition workspace is the worst *single* linear, not largest d_in x largest d_out, and the
    down_proj covariance is 1536² — the estimate that once refused this model under 4 GB (7.4 GiB)."""
    from romcomp.compression import memory
    from romcomp.compression.memory import ModelDims, estimate, peak_bytes

    h, i = 1536, 8960
    dims = ModelDims(hidden=h, intermediate=i, heads=12, vocab=151936, block_params=46_797_824,
                     linear_shapes=((h, h), (h, 256), (h, 256), (h, h), (h, i), (h, i), (i, h)),
                     cov_dims=(h, h, h, h))  # fmt: skip
    parts = estimate(dims, n_samples=32, seq_len=512, batch=8, in_ram=True)
    worst = memory.rom_workspace(h, i)  # gate_proj's; down_proj's from its 1536-wide outputs is smaller
    assert worst > max(memory.rom_workspace(h, h), memory.rom_workspace(i, h, outputs=True))
    assert parts["decomposition workspace (float64)"] == worst + memory.WORKSPACE_OVERHEAD
    assert parts["covariances (float64)"] == (h + 1) ** 2 * 8  # one stage's at a time (sequential fit)
    assert peak_bytes(parts) < 4e9  # fits --max-ram 4GB (the top-level copy phase: 3.48 GiB; measured 2.93)
    # forward temporaries and the workspace never coexist: the block phase counts only the larger
    exclusive = min(parts[memory.TEMPORARIES], parts[memory.WORKSPACE])
    block_phase = sum(parts.values()) - parts[memory.TOP_LEVEL] - exclusive
    top_phase = parts["runtime"] + parts["activation cache"] + parts[memory.TOP_LEVEL]
    assert peak_bytes(parts) == max(block_phase, top_phase) == top_phase  # a 150k-vocabulary head dominates


@pytest.mark.slow
def test_float32_eigensolver_costs_nothing_on_real_statistics(smol_dir, data_dir, monkeypatch) -> None:
    """The per-step precision choice on real SmolLM2 activations (C4): the float32 route's bases discard no
    more calibration output energy than the float64 optimum, beyond round-off, summed over the linears."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from calib import calibration_windows, load_calibration
    from romcomp.compression.stats import collect_input_stats
    from romcomp.methods import rom
    from romcomp.model.discovery import discover

    model = AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.float32).eval()
    arch = discover(model, model.config)
    tokenizer = AutoTokenizer.from_pretrained(smol_dir)
    windows = calibration_windows(tokenizer, load_calibration("c4", data_dir), 4, 256, 0)
    block = model.get_submodule(arch.blocks)[1]
    with collect_input_stats(block, arch.groups) as stats, torch.inference_mode():
        model(input_ids=windows, use_cache=False)
    totals = {torch.float64: 0.0, torch.float32: 0.0}
    for group in arch.groups:
        s = stats[group[0]]
        for name in group:
            w = block.get_submodule(name).weight.data
            k = uniform_rank(w.shape[1], w.shape[0], 0.3)
            c = w.double() @ s.second_moment @ w.double().T
            for dtype in totals:
                monkeypatch.setattr(linalg, "EIGH_DTYPE", dtype)
                basis = rom.decompose(w, None, InputStats(s.xtx, s.xsum, s.count), k).up.double()
                totals[dtype] += 1 - float(torch.trace(basis.T @ c @ basis) / torch.trace(c))
    assert totals[torch.float64] > 0.01  # a real compression: energy is discarded at all
    assert abs(totals[torch.float32] - totals[torch.float64]) < 1e-4 * totals[torch.float64], totals


def test_zero_weight_gives_finite_orthonormal_factors():
    """An all-zero (e.g. zero-initialised) layer: the float32 eigensolver sees a zero Gram, not 0/0 = NaN."""
    for d_out, d_in in ((8, 16), (24, 8)):  # the wide (d_out-sized) and the tall (d_in-sized) route
        f = get_method("rom")(torch.zeros(d_out, d_in), None, stats_of(torch.randn(50, d_in)), 4)
        assert torch.isfinite(f.up).all() and torch.isfinite(f.down).all()
        torch.testing.assert_close(f.up.T @ f.up, torch.eye(4), atol=1e-5, rtol=0)
        assert (f.down == 0).all()
