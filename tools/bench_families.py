"""Family coverage table: tiny random models of every family, through discovery, compression and reload.

Usage (from the repository root)::

    python tools/bench_families.py --out-dir /tmp/families

For each family of ``tests/families.py``: compress at full rank and check the logits against the dense
model's; compress at 0.3 and reload the output in a fresh process (plain transformers with
``trust_remote_code``, romcomp not imported), checking missing/unexpected keys and generating 8 tokens.
Prints one Markdown table; a failing step is shown with the first line of its error.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import traceback
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

RELOAD = """
import json, sys, torch
import transformers
auto = getattr(transformers, sys.argv[2])
model, info = auto.from_pretrained(sys.argv[1], trust_remote_code=True, output_loading_info=True)
if sys.argv[2] == "AutoModel":  # an encoder: a padded forward instead of generation
    out = model(input_ids=torch.tensor([[1, 2, 3, 0]]), attention_mask=torch.tensor([[1, 1, 1, 0]]))
    ids = torch.zeros(1, 8 if out.last_hidden_state.isfinite().all() else 0)
else:
    ids = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, do_sample=False)
bad = sorted(info["missing_keys"]) + sorted(info["unexpected_keys"]) + sorted(info["mismatched_keys"])
print(json.dumps({"bad": bad, "tokens": ids.shape[1], "class": type(model).__name__}))
"""


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]


def low_rank_count(result) -> str:
    """``8 of 12 linears``, and for MoE models ``, 6 of 6 fused expert projections``."""
    parts = []
    linears = [s for s in result.shapes if s.count == 1]
    experts = [s for s in result.shapes if s.count > 1]
    for label, members in (("linears", linears), ("fused expert projections", experts)):
        if members:
            parts.append(f"{sum(s.name in result.ranks for s in members)} of {len(members)} {label}")
    return ", ".join(parts)


def check_family(family: str, root: Path, calib: Path) -> dict[str, str]:
    from transformers import AutoModel, AutoModelForCausalLM

    import romcomp  # noqa: F401 - registers the romcomp quantization method
    from romcomp.api import run
    from romcomp.compression.config import CompressConfig
    from romcomp.compression.prepare import block_shapes
    from romcomp.model.discovery import discover
    from tests.families import make_bert, make_family_model

    small = {
        "n_samples": 8,
        "seq_len": 32,
        "progress": False,
        "threads": 1,
        "calib": str(calib),
        "overwrite": True,
    }
    row = {"family": family}
    try:
        src = make_bert(root / "src") if family == "bert" else make_family_model(root / "src", family)
        result = run(CompressConfig(model=str(src), ratio=0.3, out=root / "r0.3", **small))
        row["compress"] = f"yes ({low_rank_count(result)} low-rank)"
    except Exception as exc:  # noqa: BLE001 - the table reports any failure
        row["compress"] = f"no: {first_line(exc)}"
        return row
    auto = AutoModel if family == "bert" else AutoModelForCausalLM
    cmd = [sys.executable, "-c", RELOAD, str(root / "r0.3"), auto.__name__]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    if proc.returncode:
        row["reload"] = f"no: {(proc.stderr.strip().splitlines() or ['?'])[-1][:120]}"
    else:
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        row["reload"] = "yes" if not got["bad"] else f"no: {', '.join(got['bad'][:3])}"
        ok = "yes (padded forward)" if family == "bert" else "yes"
        row["generate"] = ok if got["tokens"] == 8 else f"no: {got['tokens']} tokens"
        row["class"] = got["class"]
    try:
        model = auto.from_pretrained(src).eval()
        arch = discover(model, model.config)
        shapes = block_shapes(model, arch, len(model.get_submodule(arch.blocks)))
        ranks = {s.name: min(s.d_in + int(s.bias), s.d_out) for s in shapes}  # exact fits
        run(CompressConfig(model=str(src), ratio=0.3, out=root / "full", ranks=ranks, **small))
        ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            dense, full = model(ids)[0], auto.from_pretrained(root / "full").eval()(ids)[0]
        err = float((full - dense).abs().max() / dense.abs().max())
        row["full rank = dense"] = f"yes ({err:.1e})" if err < 1e-4 else f"no ({err:.1e})"
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        row["full rank = dense"] = f"no: {first_line(exc)}"
    return row


def main() -> None:
    from tests.conftest import calibration_text
    from tests.families import FAMILIES

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--families", default=",".join([*FAMILIES, "bert"]))
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    calib = args.out_dir / "calib-english.txt"
    calib.write_text(calibration_text())
    cols = ["family", "compress", "reload", "generate", "full rank = dense", "class"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for family in args.families.split(","):
        row = check_family(family, args.out_dir / family, calib)
        print("| " + " | ".join(row.get(c, "–") for c in cols) + " |", flush=True)


if __name__ == "__main__":
    main()
