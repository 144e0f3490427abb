"""Sentence-encoder benchmark: how close a compressed encoder's embeddings stay to the dense model's.

Usage (from the repository root)::

    python tools/bench_encoder.py --ratios 0.1,0.2,0.3 --out-dir /tmp/benc --threads 2

Each configuration is one ``romcomp`` run writing every ratio; then the mean-pooled (attention-masked)
embeddings of held-out text — the first 500 distinct SNLI test sentences and the 100 held-out C4 documents
(first 128 tokens each) — are compared with the dense model's by cosine similarity. Prints one table
(mean and minimum cosine per set), the machine and the command.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
SNLI = "nli/snli_1.0_test_subset.jsonl"
N_SENTENCES = 500
MAX_TOKENS = 128
CONFIGS = {
    "default (auto+error-aware, 512x64)": [],
    "uniform+local, 512x64": ["--allocation", "uniform", "--fit", "local", "--no-sequential"],
    "default, 128x512": ["--n-samples", "128", "--seq-len", "512"],
}


def held_out_texts(data_dir: Path) -> dict[str, list[str]]:
    """The evaluation sets: SNLI test sentences and held-out C4 documents (never calibration data)."""
    from romcomp.evaluation.perplexity import c4_heldout_texts, ppl_data_files

    sentences: list[str] = []
    with (data_dir / SNLI).open() as f:
        for line in f:
            row = json.loads(line)
            for text in (row["sentence1"], row["sentence2"]):
                if text not in sentences:
                    sentences.append(text)
    c4 = c4_heldout_texts(ppl_data_files(["c4"], data_dir)["c4"])
    return {"snli": sentences[:N_SENTENCES], "c4": c4}


def mean_pooled(model: torch.nn.Module, tokenizer, texts: list[str], batch: int = 32) -> torch.Tensor:
    """Sentence-transformers' pooling: the mean of the last hidden states over non-padding tokens."""
    out = []
    for i in range(0, len(texts), batch):
        enc = tokenizer(texts[i : i + batch], padding=True, truncation=True, max_length=MAX_TOKENS,
                        return_tensors="pt")  # fmt: skip
        with torch.inference_mode():
            hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"][..., None].to(hidden.dtype)
        out.append((hidden * mask).sum(1) / mask.sum(1))
    return torch.cat(out)


def embedding_cosines(dense_spec: str, out: Path, data_dir: Path) -> dict[str, torch.Tensor]:
    """Per held-out text, the cosine between the dense and the compressed model's embeddings."""
    from transformers import AutoModel, AutoTokenizer

    import romcomp  # noqa: F401 - registers the romcomp quantization method
    from romcomp.model.sources import resolve_model

    dense_dir = resolve_model(dense_spec).path
    tokenizer = AutoTokenizer.from_pretrained(dense_dir)
    dense = AutoModel.from_pretrained(dense_dir, dtype=torch.float32).eval()
    compressed = AutoModel.from_pretrained(out, dtype=torch.float32).eval()
    cosines = {}
    for name, texts in held_out_texts(data_dir).items():
        a, b = mean_pooled(dense, tokenizer, texts), mean_pooled(compressed, tokenizer, texts)
        cosines[name] = torch.nn.functional.cosine_similarity(a, b)
    return cosines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="all-minilm-l6-v2")
    parser.add_argument("--ratios", default="0.1,0.2,0.3")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT.parent / "shared" / "data")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma list of configuration names")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO_ROOT / "tools"))
    from bench_quality import run_child

    args.out_dir.mkdir(parents=True, exist_ok=True)
    log = args.out_dir / "bench.log"
    ratios = [float(r) for r in args.ratios.split(",")]
    rows = []
    for n, name in enumerate(args.configs.split(",")):
        parent = args.out_dir / f"config{n}"
        cmd = [sys.executable, "-m", "romcomp.cli", args.model, "--ratio", args.ratios, "--out", str(parent),
               "--data-dir", str(args.data_dir), "--no-progress", "--overwrite", *CONFIGS[name]]  # fmt: skip
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        if len(ratios) == 1:
            cmd[cmd.index("--out") + 1] = str(parent / f"{args.model}-r{ratios[0]:g}")
        code, seconds, rss = run_child(cmd, log)
        if code != 0:
            sys.exit(f"configuration {name} failed (exit {code}); see {log}")
        for r in ratios:
            cos = embedding_cosines(args.model, parent / f"{args.model}-r{r:g}", args.data_dir)
            rows.append((name, r, cos, seconds, rss))
    print(
        "| configuration | ratio | SNLI mean | SNLI min | C4 mean | C4 min | compress s (all ratios) "
        "| peak RSS |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, r, cos, seconds, rss in rows:
        s, c = cos["snli"], cos["c4"]
        print(f"| {name} | {r:g} | {s.mean():.4f} | {s.min():.4f} | {c.mean():.4f} | {c.min():.4f} | "
              f"{seconds:.0f} | {rss / 2**20:.0f} MiB |")  # fmt: skip
    print(f"\n- machine: {platform.machine()}, {torch.get_num_threads()} threads; {platform.platform()}")
    print(f"- command: {shlex.join(sys.argv)}")


if __name__ == "__main__":
    main()
