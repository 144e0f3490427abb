"""Where a run's time goes, against one plain forward, side by side in one run.

Usage (from the repository root; fixture from ``tools/make_scale_fixture.py --shape llama2-7b --layers 2``)::

    python tools/bench_speed.py --model /tmp/scale/llama2-7b-2l --n-samples 32 --threads 2 --max-ram 24GB \
        --variant default= --variant "local=--allocation uniform --fit local" --full-blocks 32

First the machine's float32 and float64 matmul rates; then, in a child process, one plain float32 forward
of the model's blocks with transformers alone over the same number of tokens (the unit of the table);
then each variant as a ``romcomp`` child process run to completion (its peak RSS from ``wait4``). From
each manifest it splits every block into the dense pre-pass's forwards+statistics and its spectra, the
compression pass's forwards+statistics, decomposition and write, and prints them in seconds per block
and in plain-forward equivalents, the plan against the measured peak, the run's own printed estimate
against its wall time, and the projection of a full model (``--full-blocks``) at the standard 128 × 512
calibration: parts that scale with tokens (forwards, statistics) scaled by the token ratio, the others
(eigensolves, decompositions, writes) as measured. Block 0 is included: with two blocks there is no other.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale import (  # noqa: E402
    REPO_ROOT,
    STANDARD_TOKENS,
    linear_shapes,
    machine_lines,
    manifest,
    matmul_gflops,
    run,
    run_parser,
)

from romcomp.compression.config import PREPASS_TOKENS  # noqa: E402


def linear_gflops(torch_dtype: str, tokens: int = 512, d_in: int = 4096, d_out: int = 4096) -> float:
    """A linear layer's speed in ``torch_dtype`` (bfloat16 has no fast path on CPUs without AVX-512 BF16 or
    AMX: a square bfloat16 ``matmul`` there runs single-threaded for minutes)."""
    import torch

    dtype = getattr(torch, torch_dtype)
    x, w = torch.randn(tokens, d_in, dtype=dtype), torch.randn(d_out, d_in, dtype=dtype)
    torch.nn.functional.linear(x, w)
    start = time.perf_counter()
    torch.nn.functional.linear(x, w)
    return 2 * tokens * d_in * d_out / (time.perf_counter() - start) / 1e9


def plain_forward(model: Path, n_samples: int, seq_len: int, threads: int) -> dict[str, Any]:
    """Child process: the model's blocks over ``n_samples`` × ``seq_len`` tokens, float32, batches of 8."""
    import resource

    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    lm = AutoModelForCausalLM.from_pretrained(model, torch_dtype=torch.float32)
    ids = torch.randint(
        0, lm.config.vocab_size, (n_samples, seq_len), generator=torch.Generator().manual_seed(0)
    )
    base = lm.get_submodule(lm.base_model_prefix)
    with torch.inference_mode():
        base(input_ids=ids[:1, :64])  # warm-up
        start = time.perf_counter()
        for i in range(0, n_samples, 8):
            base(input_ids=ids[i : i + 8], use_cache=False)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def run_variant(args: argparse.Namespace, name: str, extra: str) -> dict[str, Any]:
    ns = argparse.Namespace(
        model=args.model, ratio=args.ratio, out=args.work / name, max_ram=args.max_ram,
        n_samples=args.n_samples, seq_len=args.seq_len, extra=extra, threads=args.threads, blocks=0,
        trace=False,
    )  # fmt: skip
    args.work.mkdir(parents=True, exist_ok=True)
    result = run(ns)
    log = (args.work / f"{name}.log").read_text()
    found = re.search(r"~([0-9.]+) (s|min|h) estimated in all", log)
    unit = {"s": 1, "min": 60, "h": 3600}
    result["estimate_s"] = float(found.group(1)) * unit[found.group(2)] if found else None
    result["manifest"] = manifest(ns.out)
    return result


def breakdown(m: dict[str, Any]) -> dict[str, float]:
    """Mean seconds per block of every part (all blocks: a 2-block fixture has no steady state)."""
    blocks = list(m.get("block_times", {}).values())
    prof = list(m.get("profile_times", {}).values())
    mean = lambda rows, k: sum(r[k] for r in rows) / len(rows) if rows else 0.0  # noqa: E731
    return {
        "pre-pass fwd+stats": mean(prof, "forward"),
        "pre-pass spectra": mean(prof, "spectra"),
        "fwd+stats": mean(blocks, "forward"),
        "decompose": mean(blocks, "decompose"),
        "write": mean(blocks, "write"),
    }


