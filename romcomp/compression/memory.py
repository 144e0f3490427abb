"""``--max-ram``: parse the budget, estimate a run's peak from the model config, and pick a plan.

The estimate adds up the buffers the engine holds at its peak (one block's weights in fp32, the float64
covariances of one block, the activation cache, the embedding of the block-0 capture, the runtime's own
baseline, and the larger of the forward temporaries of one batch and the decomposition workspace of its
largest matrix, which never coexist), or the final top-level copy or a gradient method's streamed gradient
pass if larger (phases of their own), plus a measured
margin (``PLAN_MARGIN``). When nothing fits, the run is refused before any work, naming the smallest budget
that would work.
"""

from __future__ import annotations

import ctypes
import re
import resource
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from romcomp.errors import BadInputError

_UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}  # fmt: skip

RUNTIME_BASELINE = 700 * 2**20  # python + torch + transformers after import, measured ~600 MiB here
PLAN_MARGIN = 0.05
"""Added to the itemized estimate. Its largest measured shortfall: the error-aware default at the
Llama-2-7B shape, 9.52 GiB itemized vs 9.62 GiB measured (twice, ±0.02) — 1% of heap and transients not
itemized; every other measured run peaks below its itemized plan (SmolLM2 1.43 / 1.74, Qwen2.5-Coder-1.5B
4.51 / 5.45 GiB)."""
BATCH_CHOICES = (8, 4, 2, 1)


def parse_size(text: str) -> int:
    """``"4GB"`` → 4·10⁹, ``"24GiB"``/``"24G"`` → 24·2³⁰ bytes. A unit is required."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]+)\s*", text or "")
    if not m or m.group(2).lower() not in _UNITS:
        raise BadInputError(f"cannot parse memory size '{text}' (use e.g. 4GB, 24GiB, 512MB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def fmt_bytes(n: float) -> str:
    """Human-readable binary size."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


@dataclass(frozen=True)
class ModelDims:
    """What the estimate needs to know about the model."""

    hidden: int
    intermediate: int
    heads: int
    vocab: int
    block_params: int
    linear_shapes: tuple[tuple[int, int], ...]  # (d_in, d_out) of each block linear
    cov_dims: tuple[int, ...]  # width of each accumulated covariance (group input, or a narrow output)
    linear_inputs: tuple[int, ...] = ()  # width of each group's paired moments (the error-aware fit's)
    paired_dense: tuple[int, ...] = ()  # width of their dense side where it differs: a narrow linear's
    # dense outputs paired with its compressed inputs (empty: the same widths as ``linear_inputs``)
    cross_shapes: tuple[tuple[int, int], ...] | None = None  # linears the error-aware fit regresses on
    # their inputs (None: all); the others pair their outputs (ROM's workspace)
    shared_inputs: tuple[int, ...] = ()  # input width of each group of several linears (a memoized root)
    expert_covs: tuple[int, ...] = ()  # width of every expert's moment (all experts, projections of a block)


@dataclass(frozen=True)
class MemoryPlan:
    """The chosen buffers and the estimated peak (bytes)."""

    budget: int
    estimate: int
    batch_size: int
    activations_in_ram: bool
    parts: dict

    def as_dict(self) -> dict:
        return asdict(self)


WORKSPACE = "decomposition workspace (float64)"
TEMPORARIES = "forward temporaries"
TAPS = "dense taps (the error-aware fit's stored dense values)"
REPLAY = "replayed first sublayer (romcomp.compression.replay), one per compressed stream"
TOP_LEVEL = "top-level copy (largest tensor, read + mapped + checked)"
GRADIENTS = "gradient pass (the head, or one block under autograd)"
HEAD_CHUNK = (
    128  # positions per output-head call of the gradient pass (romcomp.compression.gradients imports it)
)


