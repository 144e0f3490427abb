"""Decomposition speed and precision: is the float32 eigensolver free, and how much faster is it?

Usage (from the repository root)::

    python tools/bench_decompose.py --shape llama2-7b --model smollm2-135m --ratio 0.2

Part 1 times ROM on one block of a 7B/13B shape (random weights; input covariances with a power-law
spectrum and a few outlier channels, like real activations) with the eigensolver in float64 and in float32,
next to the previous implementation (full float64 ``eigh`` of ``W Σ Wᵀ`` / of Σ for its root).
Part 2 collects real input statistics of a real model on C4 (the dense stream through every block) and, for
every linear at ``--ratio``, measures the output energy each basis discards, in float64:
``1 − tr(Bᵀ C B) / tr(C)`` with ``C = W̃ Σ̃ W̃ᵀ``. The float32 route is free if its discarded energy is not
above the float64 route's (the optimum) by more than round-off.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from romcomp.compression.ranks import uniform_rank  # noqa: E402
from romcomp.methods import linalg, projection, rom  # noqa: E402
from romcomp.methods.base import InputStats  # noqa: E402

SHAPES = {"llama2-7b": (4096, 11008), "llama2-13b": (5120, 13824)}
DTYPES = {"float64": torch.float64, "float32": torch.float32}


def legacy_basis(w: torch.Tensor, sigma: torch.Tensor, k: int) -> torch.Tensor:
    """The previous implementation: full float64 eigh of ``W Σ Wᵀ`` or, for tall W, of Σ then ``Mᵀ M``."""
    w = w.double()
    if w.shape[0] <= w.shape[1]:
        return torch.linalg.eigh(w @ sigma @ w.T)[1][:, -k:]
    evals, evecs = torch.linalg.eigh(sigma)
    m = w @ (evecs * evals.clamp_min(0).sqrt())
    vals, vecs = torch.linalg.eigh(m.T @ m)
    return (m @ vecs[:, -k:]) / vals[-k:].clamp_min(1e-300).sqrt()


def synthetic_stats(dim: int, seed: int) -> InputStats:
    """Σ = Q diag(λ) Qᵀ with λ ∝ i^-1.5 and 4 outlier channels 1000× stronger (massive activations)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    lam = torch.arange(1, dim + 1, dtype=torch.float64) ** -1.5
    sigma = (q * lam) @ q.T
    idx = torch.randperm(dim, generator=g)[:4]
    sigma[idx, idx] += 1000 * lam[0]
    return InputStats(sigma, torch.zeros(dim, dtype=torch.float64), 1)


def time_block(shape: str, ratio: float) -> list[tuple[str, float, float, float]]:
    """(linear, legacy s, float64 s, float32 s) for q/k/v/o, gate/up and down of one block."""
    hidden, inter = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    rows = []
    for label, d_in, d_out, n, key in (
        ("q/k/v (shared Σ)", hidden, hidden, 3, "attn"),
        ("o_proj", hidden, hidden, 1, "o"),
        ("gate/up (shared Σ)", hidden, inter, 2, "mlp"),
        ("down (output Σ)", inter, hidden, 1, "down"),
    ):
        k = uniform_rank(d_in, d_out, ratio)
        w = torch.randn(d_out, d_in, generator=g) / d_in**0.5
        stats = synthetic_stats(d_out if key == "down" else d_in, seed=len(rows))
        t_legacy = time.perf_counter()
        for _ in range(n):
            if key == "down":
                torch.linalg.eigh(stats.second_moment)
            else:
                legacy_basis(w, stats.second_moment, k)
        t_legacy = time.perf_counter() - t_legacy
        times = []
        for dtype in DTYPES.values():
            linalg.EIGH_DTYPE = dtype
            fresh = InputStats(stats.xtx.clone(), stats.xsum, stats.count)  # no root cached across dtypes
            t0 = time.perf_counter()
            for _ in range(n):
                if key == "down":
                    rom.decompose_outputs(w, None, fresh, k)
                else:
                    rom.decompose(w, None, fresh, k)
            times.append(time.perf_counter() - t0)
        rows.append((label, t_legacy, *times))
        print(f"  timed {label}: {t_legacy:.1f} / {times[0]:.1f} / {times[1]:.1f} s", flush=True)
    return rows