def statistics_tflop(config: dict[str, Any], tokens: int) -> dict[str, float]:
    """Statistics FLOPs of one block (Llama layout: q/k/v, o, gate/up inputs hidden wide, down_proj's
    input intermediate wide): ``syrk`` d²·T per second moment, a paired cross GEMM 2·d²·T — for
    ``down_proj`` 2·hidden·intermediate·T (its dense *outputs* against the compressed inputs)."""
    h, i = config["hidden_size"], config["intermediate_size"]
    down = (i * i + 2 * h * i) * tokens / 1e12
    return {
        "pre-pass (4 hidden² moments)": 4 * h * h * tokens / 1e12,
        "error-aware (3 hidden² pairs + down_proj's)": 3 * 3 * h * h * tokens / 1e12 + down,
        "of which down_proj's pair": down,
        "local (4 hidden² moments)": 4 * h * h * tokens / 1e12,
    }


def solve_flops(d_out: int, d_in: int) -> float:
    """One linear's decomposition core (see :func:`needed_tflop`): Cholesky d_in³/3, the whitened product
    2·d_out·d_in², an eigensolve with vectors of the narrower side ~10/3·n³."""
    return d_in**3 / 3 + 2 * d_out * d_in * d_in + 10 / 3 * min(d_out, d_in) ** 3


def needed_tflop(config: dict[str, Any], args: dict[str, Any]) -> dict[str, float]:
    """The work a run needs per block, counted (not timed): each forward it must run — the dense pre-pass
    over its windows (``auto``), then one per stream (two for the error-aware fit: dense and compressed) —
    at 2·params·T for the linears plus 4·T·s·h for attention's two products; the statistics
    (:func:`statistics_tflop`); and per linear the decomposition's dense-algebra core: the whitening
    Cholesky d_in³/3, the whitened product 2·d_out·d_in², an eigensolve with vectors of the narrower side
    (~10/3·n³: tridiagonal reduction and back-transformation) — and for the pre-pass the same product and
    an eigenvalues-only solve (4/3·n³). LAPACK's real counts differ by constants, so this is the work a
    careful implementation cannot avoid, not what this one does."""
    tokens, seq = args["n_samples"] * args["seq_len"], args["seq_len"]
    pre_tokens = (args.get("prepass_samples") or 0) * seq if args.get("allocation") == "auto" else 0
    shapes = linear_shapes(config)
    fwd = lambda t: (2 * sum(a * b for a, b in shapes) * t + 4 * t * seq * config["hidden_size"]) / 1e12  # noqa: E731
    stats = statistics_tflop(config, 1)
    error_aware = args.get("fit") == "error-aware"
    solve = sum(solve_flops(a, b) for a, b in shapes) / 1e12
    spectra = sum(2 * a * b * b + 4 / 3 * min(a, b) ** 3 for a, b in shapes) / 1e12 if pre_tokens else 0.0
    return {
        "forwards": fwd(pre_tokens) + fwd(tokens) * (2 if error_aware else 1),
        "statistics": stats["pre-pass (4 hidden² moments)"] * pre_tokens
        + stats["error-aware (3 hidden² pairs + down_proj's)" if error_aware else "local (4 hidden² moments)"]
        * tokens,
        "decomposition": solve + spectra,
    }


SCALES = {"pre-pass fwd+stats": True, "pre-pass spectra": False, "fwd+stats": True, "decompose": False,
          "write": False}  # fmt: skip
"""Which parts grow with the calibration tokens."""


