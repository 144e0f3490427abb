"""Data-parallel calibration: one process against two, each pinned to one core, side by side in one run.

Usage (from the repository root; the real Qwen2.5-Coder-1.5B from the model cache, its first blocks)::

    python tools/bench_distributed.py --model ~/.cache/romcomp/models/qwen2.5-coder-1.5b --blocks 2 \
        --n-samples 32 --json tools/results/distributed_qwen.json

``--blocks N`` copies the model's first N blocks (real weights) and its top-level tensors into a smaller
checkpoint of the same family (``num_hidden_layers = N``), so a run costs minutes, not hours. Then:

- **one process**: ``taskset -c 0 python -m romcomp … --threads 1``;
- **two processes**: two ``torchrun --nnodes 2 --nproc-per-node 1`` launchers on loopback (two "machines"
  on one host, static rendezvous), ``taskset -c 0`` and ``taskset -c 1``, ``--threads 1`` each;

both with the default configuration (dense pre-pass, ``auto`` ranks, error-aware fit). Each launcher's
peak RSS comes from ``wait4``. From the manifests: seconds per block of each pass (the dense pre-pass's
forwards+statistics and spectra, the compression pass's forwards+statistics, decomposition, write), the
seconds spent in collectives, and the bytes all-reduced and broadcast per block. The outputs are compared
(largest relative Frobenius difference of a reconstructed weight; with ``--ppl-windows``, WikiText-2
*validation* perplexity of both).

The projection for Llama-2-13B (40 blocks, 128 × 512 calibration) on 4 and 16 machines, at 1 and 10
Gbit/s, is computed from these measured parts: per block, the token-proportional work (forwards and
statistics) scaled from the measured one-process seconds by the counted work of the two shapes
(``bench_speed.needed_tflop``) and divided among the machines; the decomposition scaled the same way and
divided as the linears are dealt round the ranks (the busiest rank's share of the counted work); the
collectives from the bytes a 13B block all-reduces (the measured bytes per block scaled by the ratio of the
statistics' sizes, :func:`stats_bytes`, whose prediction for the measured shape is printed beside the
measurement) through a ring all-reduce (2·(N−1)/N of the bytes over the link) plus the factors broadcast
((N−1)/N of their bytes over the link, as a ring would). Each machine is assumed to run one worker at the
per-core speed measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_scale import linear_shapes  # noqa: E402
from bench_speed import needed_tflop, solve_flops  # noqa: E402

LLAMA2_13B = {"hidden_size": 5120, "intermediate_size": 13824, "num_attention_heads": 40,
              "num_key_value_heads": 40, "num_hidden_layers": 40}  # fmt: skip


def truncate(model: Path, blocks: int, out: Path) -> Path:
    """A checkpoint of ``model``'s first ``blocks`` blocks (real weights) and its top-level tensors."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    if (out / "config.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((model / "config.json").read_text())
    config["num_hidden_layers"] = blocks
    for key in ("layer_types",):
        if key in config:
            config[key] = config[key][:blocks]
    if "max_window_layers" in config:
        config["max_window_layers"] = min(config["max_window_layers"], blocks)
    tensors = {}
    for path in sorted(model.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                parts = name.split(".")
                if "layers" in parts and int(parts[parts.index("layers") + 1]) >= blocks:
                    continue
                tensors[name] = f.get_tensor(name)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    for path in model.iterdir():
        if path.suffix != ".safetensors" and path.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(path, out / path.name)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_all(procs: list[subprocess.Popen]) -> list[int]:
    """Peak RSS of each launcher's process tree (``wait4``); raises if one failed."""
    peaks = []
    for p in procs:
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        peaks.append(usage.ru_maxrss * 1024)
    if any(p.returncode for p in procs):
        raise SystemExit(f"a run failed: exit codes {[p.returncode for p in procs]}")
    return peaks


def run(args: argparse.Namespace, model: Path, name: str, workers: int) -> dict[str, Any]:
    out = args.work / name
    shutil.rmtree(out, ignore_errors=True)
    common = [str(model), "--ratio", str(args.ratio), "--n-samples", str(args.n_samples), "--seq-len",
              str(args.seq_len), "--threads", "1", "--no-progress", "--out", str(out)]  # fmt: skip
    port = free_port()
    procs = []
    t0 = time.perf_counter()
    for rank in range(workers):
        launch = [sys.executable, "-m", "romcomp"] if workers == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", str(workers),
            "--node-rank", str(rank), "--nproc-per-node", "1", "--master-addr", "127.0.0.1",
            "--master-port", str(port), "-m", "romcomp",
        ]  # fmt: skip
        log = open(args.work / f"{name}-{rank}.log", "w")  # noqa: SIM115 - closed with the process
        procs.append(subprocess.Popen(["taskset", "-c", str(rank), *launch, *common], stdout=log,
                                      stderr=subprocess.STDOUT))  # fmt: skip
    peaks = wait_all(procs)
    seconds = time.perf_counter() - t0
    manifest = json.loads((out / ".romcomp" / "manifest.json").read_text())
    return {"seconds": seconds, "peaks": peaks, "manifest": manifest, "out": str(out)}


def per_block(manifest: dict[str, Any]) -> dict[str, float]:
    """Mean seconds (and bytes) per block of each part, from the manifest."""
    prof = list(manifest["profile_times"].values())
    blocks = list(manifest["block_times"].values())
    mean = lambda rows, key: sum(r.get(key, 0.0) for r in rows) / max(len(rows), 1)  # noqa: E731
    return {
        "pre-pass fwd+stats": mean(prof, "forward"), "pre-pass spectra": mean(prof, "spectra"),
        "pre-pass collectives": mean(prof, "comm"), "fwd+stats": mean(blocks, "forward"),
        "decompose": mean(blocks, "decompose"), "write": mean(blocks, "write"),
        "collectives": mean(blocks, "comm"),
        "pre-pass bytes reduced": mean(prof, "reduced_bytes"), "bytes reduced": mean(blocks, "reduced_bytes"),
        "bytes broadcast": mean(blocks, "broadcast_bytes"),
    }  # fmt: skip


def stats_bytes(config: dict[str, Any]) -> dict[str, float]:
    """Bytes one block's statistics all-reduce (float64): the pre-pass's four input/output moments (upper
    triangles) and, for the error-aware fit, each stage's compressed-input moment (upper triangle) with its
    cross moment against the dense side (q/k/v, o and gate/up hidden × hidden; down_proj's dense outputs
    against its intermediate-wide compressed inputs)."""
    h, i = config["hidden_size"], config["intermediate_size"]
    tri = lambda n: n * (n + 1) / 2  # noqa: E731
    return {"pre-pass": 8 * 4 * tri(h), "blocks": 8 * (3 * (tri(h) + h * h) + tri(i) + h * i)}


def projection(config: dict[str, Any], single: dict[str, float], bytes_per_block: dict[str, float],
               args: argparse.Namespace) -> list[tuple[int, float, float, float, float]]:  # fmt: skip
    """(machines, Gbit/s, compute s/block, collectives s/block, hours) for Llama-2-13B at 128 × 512."""
    run_args = {"n_samples": args.n_samples, "seq_len": args.seq_len, "prepass_samples": args.prepass,
                "allocation": "auto", "fit": "error-aware"}  # fmt: skip
    full_args = {**run_args, "n_samples": 128}
    here, there = needed_tflop(config, run_args), needed_tflop(LLAMA2_13B, full_args)
    tokens = (single["pre-pass fwd+stats"] + single["fwd+stats"]) * (
        (there["forwards"] + there["statistics"]) / (here["forwards"] + here["statistics"])
    )
    decompose = (single["pre-pass spectra"] + single["decompose"]) * (
        there["decomposition"] / here["decomposition"]
    )
    shapes_13b = stats_bytes(LLAMA2_13B)
    scale = {k: shapes_13b[k] / stats_bytes(config)[k] for k in shapes_13b}
    reduced = bytes_per_block["pre-pass"] * scale["pre-pass"] + bytes_per_block["blocks"] * scale["blocks"]
    params, blocks = sum(a * b for a, b in linear_shapes(LLAMA2_13B)), LLAMA2_13B["num_hidden_layers"]
    broadcast = 4 * params * (1 - args.ratio)  # float32 factors at the ratio's size
    rows = []
    for machines in (4, 16):
        share = _busiest_share(LLAMA2_13B, machines)
        for gbit in (1.0, 10.0):
            link = gbit * 1e9 / 8
            comm = (2 * reduced + broadcast) * (machines - 1) / machines / link
            compute = tokens / machines + decompose * share
            rows.append((machines, gbit, compute, comm, (compute + comm) * blocks / 3600))
    rows.append((1, 0.0, tokens + decompose, 0.0, (tokens + decompose) * blocks / 3600))
    return rows


def _busiest_share(config: dict[str, Any], ranks: int) -> float:
    """The busiest rank's share of a block's decomposition work when the linears are dealt round
    (``World.owner``), each weighted by its counted dense-algebra core."""
    cost = [solve_flops(a, b) for a, b in linear_shapes(config)]
    load = [0.0] * ranks
    for i, c in enumerate(cost):
        load[i % ranks] += c
    return max(load) / sum(cost)