def estimate(dims: ModelDims, n_samples: int, seq_len: int, batch: int, in_ram: bool,
             streams: int = 1, cross: bool = False, sequential: bool = True,
             gradients: int = 0) -> dict[str, int]:  # fmt: skip
    """Bytes by part for one configuration; :func:`peak_bytes` combines them by phase.

    ``gradients``: the streamed gradient pass runs first (:mod:`romcomp.compression.gradients`) with that many
    weight-sized float32 gradient buffers per linear (1: FWSVD's per-window gradient; 2: LPAF's, which
    also sums them) — a phase of its own, before the block phase (:func:`_gradient_phase`).

    ``streams``: activation streams kept (one compressed stream per ratio, plus the dense one with
    ``cross``, the error-aware fit); each adds a block copy. With ``cross`` every compressed stream has,
    per group, a cross moment beside the second moment: for the groups of one stage at a time when
    ``sequential`` (the engine collects and fits stage by stage), for all groups at once otherwise.
    """
    f32, f64 = 4, 8
    token_bytes = seq_len * dims.hidden * f32
    act = 2 * streams * (n_samples if in_ram else batch) * token_bytes  # input + output of each stream
    dense = dims.paired_dense or dims.linear_inputs
    cross_covs = [
        (streams - 1) * (d + 1) * (d + e + 2) * f64  # the compressed side's square and the cross moment
        for d, e in zip(dims.linear_inputs, dense, strict=True)
    ]
    linear_covs = (
        sum((d + 1) ** 2 for d in dims.cov_dims) * f64
        if not cross
        else (max(cross_covs) if sequential else sum(cross_covs))
    )
    # the experts' stage comes after the linears' moments are freed, one output at a time
    expert_covs = sum((d + 1) ** 2 for d in dims.expert_covs) * f64
    return {
        "runtime": RUNTIME_BASELINE,
        "block weights (source + fp32 + factors)": (3 + streams - 1) * dims.block_params * f32,
        "covariances (float64)": max(linear_covs, expert_covs),
        WORKSPACE: _workspace(dims, cross),
        "activation cache": act,
        REPLAY: (streams - int(cross)) * n_samples * token_bytes if in_ram else 0,
        TAPS: sum(dense) * seq_len * (n_samples if in_ram else batch) * f32 if cross else 0,
        TEMPORARIES: batch * seq_len * (4 * dims.intermediate + 8 * dims.hidden) * f32
        + batch * dims.heads * seq_len * seq_len * f32 * 2,
        "embedding (block-0 capture)": dims.vocab * dims.hidden * f32,
        TOP_LEVEL: 3 * dims.vocab * dims.hidden * f32,
        GRADIENTS: _gradient_phase(dims, n_samples, seq_len, gradients) if gradients else 0,
    }


def _gradient_phase(dims: ModelDims, n_samples: int, seq_len: int, gradients: int) -> int:
    """The streamed gradient pass's larger step (besides the runtime), one window at a time:

    - the head: the output head in float32 (the input embedding is not materialized: the blocks are fed
      stored hidden states) and as much again — Qwen2.5-Coder-1.5B's head step measured 3.68 GiB holding
      two 0.87 GiB matrices where matrices, chunk tensors and runtime add up to 2.88 GiB — and six
      chunk × vocabulary float32 tensors (the logits of ``HEAD_CHUNK`` positions, the loss's log-softmax
      and the backward's temporaries: four to five measured on a 100k-word head, run to run,
      ``tests/test_gradients.py``);
    - one block of the reverse sweep: its weights (as the block phase counts them), ``gradients``
      weight-sized buffers, the autograd graph of one window (three times the forward temporaries of a
      batch of one) and three mapped boundary files (the block's input, the gradient from above, the one
      written below).
    """
    f32 = 4
    matrices = 2 * dims.vocab * dims.hidden * f32
    head = matrices + 6 * min(seq_len, HEAD_CHUNK) * dims.vocab * f32
    graph = 3 * (seq_len * (4 * dims.intermediate + 8 * dims.hidden) + 2 * dims.heads * seq_len**2) * f32
    boundaries = 3 * n_samples * seq_len * dims.hidden * f32
    block = (3 + gradients) * dims.block_params * f32 + graph + boundaries
    return max(head, block)


