"""Peak memory of ``romcomp eval``'s scoring paths (issue 22), in minutes rather than hours.

Two measurements, each printing one JSON line:

``harness``: the zero-shot suite on a real model, with lm-eval's stock ``HFLM`` or romcomp's
``BoundedHFLM``. lm-eval hands *all* tasks' log-likelihood requests to the model at once and scores them
longest first, so the suite's peak is reached by its longest requests. ``--requests K`` scores only the
K longest requests of the whole suite (every document of every task is still loaded, tokenized and
turned into requests) and answers the rest with a dummy, so the worst batches run for real::

    nice -n 19 python tools/bench_eval_memory.py harness --model smollm2-135m --impl stock --requests 32
    nice -n 19 python tools/bench_eval_memory.py harness --model smollm2-135m --impl bounded --requests 32

``shape``: a Llama-2-7B-shaped model cut to ``--layers`` decoder layers (random bf16 weights: only memory
is measured). Activations live one layer at a time (no KV cache), so the peak above the weights is what a
32-layer model adds on top of its 13.5 GB of bf16 weights. It measures, in order: loading a saved copy
with ``romcomp eval``'s loader (peak over the weights), one perplexity window, and the bounded harness on
``--batch`` requests of ``--seq-len`` tokens::

    nice -n 19 python tools/bench_eval_memory.py shape --layers 2 --seq-len 2048

Peaks are the kernel's ``VmHWM``, reset between phases through ``/proc/self/clear_refs``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LLAMA2_7B = dict(
    hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
    vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
)  # fmt: skip
LLAMA2_7B_PARAMS = 6_738_415_616


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _gib(value: int) -> float:
    return round(value / 2**30, 3)


def harness(args: argparse.Namespace) -> dict[str, Any]:
    from lm_eval.models.huggingface import HFLM

    from calib.paths import resolve_data_dir
    from romcomp.evaluation.loglik import bounded_hflm
    from romcomp.evaluation.plan import parse_tasks
    from romcomp.evaluation.run import load_model
    from romcomp.evaluation.zeroshot import run_zeroshot
    from romcomp.model.sources import resolve_model

    torch.set_num_threads(args.threads)
    resolved = resolve_model(args.model)
    model, tok = load_model(resolved.path, args.dtype)
    loaded = _status("VmRSS")
    if args.impl == "stock":
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=args.batch_size)
    else:
        lm = bounded_hflm(model, tok, args.batch_size, None)
    scored: dict[str, int] = {}
    full = lm._loglikelihood_tokens

    def longest_only(requests: list[Any], disable_tqdm: bool = False, override_bs: Any = None) -> list[Any]:
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1] + requests[i][2]))
        keep = order[: args.requests]
        answers = full([requests[i] for i in keep], disable_tqdm)
        out: list[Any] = [(0.0, False)] * len(requests)
        for i, answer in zip(keep, answers, strict=True):
            out[i] = answer
        scored["requests"] = len(requests)
        scored["longest_tokens"] = len(requests[order[0]][1] + requests[order[0]][2]) if order else 0
        return out

    lm._loglikelihood_tokens = longest_only
    tasks = parse_tasks(args.tasks).zeroshot
    start = time.perf_counter()
    run_zeroshot(model, tok, tasks, resolve_data_dir(args.data_dir), limit=args.limit, lm=lm)
    return {
        "mode": "harness", "impl": args.impl, "model": args.model, "dtype": args.dtype, "tasks": tasks,
        "limit": args.limit, "batch_size": args.batch_size, "scored_longest": args.requests, **scored,
        "rss_after_load_gib": _gib(loaded), "peak_rss_gib": _gib(_status("VmHWM")),
        "seconds": round(time.perf_counter() - start, 1), "threads": torch.get_num_threads(),
    }  # fmt: skip


def shape(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from romcomp.evaluation.loglik import _bounded_class, bounded_hflm
    from romcomp.evaluation.perplexity import perplexity
    from romcomp.evaluation.run import load_model
    from tests.conftest import byte_tokenizer

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    _bounded_class()  # imports lm_eval: the process as romcomp eval runs it
    base = _status("VmRSS")
    config = LlamaConfig(
        **LLAMA2_7B, num_hidden_layers=args.layers, dtype=args.dtype, tie_word_embeddings=False
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(dtype)
    with torch.no_grad():
        for param in model.parameters():
            param.uniform_(-0.02, 0.02)
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
    model.model.rotary_emb = type(model.model.rotary_emb)(config)  # buffers lost on the meta device
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    result: dict[str, Any] = {"mode": "shape", "layers": args.layers, "dtype": args.dtype,
                              "weight_gib": _gib(weights), "process_base_gib": _gib(base)}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="romcomp-shape-") as tmp:  # load as romcomp eval does
        model.save_pretrained(tmp)
        byte_tokenizer().save_pretrained(tmp)
        del model
        _reset_peak()
        before = _status("VmRSS")
        model, _ = load_model(Path(tmp), args.dtype)
        with torch.no_grad():  # page in weights a safetensors load may have left memory-mapped
            for param in model.parameters():
                param.sum()
        result["load_peak_over_weights_gib"] = _gib(_status("VmHWM") - before - weights)
    model.model.rotary_emb = type(model.model.rotary_emb)(model.config)
    resident = _status("VmRSS")
    ids = torch.randint(0, 32000, (args.seq_len,), generator=torch.Generator().manual_seed(0))
    _reset_peak()
    start = time.perf_counter()
    ppl = perplexity(model, ids, seq_len=args.seq_len, max_windows=1, batch_size=1)
    result["ppl_peak_over_resident_gib"] = _gib(_status("VmHWM") - resident)
    result["ppl_seconds"] = round(time.perf_counter() - start, 1)
    result["ppl_finite"] = bool(ppl.ppl == ppl.ppl)
    tok = AutoTokenizer.from_pretrained(args.tokenizer) if args.tokenizer else byte_tokenizer()
    lm = bounded_hflm(model, tok, args.batch, None)
    gen = torch.Generator().manual_seed(1)
    reqs = [
        (("ctx", str(i)), torch.randint(0, 32000, (args.seq_len - 8,), generator=gen).tolist(), [5, 6, 7, 8])
        for i in range(args.batch)
    ]
    _reset_peak()
    lm._loglikelihood_tokens(reqs, True)
    result["harness_peak_over_resident_gib"] = _gib(_status("VmHWM") - resident)
    result["harness_requests"] = f"{args.batch} x {args.seq_len - 4} tokens"
    over = max(result["ppl_peak_over_resident_gib"], result["harness_peak_over_resident_gib"])
    full = LLAMA2_7B_PARAMS * torch.empty(0, dtype=dtype).element_size()
    result["estimate_7b_eval_peak_gib"] = _gib(int(full + base + over * 2**30))
    result["estimate_7b_load_peak_gib"] = _gib(
        int(full + base + result["load_peak_over_weights_gib"] * 2**30)
    )
    result["threads"] = torch.get_num_threads()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    h = sub.add_parser("harness", help="zero-shot suite, K longest requests scored")
    h.add_argument("--model", default="smollm2-135m")
    h.add_argument("--impl", choices=["stock", "bounded"], default="bounded")
    h.add_argument("--requests", type=int, default=32, help="longest requests scored for real")
    h.add_argument("--tasks", default="zeroshot")
    h.add_argument("--limit", type=int, default=None)
    h.add_argument("--batch-size", type=int, default=4)
    h.add_argument("--dtype", default="float32")
    h.add_argument("--data-dir", default=os.environ.get("ROMCOMP_DATA_DIR"))
    s = sub.add_parser("shape", help="Llama-2-7B shape, few layers, random bf16 weights")
    s.add_argument("--layers", type=int, default=2)
    s.add_argument("--seq-len", type=int, default=2048)
    s.add_argument("--batch", type=int, default=4, help="harness requests of seq-len tokens")
    s.add_argument("--dtype", default="bfloat16")
    s.add_argument("--tokenizer", default=None)
    for p in (h, s):
        p.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    print(json.dumps(harness(args) if args.mode == "harness" else shape(args)))


if __name__ == "__main__":
    main()