def compare(a: str, b: str) -> float:
    """Largest relative Frobenius difference of a reconstructed (up @ down) or dense weight."""
    from safetensors.torch import load_file

    worst = 0.0
    for path in sorted(Path(a).glob("*.safetensors")):
        x, y = load_file(str(path)), load_file(str(Path(b) / path.name))
        for name in x:
            if name.endswith(".down.weight"):
                up = name.replace(".down.weight", ".up.weight")
                wx, wy = x[up].double() @ x[name].double(), y[up].double() @ y[name].double()
            elif ".up." in name:
                continue
            else:
                wx, wy = x[name].double(), y[name].double()
            worst = max(worst, float((wx - wy).norm() / max(wx.norm(), 1e-30)))
    return worst


def ppl(path: str, windows: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import romcomp.hf  # noqa: F401 - registers the low-rank modules
    from romcomp.evaluation.perplexity import encode_eval, perplexity

    text = Path(__file__).resolve().parents[1].parent / "shared/data/wikitext2_tokenized/wiki.valid.tokens"
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32, trust_remote_code=True)
    return float(perplexity(model, encode_eval(tok, text.read_text()), 512, windows).ppl)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--blocks", type=int, default=0, help="keep only the first N blocks (0: all)")
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--n-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--ppl-windows", type=int, default=0, help="WikiText-2 validation windows (0: none)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_distributed"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model = truncate(args.model.expanduser(), args.blocks, args.work / "model") if args.blocks else args.model
    config = json.loads((model / "config.json").read_text())
    args.prepass = min(args.n_samples, 32 * 512 // args.seq_len)
    results = {name: run(args, model, name, n) for name, n in (("one process", 1), ("two processes", 2))}
    parts = {name: per_block(r["manifest"]) for name, r in results.items()}
    one, two = (results[n]["seconds"] for n in results)
    print(f"model {model} ({config['num_hidden_layers']} blocks, hidden {config['hidden_size']}, "
          f"intermediate {config['intermediate_size']}), ratio {args.ratio}, default configuration, C4 "
          f"{args.n_samples} x {args.seq_len} (pre-pass {args.prepass} windows), "
          "one core per process\n")  # fmt: skip
    print("| per block | one process | two processes | speed-up |\n|---|---|---|---|")
    for part in ("pre-pass fwd+stats", "pre-pass spectra", "pre-pass collectives", "fwd+stats", "decompose",
                 "write", "collectives"):  # fmt: skip
        a, b = parts["one process"][part], parts["two processes"][part]
        ratio = f"{a / b:.2f}x" if a and b else ""
        print(f"| {part} (s) | {a:.2f} | {b:.2f} | {ratio} |")
    for part in ("pre-pass bytes reduced", "bytes reduced", "bytes broadcast"):
        print(f"| {part} (MiB) | – | {parts['two processes'][part] / 2**20:.1f} | |")
    print(f"| whole run, wall (s) | {one:.1f} | {two:.1f} | **{one / two:.2f}x** |")
    peaks = [f"{p / 2**30:.2f}" for r in results.values() for p in r["peaks"]]
    print(f"| peak RSS per process (GiB) | {peaks[0]} | {' / '.join(peaks[1:])} | |")
    diff = compare(results["one process"]["out"], results["two processes"]["out"])
    print(f"\nlargest relative difference of a reconstructed weight, one vs two processes: {diff:.2e}")
    predicted = stats_bytes(config)
    measured = {"pre-pass": parts["two processes"]["pre-pass bytes reduced"],
                "blocks": parts["two processes"]["bytes reduced"]}  # fmt: skip
    print(
        "bytes all-reduced per block, measured vs stats_bytes(): "
        + ", ".join(f"{k} {measured[k] / 2**20:.1f} vs {predicted[k] / 2**20:.1f} MiB" for k in measured)
    )
    scores = {}
    if args.ppl_windows:
        scores = {n: ppl(r["out"], args.ppl_windows) for n, r in results.items()}
        print("WikiText-2 validation perplexity (" + f"{args.ppl_windows} x 512): "
              + ", ".join(f"{n} {v:.3f}" for n, v in scores.items()))  # fmt: skip
    rows = projection(config, parts["one process"], measured, args)
    print("\nLlama-2-13B, 40 blocks, C4 128 x 512, default configuration (projected from the parts above)")
    print("| machines | link | compute s/block | collectives s/block | hours |\n|---|---|---|---|---|")
    for machines, gbit, compute, comm, hours in rows:
        link = f"{gbit:g} Gbit/s" if gbit else "–"
        print(f"| {machines} | {link} | {compute:.0f} | {comm:.1f} | {hours:.2f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "seconds": {n: r["seconds"] for n, r in results.items()},
                                         "peaks": {n: r["peaks"] for n, r in results.items()},
                                         "parts": parts, "weight_diff": diff, "ppl": scores,
                                         "projection": rows}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