def _workspace(dims: ModelDims, cross: bool) -> int:
    """The decomposition's float64 temporaries for its largest linear.

    ROM: W, M = W Σ^½ and the basis (big × small) plus Σ, its root and the small eigenproblem. The
    error-aware fit's peak is its ridge regression (``error_aware.target_map``): two (d_in + 1)² squares
    (Σ + δI, its Cholesky root) and four d_out × (d_in + 1) products, plus the whitening root a group of
    several linears keeps memoized meanwhile. Measured at Llama-2-7B's shapes (``tests/test_math.py``
    plants them smaller): down_proj 2.88 GiB (counted 3.15), gate_proj 1.27 (1.59), q_proj 0.65 (0.75).
    """
    f64 = 8
    rom = max(4 * min(s) ** 2 + 3 * max(s) * min(s) for s in dims.linear_shapes) * f64
    if not cross:
        return rom
    shapes = dims.linear_shapes if dims.cross_shapes is None else dims.cross_shapes
    fit = max((2 * (d_in + 1) ** 2 + 4 * d_out * (d_in + 1) for d_in, d_out in shapes), default=0) * f64
    memo = max(((d + 1) ** 2 for d in dims.shared_inputs), default=0) * f64
    return max(rom, fit + memo)


def peak_bytes(parts: dict[str, int]) -> int:
    """The estimated peak: the block phase holds everything but the forward temporaries and the
    decomposition workspace *at once* — those two never coexist (forwards finish before decomposing) — and
    the final top-level copy (embedding/head tensors, one at a time) happens after every block is freed."""
    block_phase = sum(v for k, v in parts.items() if k not in (WORKSPACE, TEMPORARIES, TOP_LEVEL, GRADIENTS))
    block_phase += max(parts[WORKSPACE], parts[TEMPORARIES])
    top_phase = parts["runtime"] + parts["activation cache"] + parts[TOP_LEVEL]
    return max(block_phase, top_phase, parts["runtime"] + parts.get(GRADIENTS, 0))


def plan(dims: ModelDims, n_samples: int, seq_len: int, budget: int, streams: int = 1,
         cross: bool = False, sequential: bool = True, gradients: int = 0) -> MemoryPlan:  # fmt: skip
    """The most comfortable configuration that fits ``budget``, or a refusal naming the minimum."""
    best: tuple[int, dict[str, int]] | None = None
    for in_ram in (True, False):
        for batch in BATCH_CHOICES:
            parts = estimate(
                dims, n_samples, seq_len, min(batch, n_samples), in_ram, streams, cross, sequential, gradients
            )
            total = int(peak_bytes(parts) * (1 + PLAN_MARGIN))
            if total <= budget:
                return MemoryPlan(budget, total, min(batch, n_samples), in_ram, parts)
            if best is None or total < best[0]:
                best = (total, parts)
    assert best is not None
    raise BadInputError(
        f"--max-ram {fmt_bytes(budget)} is too small for this model and calibration set; "
        f"the smallest plan needs about {fmt_bytes(best[0])} (activations spilled to disk, batch 1)"
    )


def peak_rss() -> int:
    """Process RSS high-water mark in bytes (file pages mapped and touched count too): ``VmHWM`` of this
    process image where /proc has it — ``ru_maxrss`` also carries the high-water mark of whatever process
    forked this one (Linux keeps it across exec), so a romcomp started from a large Python process would
    report that process's memory — else ``ru_maxrss``."""
    found = proc_status_bytes("VmHWM")
    return found[0] if found else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def proc_status_bytes(*fields: str) -> tuple[int, ...] | None:
    """Memory fields (``VmRSS``, ``RssAnon``, ``VmHWM``, …) of this process from /proc, in bytes; None
    where /proc is missing (not Linux) or lacks a field."""
    try:
        lines = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        return tuple(int(lines[f].split()[0]) * 1024 for f in fields)
    except (OSError, KeyError, ValueError):
        return None


def resident_bytes() -> tuple[int, int]:
    """(RSS, its anonymous part) now. The difference is file pages mapped and resident (safetensors shards
    being read); a flat anonymous part across blocks is what shows that nothing accumulates."""
    found = proc_status_bytes("VmRSS", "RssAnon")
    if found is None:
        rss = psutil.Process().memory_info().rss
        return rss, rss
    return found[0], found[1]


def release_heap() -> None:
    """Hand freed heap back to the OS between blocks so the RSS stays flat (glibc ``malloc_trim``)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass
