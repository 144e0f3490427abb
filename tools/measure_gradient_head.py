"""Peak RSS of the streamed gradient pass's forward and head step (FWSVD's first phase) on a real model.

Usage (from the repository root)::

    python tools/measure_gradient_head.py --model qwen2.5-coder-1.5b --n-samples 16 --max-ram 4GB

The step that peaked at 4.06 GB under ``--max-ram 4GB`` on Qwen2.5-Coder-1.5B before the head was chunked
and the input embedding left unmaterialized. Prints the run's plan, the forward's peak, the head's mean
loss and the final peak (``VmHWM``); the boundaries go to a temporary directory removed afterwards.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from romcomp.compression.activations import Boundary  # noqa: E402
from romcomp.compression.blocks import BlockIO  # noqa: E402
from romcomp.compression.config import CompressConfig  # noqa: E402
from romcomp.compression.gradients import head_gradient  # noqa: E402
from romcomp.compression.memory import fmt_bytes, peak_rss  # noqa: E402
from romcomp.compression.prepare import prepare  # noqa: E402
from romcomp.model.discovery import text_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-1.5b")
    parser.add_argument("--n-samples", type=int, default=16)
    parser.add_argument("--max-ram", default="4GB")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    cfg = CompressConfig(model=args.model, ratio=0.2, max_ram=args.max_ram, method="fwsvd",
                         allocation="uniform", fit="local", sequential=False, n_samples=args.n_samples,
                         seq_len=512,
                         threads=args.threads, progress=False)  # fmt: skip
    p = prepare(cfg.resolve())
    print(
        f"plan {fmt_bytes(p.mem.estimate)}: "
        + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in p.mem.parts.items())
    )
    engine = BlockIO(model=p.shell, arch=p.arch, ckpt=p.ckpt, batch_size=1)
    shape = (args.n_samples, 512, text_config(p.hf_config).hidden_size)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        source = Boundary.create(work / "a0.bin", shape, in_ram=False)
        engine.capture_inputs(p.windows, [source])
        source.commit()
        t0 = time.time()
        for i in range(p.n_blocks):
            sink = Boundary.create(work / f"a{i + 1}.bin", shape, in_ram=False)
            engine.forward(
                i, engine.load_block(i), Boundary.load(work / f"a{i}.bin", shape, in_ram=False), sink
            )
            sink.commit()
            engine.free_block(i)
        print(f"forward {time.time() - t0:.0f} s; peak so far {fmt_bytes(peak_rss())}", flush=True)
        last = Boundary.load(work / f"a{p.n_blocks}.bin", shape, in_ram=False)
        loss = head_gradient(engine, p.windows, last, Boundary.create(work / "g.bin", shape, in_ram=False))
    print(
        f"head mean loss {loss:.4f}; peak {fmt_bytes(peak_rss())} ({peak_rss():,} B); "
        f"--max-ram {args.max_ram}"
    )


if __name__ == "__main__":
    main()
