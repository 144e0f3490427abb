"""Peak RSS of the streamed gradient pass's forward and head step (FWSVD's first phase) on a real model.

Usage (from the repository root)::

    python tools/measure_gradient_head.py            # Qwen2.5-Coder-1.5B, 16 x 512 C4, --max-ram 4GB plan

The step that peaked at 4.06 GB under ``--max-ram 4GB`` before the head was chunked and the input
embedding left unmaterialized; prints the plan, the forward's peak, the head's loss and the final peak.
"""

import tempfile
import time
from pathlib import Path

import torch

from romcomp.activations import Boundary
from romcomp.api import prepare
from romcomp.config import CompressConfig
from romcomp.discovery import text_config
from romcomp.engine import Engine
from romcomp.gradients import head_gradient
from romcomp.memory import fmt_bytes, peak_rss
from romcomp.methods import get_method

cfg = CompressConfig(
    model="qwen2.5-coder-1.5b",
    ratio=0.2,
    max_ram="4GB",
    method="fwsvd",
    allocation="uniform",
    fit="local",
    sequential=False,
    n_samples=16,
    seq_len=512,
    threads=2,
    progress=False,
)
budget = cfg.validate()
p = prepare(cfg, budget)
print("plan", fmt_bytes(p.mem.estimate), {k: fmt_bytes(v) for k, v in p.mem.parts.items()}, flush=True)
engine = Engine(
    model=p.shell, arch=p.arch, ckpt=p.ckpt, method=get_method("fwsvd"), out_dtype=torch.float32, batch_size=1
)
work = Path(tempfile.mkdtemp(dir="/tmp"))
shape = (16, 512, text_config(p.hf_config).hidden_size)
src = Boundary.create(work / "a0.bin", shape, in_ram=False)
engine.capture_inputs(p.windows, [src])
src.commit()
t0 = time.time()
for i in range(p.n_blocks):
    sink = Boundary.create(work / f"a{i + 1}.bin", shape, in_ram=False)
    engine.forward(i, engine.load_block(i), Boundary.load(work / f"a{i}.bin", shape, in_ram=False), sink)
    sink.commit()
    engine.free_block(i)
print("forward done", round(time.time() - t0), "s; peak so far", fmt_bytes(peak_rss()), flush=True)
grad = Boundary.create(work / "g.bin", shape, in_ram=False)
loss = head_gradient(engine, p.windows, Boundary.load(work / f"a{p.n_blocks}.bin", shape, in_ram=False), grad)
print("head loss", round(loss, 4), "(perplexity", round(float(torch.tensor(loss).exp()), 2), ")")
print("PEAK", peak_rss(), fmt_bytes(peak_rss()), "budget 4GB =", 4_000_000_000)
