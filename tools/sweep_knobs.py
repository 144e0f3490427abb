"""Choose a quality constant on validation text: one compression per setting, scored on validation splits.

Every constant romcomp picked by measuring quality (the error-aware ridge, the allocation's energy
exponent, ...) is chosen here, on WikiText-2 *validation* and PTB *validation* (``romcomp eval``'s
``validation`` group) — never on the test text the results tables report. Each ``--point`` is a
comma-separated list of ``KNOB=value`` (knobs: ``KNOBS``); each point runs as a fresh ``romcomp``
child process with the constants set, compresses at every ``--ratios`` in one pass (C4 calibration,
``--n-samples`` × 512), and scores every output on the first ``--windows`` × 512 windows of each
validation split. Prints one table row per (point, ratio) and writes every number to ``--json``.

    python tools/sweep_knobs.py --model smollm2-135m --ratios 0.2,0.3 --n-samples 32 \\
        --point DAMP=1 --point DAMP=0.3 --point RIDGE=channel,DAMP=0.1 --json sweep.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

KNOBS: dict[str, tuple[str, str, type]] = {
    "DAMP": ("romcomp.methods.error_aware", "DAMP", float),
    "RIDGE": ("romcomp.methods.error_aware", "RIDGE", str),
    "ENERGY_EXPONENT": ("romcomp.compression.allocation", "ENERGY_EXPONENT", float),
    "SIGNAL": ("romcomp.compression.allocation", "SIGNAL", str),
    "AUTO_DENSE": ("romcomp.compression.allocation", "AUTO_DENSE", str),
    "AUTO_DENSE_ENCODER": ("romcomp.compression.allocation", "AUTO_DENSE_ENCODER", str),
}
CONFIG = ("allocation", "fit", "method")  # lower-case point keys: a configuration to compare against
VALIDATION = ("wikitext2-valid", "ptb-valid")
ENCODER_LINES = 500


def parse_point(spec: str) -> dict[str, str]:
    """``"DAMP=0.3,RIDGE=channel"`` -> ``{"DAMP": "0.3", "RIDGE": "channel"}`` (unknown knobs refused);
    ``CONFIG`` keys (``allocation=uniform,fit=local``) name a baseline configuration scored the same way."""
    point = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, _, value = part.partition("=")
        if key not in (*KNOBS, *CONFIG) or not value:
            raise SystemExit(f"bad --point part {part!r}; knobs: {', '.join((*KNOBS, *CONFIG))}")
        point[key] = value
    return point


def apply(point: dict[str, str]) -> None:
    """Set each knob's module constant in this process (the sweep's only way in: no option ships)."""
    for key, value in point.items():
        if key in CONFIG:
            continue
        module, attr, kind = KNOBS[key]
        mod = importlib.import_module(module)
        if not hasattr(mod, attr):
            raise SystemExit(f"{module} has no {attr}")
        setattr(mod, attr, kind(value))


def one(args: argparse.Namespace) -> None:
    """Child mode: compress with the point's constants, score each output, print one JSON line."""
    from romcomp.api import run_many
    from romcomp.compression.config import CompressConfig

    point = parse_point(args.one)
    apply(point)
    ratios = [float(r) for r in args.ratios.split(",")]
    out = args.work / "out"
    start = time.perf_counter()
    baseline = {k: v for k, v in point.items() if k in CONFIG}
    cfg = CompressConfig(model=args.model, ratio=ratios, out=out, n_samples=args.n_samples or None,
                         threads=args.threads, max_ram=args.max_ram, progress=False, overwrite=True,
                         data_dir=args.data_dir, **baseline)  # fmt: skip
    results = run_many(cfg)
    seconds = time.perf_counter() - start
    rows = []
    for ratio, result in zip(ratios, results, strict=True):
        found = scores(str(result.source_dir), str(result.out), args)
        rows.append({"point": args.one, "ratio": ratio, **found, "compress_s": seconds})
    print(json.dumps(rows))


def scores(dense_dir: str, path: str, args: argparse.Namespace) -> dict[str, float]:
    """A decoder's perplexity on each validation split (first ``--windows`` × 512); an encoder's mean cosine
    between its mean-pooled embeddings and the dense model's, on the first ``ENCODER_LINES`` lines of each
    validation split (of at least 40 characters)."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    import romcomp.hf  # noqa: F401 - registers the low-rank modules
    from romcomp.evaluation.perplexity import _eval_file, dataset_ids, perplexity

    tok = AutoTokenizer.from_pretrained(path)
    archs = AutoConfig.from_pretrained(path, trust_remote_code=True).architectures or []
    if any(a.endswith("ForCausalLM") for a in archs):
        model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32, trust_remote_code=True)
        return {n: float(perplexity(model, dataset_ids(n, tok, args.data_dir), 512, args.windows).ppl)
                for n in VALIDATION}  # fmt: skip
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_encoder import mean_pooled

    from romcomp.evaluation.perplexity import VALIDATION_FILES

    dense = AutoModel.from_pretrained(dense_dir, dtype=torch.float32).eval()
    compressed = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    found = {}
    for name in VALIDATION:
        lines = _eval_file(VALIDATION_FILES[name], args.data_dir).read_text(encoding="utf-8").splitlines()
        texts = [t.strip() for t in lines if len(t.strip()) >= 40][:ENCODER_LINES]
        a, b = mean_pooled(dense, tok, texts), mean_pooled(compressed, tok, texts)
        found["cos " + name] = float(torch.nn.functional.cosine_similarity(a, b).mean())
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratios", default="0.2,0.3")
    parser.add_argument("--n-samples", type=int, default=32, help="calibration windows (0: the default)")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-ram", default="8GB")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--point", action="append", default=[], help="KNOB=value[,KNOB=value] (repeatable)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/sweep_knobs"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        one(args)
        return
    points = args.point or [""]
    for p in points:
        parse_point(p)
    rows: list[dict] = json.loads(args.json.read_text()) if args.json and args.json.exists() else []
    done = {(r["point"], r["ratio"]) for r in rows}
    print(f"| point | ratio | scores ({', '.join(VALIDATION)}) | compress s |\n|---|---|---|---|")
    for r in rows:
        print(_row(r), flush=True)
    for p in points:
        if all((p, float(x)) in done for x in args.ratios.split(",")):
            continue
        work = args.work / (p.replace(",", "_").replace("=", "-") or "defaults")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        cmd = [sys.executable, __file__, "--one", p, "--work", str(work)]
        for flag in ("model", "ratios", "n_samples", "windows", "threads", "max_ram", "data_dir"):
            value = getattr(args, flag)
            if value is not None:
                cmd += ["--" + flag.replace("_", "-"), str(value)]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        done_run = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done_run.returncode != 0:
            print(f"| {p} | failed: {done_run.stderr.strip().splitlines()[-1:]} |", flush=True)
            continue
        new = json.loads(done_run.stdout.strip().splitlines()[-1])
        rows += new
        for r in new:
            print(_row(r), flush=True)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
        shutil.rmtree(work, ignore_errors=True)


def _row(r: dict) -> str:
    found = ", ".join(f"{v:.4g}" for k, v in r.items() if k not in ("point", "ratio", "compress_s"))
    return f"| {r['point'] or 'defaults'} | {r['ratio']:g} | {found} | {r['compress_s']:.0f} |"


if __name__ == "__main__":
    main()