def report(args: argparse.Namespace, plain: dict[str, Any], results: dict[str, dict[str, Any]],
           rates: dict[str, float]) -> None:  # fmt: skip
    config = json.loads((args.model / "config.json").read_text())
    n_blocks = config["num_hidden_layers"]
    tokens = args.n_samples * args.seq_len
    unit = plain["seconds"] / n_blocks
    print(f"model {args.model} ({n_blocks} blocks, hidden {config['hidden_size']}, intermediate "
          f"{config['intermediate_size']}), ratio {args.ratio}, calibration {args.n_samples} x "
          f"{args.seq_len} (c4), {args.threads} threads, --max-ram {args.max_ram}")  # fmt: skip
    print(f"matmul here: float32 {rates['float32']:.0f} GFLOP/s, float64 {rates['float64']:.0f} GFLOP/s, "
          f"bfloat16 {rates['bfloat16']:.0f} GFLOP/s")  # fmt: skip
    print(f"plain float32 forward (transformers alone, same blocks and tokens): {plain['seconds']:.1f} s "
          f"= {unit:.1f} s per block (the unit 'fwd' below), "
          f"peak {plain['peak_rss'] / 2**30:.2f} GiB\n")  # fmt: skip
    names = list(results)
    print("| s per block (fwd-equivalents) | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    parts = {n: breakdown(r["manifest"]) for n, r in results.items()}
    for part in SCALES:
        cells = [f"{parts[n][part]:.1f} ({parts[n][part] / unit:.2f})" for n in names]
        print(f"| {part} | " + " | ".join(cells) + " |")
    totals = {n: sum(parts[n].values()) for n in names}
    print(
        "| **all parts** | "
        + " | ".join(f"**{totals[n]:.1f} ({totals[n] / unit:.2f})**" for n in names)
        + " |"
    )

    def grows(part: str) -> float:
        """How a part grows from this calibration to 128 × 512: with the tokens, except the pre-pass
        when it reads at most ``PREPASS_TOKENS`` by default."""
        if not SCALES[part]:
            return 1.0
        if part.startswith("pre-pass") and PREPASS_TOKENS is not None:
            return min(STANDARD_TOKENS, PREPASS_TOKENS) / min(tokens, PREPASS_TOKENS)
        return STANDARD_TOKENS / tokens

    def projected(n: str) -> str:
        scaled = sum(v * grows(k) for k, v in parts[n].items())
        return f"{args.full_blocks * scaled / 3600:.2f} h"

    def achieved(r: dict[str, Any]) -> str:
        """The counted work of every block over the run's wall time, against the float32 matmul peak."""
        work = sum(needed_tflop(config, r["manifest"]["args"]).values()) * n_blocks
        rate = work * 1e3 / r["seconds"]
        return f"{work:.1f} TFLOP / {rate:.0f} GFLOP/s ({rate / rates['float32']:.0%} of float32 peak)"

    rows = {
        "wall time of the run": lambda r, n: f"{r['seconds']:.0f} s "
        f"({r['seconds'] / plain['seconds']:.2f} plain forwards)",
        "its own estimate (header)": lambda r, n: "–" if r["estimate_s"] is None else
        f"{r['estimate_s']:.0f} s ({r['estimate_s'] / r['seconds'] - 1:+.0%})",
        "peak RSS / plan / cap": lambda r, n: f"{r['peak_rss'] / 2**30:.2f} / "
        f"{r['manifest'].get('plan', {}).get('estimate', 0) / 2**30:.2f} / "
        f"{r['manifest'].get('plan', {}).get('budget', 0) / 2**30:.2f} GiB",
        f"projected {args.full_blocks} blocks at 128 x 512": lambda r, n: projected(n),
        "work needed (counted) / achieved": lambda r, n: achieved(r),
    }  # fmt: skip
    for label, cell in rows.items():
        print(f"| {label} | " + " | ".join(cell(results[n], n) for n in names) + " |")
    stats = statistics_tflop(config, tokens)
    print(
        "\nstatistics per block at this calibration (TFLOP, counted; seconds at the measured float32 rate):"
    )
    for k, v in stats.items():
        print(f"- {k}: {v:.2f} TFLOP ({v * 1e3 / rates['float32']:.0f} s)")
    print("\n" + machine_lines("bench_speed.py"))


def main() -> None:
    parser = run_parser(__doc__, "24GB", 32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--full-blocks", type=int, default=32, help="blocks of the full model (projection)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_speed"))
    parser.add_argument("--variant", action="append", default=[],
                        help="NAME=romcomp options (repeatable; 'default=' is the default run)")  # fmt: skip
    parser.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--from-json", type=Path, default=None, help="print the table of a saved --json run")
    args = parser.parse_args()
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        report(args, saved["plain"], saved["results"], saved["rates"])
        return
    if args.plain:
        print(json.dumps(plain_forward(args.model, args.n_samples, args.seq_len, args.threads)))
        return
    rates = {dt: matmul_gflops(dt, n=2048) for dt in ("float32", "float64")}
    rates["bfloat16"] = linear_gflops(torch_dtype="bfloat16")
    cmd = [sys.executable, __file__, "--plain", "--model", str(args.model), "--n-samples",
           str(args.n_samples), "--seq-len", str(args.seq_len), "--threads", str(args.threads)]  # fmt: skip
    plain = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO_ROOT).stdout)
    results = {}
    for spec in args.variant or ["default="]:
        name, _, extra = spec.partition("=")
        results[name] = run_variant(args, name, extra)
    report(args, plain, results, rates)
    if args.json:
        args.json.write_text(json.dumps({"plain": plain, "rates": rates, "results": results}, indent=2))


if __name__ == "__main__":
    main()
