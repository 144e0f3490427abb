"""The whitening root of a singular covariance: the recorded jitter, Σ left intact, two squares of memory."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch

from romcomp.methods import linalg
from romcomp.methods.linalg import psd_root


def _singular(n: int, rank: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rank, n, generator=g, dtype=torch.float64) * torch.logspace(0, -2, n, dtype=torch.float64)
    return x.T @ x / rank


def test_singular_root_is_the_jittered_cholesky_and_sigma_is_untouched():
    """Rank 20 of 64: the plain factorization fails; the root is the Cholesky factor of Σ + δ·I for the
    recorded δ, bit for bit, and Σ (possibly a memoized matrix) has its exact bytes back afterwards."""
    sigma = _singular(64, 20)
    before = sigma.clone()
    root, notes = psd_root(sigma)
    assert torch.equal(sigma, before)
    assert len(notes) == 1 and "singular input covariance: added" in notes[0]
    jitter = float(notes[0].split("added ")[1].split("·I")[0])
    scale = float(before.diagonal().mean())
    steps = [scale * linalg.JITTER * 10.0**e for e in range(0, 12, 2)]
    used = min(steps, key=lambda s: abs(s - jitter))
    assert abs(used - jitter) <= 5e-3 * used  # the note prints 3 digits
    expected = torch.linalg.cholesky(before + used * torch.eye(64, dtype=torch.float64))
    assert torch.equal(root, expected)
    assert used > steps[0] or torch.linalg.cholesky_ex(before)[1] != 0  # the jitter route was taken


def test_eigen_fallback_when_no_jitter_helps(monkeypatch):
    """An indefinite Σ (a negative eigenvalue far beyond the largest jitter) takes the eigen root: L Lᵀ is
    Σ with its negative part clamped, and Σ is intact."""
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    evals = torch.linspace(-1.0, 2.0, 16, dtype=torch.float64)
    sigma = q @ torch.diag(evals) @ q.T
    before = sigma.clone()
    root, notes = psd_root(sigma)
    assert torch.equal(sigma, before) and "not definite even with jitter" in notes[0]
    clamped = q @ torch.diag(evals.clamp_min(0)) @ q.T
    torch.testing.assert_close(root @ root.T, clamped, rtol=0, atol=1e-12)


def test_singular_root_holds_two_squares():
    """The high-water mark of the jittered route, in a fresh process: Σ and the root (two n² float64
    squares) plus LAPACK's panel, not the four an identity and a jittered copy would add."""
    n = 2400  # 44 MiB a square
    code = textwrap.dedent(f"""
        import resource, torch
        from romcomp.methods.linalg import psd_root
        torch.set_num_threads(1)
        x = torch.randn(600, {n}, dtype=torch.float64)
        sigma = x.T @ x / 600
        del x
        def hwm():
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM"):
                    return int(line.split()[1]) * 1024
        def rss():
            for line in open("/proc/self/status"):
                if line.startswith("VmRSS"):
                    return int(line.split()[1]) * 1024
        torch.linalg.cholesky_ex(torch.eye(8, dtype=torch.float64))  # load LAPACK first
        base = max(hwm(), rss())
        root, notes = psd_root(sigma)
        assert notes, "expected the jitter route"
        print((hwm() - base) / (8 * {n} ** 2))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    growth = float(out.stdout)
    # sigma is resident before the call; the call may add the root (1 square) and small buffers
    assert growth < 1.5, f"psd_root grew the high-water mark by {growth:.2f} squares of n²"
