"""``--max-ram``: parse the budget, estimate a run's peak from the model config, and pick a plan.

The estimate adds up the buffers the engine holds at its peak (one float32 block per activation stream,
the float64 covariances of one stage, the activation cache, the runtime's own baseline, and the larger of
the forward temporaries of one batch and the decomposition workspace of its costliest linear, which never
coexist), or the final top-level copy or a gradient method's streamed gradient pass if larger (phases of
their own; the block-0 capture, the embedding beside half the activation cache, is always below the
top-level copy), plus a measured margin (``PLAN_MARGIN``). When nothing fits, the run is refused before
any work, naming the smallest budget that would work.
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

RUNTIME_BASELINE = 600 * 2**20  # python + torch + transformers + the meta shell: RSS between blocks measured
# 0.44-0.48 GiB (SmolLM2-135M), 0.56-0.59 GiB (Llama-2-7B shape; tools/bench_scale.py --trace)
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
    group_params: int = 0  # weights of the largest linear group (its dense linears outlive their factors)
    expert_covs: tuple[int, ...] = ()  # width of every expert's moment (all experts, projections of a block)
    n_experts: int = 0  # experts per fused projection (the expert moments are held a chunk of them at a time)


@dataclass(frozen=True)
class MemoryPlan:
    """The chosen buffers and the estimated peak (bytes)."""

    budget: int
    estimate: int
    batch_size: int
    activations_in_ram: bool
    parts: dict
    expert_chunk: int | None = None  # MoE experts whose moments one statistics pass holds (None: all)

    def as_dict(self) -> dict:
        return asdict(self)


WORKSPACE = "decomposition workspace (float64)"
TEMPORARIES = "forward temporaries"
TAPS = "dense taps (the error-aware fit's stored dense values)"
REPLAY = "replayed attention (recorded outputs)"  # romcomp.compression.replay, one per compressed stream
BLOCK_WEIGHTS = "block weights (float32, one copy per stream)"
TOP_LEVEL = "top-level copy (largest tensor, read + mapped + checked)"
GRADIENTS = "gradient pass (the head, or one block under autograd)"
HEAD_CHUNK = (
    128  # positions per output-head call of the gradient pass (romcomp.compression.gradients imports it)
)


def estimate(dims: ModelDims, n_samples: int, seq_len: int, batch: int, in_ram: bool,
             streams: int = 1, cross: bool = False, sequential: bool = True,
             gradients: int = 0, profile: bool = False, expert_chunk: int | None = None,
             ) -> dict[str, int]:  # fmt: skip
    """Bytes by part for one configuration; :func:`peak_bytes` combines them by phase.

    ``gradients``: the streamed gradient pass runs first (:mod:`romcomp.compression.gradients`) with that many
    weight-sized float32 gradient buffers per linear (1: FWSVD's per-window gradient; 2: LPAF's, which
    also sums them) — a phase of its own, before the block phase (:func:`_gradient_phase`).

    ``streams``: activation streams kept (one compressed stream per ratio, plus the dense one with
    ``cross``, the error-aware fit); each adds a block copy. With ``cross`` every compressed stream has,
    per group, a cross moment beside the second moment: for the groups of one stage at a time when
    ``sequential`` (the engine collects and fits stage by stage), for all groups at once otherwise.

    ``profile``: the dense pre-pass runs (data-driven allocation); it holds every linear's moment of a
    block at once, and a chunk's expert moments. ``expert_chunk``: experts per statistics pass (None: all).
    """
    f32, f64 = 4, 8
    token_bytes = seq_len * dims.hidden * f32
    act = 2 * streams * (n_samples if in_ram else batch) * token_bytes  # input + output of each stream
    dense = dims.paired_dense or dims.linear_inputs
    cross_covs = [
        (streams - 1) * (d + 1) * (d + e + 2) * f64  # the compressed side's square and the cross moment
        for d, e in zip(dims.linear_inputs, dense, strict=True)
    ]
    local_covs = [(d + 1) ** 2 for d in dims.cov_dims]
    linear_covs = (
        (max(local_covs, default=0) if sequential else sum(local_covs)) * f64  # one stage's at a time
        if not cross
        else (max(cross_covs) if sequential else sum(cross_covs))
    )
    # the experts' stage comes after the linears' moments are freed, ``expert_chunk`` experts at a time
    n = dims.n_experts
    expert_covs = sum((d + 1) ** 2 for d in dims.expert_covs) * f64
    expert_covs = -(-expert_covs * min(expert_chunk or n, n) // n) if n else 0
    if profile:  # the pre-pass: every linear's moment and a chunk of the experts' in the same forwards
        linear_covs = max(linear_covs, sum(local_covs) * f64 + expert_covs)
    return {
        "runtime": RUNTIME_BASELINE,
        BLOCK_WEIGHTS: (streams * dims.block_params + (0 if cross else dims.group_params)) * f32,
        "covariances (float64)": max(linear_covs, expert_covs),
        WORKSPACE: _workspace(dims, cross),
        "activation cache": act,
        REPLAY: (streams - int(cross)) * n_samples * token_bytes if in_ram else 0,
        TAPS: sum(dense) * seq_len * (n_samples if in_ram else batch) * f32 if cross else 0,
        TEMPORARIES: batch * seq_len * (2 * dims.intermediate + 4 * dims.hidden) * f32
        + batch * dims.heads * seq_len * seq_len * f32,  # a dense forward at the 7B shape, 8 × 512: 0.56 GiB
        # measured (bench_scale --trace), 0.84 counted
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
    """The decomposition's temporaries for its costliest linear, besides the statistics (counted as
    covariances): the largest of :func:`rom_workspace` (the local fit; from output moments where the
    covariances say so), :func:`regression_workspace` (the error-aware fit's linears in ``cross_shapes``)
    and, for the error-aware fit's others (paired outputs), twice ROM's from outputs, plus
    ``WORKSPACE_OVERHEAD``."""
    widths = set(dims.cov_dims)

    def local(d_in: int, d_out: int) -> int:  # the local fit reads a narrow linear's outputs when no
        # covariance of its input width was accumulated (ambiguous: the costlier input route)
        return rom_workspace(d_in, d_out, outputs=d_out < d_in and d_in not in widths)

    if not cross:
        return max((local(*s) for s in dims.linear_shapes), default=0) + WORKSPACE_OVERHEAD
    shapes = dims.linear_shapes if dims.cross_shapes is None else dims.cross_shapes
    shared = set(dims.shared_inputs)
    fit = max((regression_workspace(d_in, d_out, d_in in shared) for d_in, d_out in shapes), default=0)
    rest = list(dims.linear_shapes)
    for s in shapes:
        if s in rest:
            rest.remove(s)
    by_outputs = max((2 * rom_workspace(d_in, d_out, outputs=True) for d_in, d_out in rest), default=0)
    return max(fit, by_outputs) + WORKSPACE_OVERHEAD


WORKSPACE_OVERHEAD = 32 * 2**20
"""Besides the tensors the formulas below name: BLAS/LAPACK buffers and allocator slack, measured
16-22 MiB at every shape (d 1024-2752, two threads) over the formulas' float64 redo route."""


def _eigensolve(d_in: int, d_out: int) -> int:
    """``top_left_singular`` of the whitened d_out × d_in product (float32, 4 d_out d_in bytes, held by
    the caller): the Gram (s² for s = the smaller side), LAPACK ``syevd``'s scaled copy, Fortran copy and
    work (2 s²); and its float64 redo when the float32 tail is unresolved (``FLOAT32_TAIL_FLOOR``, ~10%
    of the linears of real models): the product in float64 beside the float32 one, a float64 Gram, copy,
    Fortran copy and work — the larger, a plan may not bet on the float32 route."""
    s = min(d_in, d_out)
    return max(4 * d_out * d_in + 20 * s * s, 12 * d_out * d_in + 40 * s * s)


def rom_workspace(d_in: int, d_out: int, outputs: bool = False) -> int:
    """ROM's decomposition of one linear, bytes. From output moments: ``top_eigvecs`` of the d_out² moment
    (a mirrored float64 copy and ``syevd``'s, float64 at worst: 40 d_out² bytes). From inputs: the
    whitening root (Σ mirrored and its Cholesky root, float64: 16 d_in²; the root stays memoized), the
    float32 whitened product and the eigensolve (:func:`_eigensolve`).

    Measured at a quarter and a half of Llama-2-7B's shapes, forcing the float64 redo (the float32
    route: 55-85% of it), VmHWM over the RSS before: (1024 → 2752) 101.6 MiB (this formula 80.2),
    (1024 → 1024) 74.3 (60.0), (2048 → 2048) 258.5 (240.0), (2752 → 1024) 147.7 (130.0), from outputs
    (2752 → 1024) 38.6 (40.0) — the differences are ``WORKSPACE_OVERHEAD``."""
    if outputs:
        return 40 * d_out * d_out
    n = d_in
    return max(16 * n * n, 12 * n * n + 4 * d_out * n, 8 * n * n + _eigensolve(d_in, d_out))


def regression_workspace(d_in: int, d_out: int, memoized: bool = False) -> int:
    """The error-aware fit of one linear, bytes (``error_aware.decompose``, from paired inputs or dense
    outputs): ``target_map`` holds the float64 weight (8 d_out d_in), Σ (float64) with its float32 copy
    and Cholesky root, the float32 numerator and the solve's result — at most 16 d_in² + 12 d_out d_in
    (plus a root memoized by an earlier linear of the group) or 4 d_in² + 16 d_out d_in; then, with the
    float64 map M₀ (8 d_out d_in) held, ROM's steps on ``M₀`` (:func:`rom_workspace`'s, with M₀ cast).

    Measured as :func:`rom_workspace` (float64 redo forced): paired inputs (1024 → 2752) 123.8 MiB
    (this formula 101.8), (1024 → 1024) 83.9 (68.0), (2048 → 2048) 291.2 (272.0), (2048 → 1024) 129.5
    (112.0); paired dense outputs (2752 → 1024) 169.6 (151.5), (2048 → 1024) 128.2 (112.0)."""
    n, mn = d_in, d_out * d_in
    memo = 8 * n * n if memoized else 0
    target = max(16 * n * n + 12 * mn + memo, 4 * n * n + 16 * mn + memo)
    return max(target, 12 * n * n + 16 * mn, 8 * n * n + 8 * mn + _eigensolve(d_in, d_out))


def peak_bytes(parts: dict[str, int]) -> int:
    """The estimated peak: the block phase holds everything but the forward temporaries and the
    decomposition workspace *at once* — those two never coexist (forwards finish before decomposing) — and
    the final top-level copy (embedding/head tensors, one at a time) happens after every block is freed."""
    block_phase = sum(v for k, v in parts.items() if k not in (WORKSPACE, TEMPORARIES, TOP_LEVEL, GRADIENTS))
    block_phase += max(parts[WORKSPACE], parts[TEMPORARIES])
    top_phase = parts["runtime"] + parts["activation cache"] + parts[TOP_LEVEL]
    return max(block_phase, top_phase, parts["runtime"] + parts.get(GRADIENTS, 0))


def plan(dims: ModelDims, n_samples: int, seq_len: int, budget: int, streams: int = 1,
         cross: bool = False, sequential: bool = True, gradients: int = 0,
         profile: bool = False) -> MemoryPlan:  # fmt: skip
    """The most comfortable configuration that fits ``budget``, or a refusal naming the minimum. MoE
    experts' moments are split into chunks (one more statistics forward each) before the activations
    are: a chunk costs a partial block forward, spilling costs disk traffic on every pass."""
    best: tuple[int, dict[str, int]] | None = None
    for in_ram in (True, False):
        for batch in BATCH_CHOICES:
            for chunk in expert_chunks(dims.n_experts):
                parts = estimate(dims, n_samples, seq_len, min(batch, n_samples), in_ram, streams, cross,
                                 sequential, gradients, profile, chunk)  # fmt: skip
                total = int(peak_bytes(parts) * (1 + PLAN_MARGIN))
                if total <= budget:
                    return MemoryPlan(budget, total, min(batch, n_samples), in_ram, parts, chunk)
                if best is None or total < best[0]:
                    best = (total, parts)
    assert best is not None
    raise PlanRefused(
        f"--max-ram {fmt_bytes(budget)} is too small for this model and calibration set; "
        f"the smallest plan needs about {fmt_bytes(best[0])} (activations spilled to disk, batch 1)",
        best[0],
    )


class PlanRefused(BadInputError):
    """No configuration fits the cap; ``needed`` is the smallest plan's bytes (margin included), so a
    caller stepping down to a cheaper fit can say what the refused one needs without re-estimating it."""

    def __init__(self, message: str, needed: int) -> None:
        super().__init__(message)
        self.needed = needed


def expert_chunks(n: int) -> list[int | None]:
    """Experts per statistics pass to try, most comfortable first: all (None), then halves down to one."""
    sizes: list[int | None] = [None]
    size = n // 2
    while size >= 1:
        sizes.append(size)
        size //= 2
    return sizes if n else [None]


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