def real_stats(model_spec: str, n_samples: int, seq_len: int, blocks: list[int] | None):
    """Input statistics of every linear group of the dense model on C4 (hooks on the loaded model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from calib import calibration_windows, load_calibration
    from romcomp.compression.stats import collect_input_stats
    from romcomp.model.discovery import discover
    from romcomp.model.sources import resolve_model

    source = resolve_model(model_spec)
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).eval()
    arch = discover(model, model.config)
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    windows = calibration_windows(tokenizer, load_calibration("c4"), n_samples, seq_len, 0)
    layers = model.get_submodule(arch.blocks)
    chosen = blocks if blocks is not None else list(range(len(layers)))
    with ExitStack() as hooks, torch.inference_mode():
        stats = {i: hooks.enter_context(collect_input_stats(layers[i], arch.groups)) for i in chosen}
        for start in range(0, windows.shape[0], 4):
            model(input_ids=windows[start : start + 4], use_cache=False)
    return model, arch, layers, stats


def discarded(w_aug: torch.Tensor, sigma: torch.Tensor, basis: torch.Tensor) -> float:
    """Fraction of the calibration output energy outside span(basis), all in float64."""
    c = w_aug @ sigma @ w_aug.T
    return 1 - float(torch.trace(basis.T @ c @ basis) / torch.trace(c))


def compare_real(args: argparse.Namespace) -> list[tuple[str, int, float, float]]:
    """(linear, rank, discarded float64, discarded float32) for every linear of the chosen blocks."""
    model, arch, layers, stats = real_stats(args.model, args.n_samples, args.seq_len, args.blocks)
    rows = []
    for i, groups in stats.items():
        for group in arch.groups:
            s = groups[group[0]]
            for name in group:
                lin = layers[i].get_submodule(name)
                k = uniform_rank(lin.in_features, lin.out_features, args.ratio)
                bias = None if lin.bias is None else lin.bias.data
                w_aug = projection.augmented_weight(lin.weight.data, bias)
                sigma = projection.augmented_sigma(s, bias is not None)
                result = []
                for dtype in DTYPES.values():
                    linalg.EIGH_DTYPE = dtype
                    fresh = InputStats(s.xtx, s.xsum, s.count)
                    basis = rom.decompose(lin.weight.data, bias, fresh, k).up.double()
                    result.append(discarded(w_aug, sigma, basis))
                rows.append((f"{i}.{name}", k, *result))
    return rows


def end_to_end(args: argparse.Namespace, work: Path) -> list[tuple[str, float, float, float]]:
    """(dtype, decomposition s, run s, WikiText-2 ppl) of a whole ROM run with each eigensolver precision."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from romcomp.api import compress
    from romcomp.evaluation.perplexity import perplexity, wikitext2_test_ids

    rows = []
    for label, dtype in DTYPES.items():
        linalg.EIGH_DTYPE = dtype
        result = compress(args.model, args.ratio, out=work / label, n_samples=args.n_samples,
                          seq_len=args.seq_len, progress=False, overwrite=True)  # fmt: skip
        model = AutoModelForCausalLM.from_pretrained(result.out, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(result.out)
        ppl = perplexity(model, wikitext2_test_ids(tokenizer), max_windows=args.ppl_windows).ppl
        decompose = sum(t.decompose for t in result.block_times.values())
        rows.append((label, decompose, result.seconds, ppl))
        print(f"  {label}: decomposition {decompose:.1f} s of {result.seconds:.0f} s, WikiText-2 {ppl:.3f}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="llama2-7b", choices=[*SHAPES, "none"])
    parser.add_argument("--model", default="smollm2-135m", help="real model for part 2 ('none': skip)")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--n-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--blocks", type=lambda s: [int(b) for b in s.split(",")], default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--e2e", action="store_true", help="also compress --model both ways and compare ppl")
    parser.add_argument("--ppl-windows", type=int, default=40)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_decompose"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.shape != "none":
        rows = time_block(args.shape, args.ratio)
        print(f"\n### ROM decomposition of one {args.shape} block (ratio {args.ratio}), seconds\n")
        print("| linear(s) | previous (float64 full eigh) | float64 | float32 |\n|---|---|---|---|")
        for label, *t in rows:
            print(f"| {label} | " + " | ".join(f"{v:.1f}" for v in t) + " |")
        total = [sum(r[j] for r in rows) for j in (1, 2, 3)]
        print("| **block** | " + " | ".join(f"**{v:.1f}**" for v in total) + " |")
    if args.model != "none":
        rows = compare_real(args)
        excess = [(d32 - d64) / max(d64, 1e-300) for _, _, d64, d32 in rows]
        print(f"\n### Discarded calibration output energy, {args.model}, ratio {args.ratio}, "
              f"C4 {args.n_samples}×{args.seq_len}, {len(rows)} linears\n")  # fmt: skip
        print("| | float64 | float32 |\n|---|---|---|")
        for label in ("mean", "max"):
            agg = (lambda v: sum(v) / len(v)) if label == "mean" else max
            d64, d32 = agg([r[2] for r in rows]), agg([r[3] for r in rows])
            print(f"| {label} discarded | {d64:.6f} | {d32:.6f} |")
        total64, total32 = sum(r[2] for r in rows), sum(r[3] for r in rows)
        worst_abs = max(r[3] - r[2] for r in rows)
        print(f"\nsum over linears: float32 discards {(total32 - total64) / total64:+.2e} relative more;"
              f" largest absolute excess {worst_abs:+.2e} of a linear's output energy")  # fmt: skip
        print("largest relative excesses of float32 (linear, rank, discarded float64 → float32):")
        for j in sorted(range(len(rows)), key=lambda j: -excess[j])[:5]:
            print(f"  {rows[j][0]} k={rows[j][1]}: {rows[j][2]:.3e} → {rows[j][3]:.3e} ({excess[j]:+.1e})")
    if args.e2e:
        rows = end_to_end(args, args.work)
        print(f"\n### Whole ROM run, {args.model}, ratio {args.ratio}, C4 {args.n_samples}×{args.seq_len}\n")
        print("| eigensolver | decomposition s | run s | WikiText-2 ppl |\n|---|---|---|---|")
        for label, dec, total, ppl in rows:
            print(f"| {label} | {dec:.1f} | {total:.0f} | {ppl:.3f} |")
    print(f"\nmachine: {platform.machine()}, {torch.get_num_threads()} threads; torch {torch.__version__}")
    print("command: python " + " ".join(sys.argv))


if __name__ == "__main__":
    main()
