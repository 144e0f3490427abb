"""The end-of-run summary: the numbers a user checks first, printed as plain aligned tables."""

from __future__ import annotations

from collections import defaultdict

from romcomp.compression.experts import STARVED
from romcomp.compression.memory import fmt_bytes
from romcomp.compression.ranks import LinearShape
from romcomp.compression.result import CompressResult


def kind(s: LinearShape) -> str:
    """A linear's kind (``q_proj``); a fused expert projection with its expert count (``down_proj×8``)."""
    last = s.name.rsplit(".", 1)[-1]
    return last if s.count == 1 else f"{last}×{s.count}"


def rank_table(result: CompressResult) -> list[str]:
    """One row per linear kind (q_proj, …): shape, ranks over blocks, parameters kept."""
    by_kind: dict[str, list] = defaultdict(list)
    for s in result.shapes:
        by_kind[kind(s)].append(s)
    lines = [f"{'linear':<10} {'d_in→d_out':>13} {'rank (min/max)':>15} {'kept':>7}"]
    for name, shapes in by_kind.items():
        ranks = [result.ranks.get(s.name) for s in shapes]
        kept = sum(s.factored_params(r) if r else s.dense_params for s, r in zip(shapes, ranks, strict=True))
        dense = sum(s.dense_params for s in shapes)
        real = [r for r in ranks if r]
        span = (
            "dense"
            if not real
            else f"{min(real)}/{max(real)}" + (" +dense" if len(real) < len(ranks) else "")
        )
        lines.append(
            f"{name:<10} {f'{shapes[0].d_in}→{shapes[0].d_out}':>13} {span:>15} {kept / dense:>7.1%}"
        )
    return lines


def allocation_map(result: CompressResult) -> list[str]:
    """Matrix type × depth at a glance: one character per block, the share of the matrix's parameters
    kept in tenths (``0``–``9``; ``9`` also for 90–100%) or ``D`` where it stayed dense."""
    by_kind: dict[str, dict[int, str]] = defaultdict(dict)
    blocks: set[int] = set()
    for s in result.shapes:
        head = s.name.rsplit(".", 1)[0]
        index = int(next(part for part in reversed(head.split(".")) if part.isdigit()))
        blocks.add(index)
        rank = result.ranks.get(s.name)
        cell = "D" if rank is None else str(min(9, int(10 * s.factored_params(rank) / s.dense_params)))
        by_kind[kind(s)][index] = cell
    order = sorted(blocks)
    lines = [f"{'kept/10':<10} blocks {order[0]}..{order[-1]} (D = dense)"]
    for name, cells in by_kind.items():
        lines.append(f"{name:<10} " + "".join(cells.get(i, "?") for i in order))
    return lines


def summary(result: CompressResult) -> str:
    """The full summary block printed at the end of ``romcomp MODEL``."""
    bt = result.block_times.values()
    fwd, dec, wr = (sum(getattr(t, k) for t in bt) for k in ("forward", "decompose", "write"))
    n = max(len(result.block_times), 1)
    lines = [
        f"source       {result.source}",
        f"calibration  {result.calibration}",
        f"method       {result.method} ({result.fit} fit), ratio {result.ratio:g} "
        f"({result.allocation} ranks); "
        f"block linears removed: {result.linear_ratio_removed:.2%}",
        "",
        *rank_table(result),
        "",
        *allocation_map(result),
        "",
        f"{'':<22} {'before':>14} {'after':>14} {'change':>8}",
        f"{'parameters (model)':<22} {result.params_before:>14,} {result.params_after:>14,} "
        f"{result.params_after / result.params_before - 1:>8.1%}",
        f"{'parameters (linears)':<22} {result.linear_before:>14,} {result.linear_after:>14,} "
        f"{result.linear_after / result.linear_before - 1:>8.1%}",
        f"{'weights on disk':<22} {fmt_bytes(result.bytes_before):>14} {fmt_bytes(result.bytes_after):>14} "
        f"{result.bytes_after / result.bytes_before - 1:>8.1%}",
        "",
        f"time         {result.seconds:.1f} s total; per block {fwd / n:.2f} s forward+covariance, "
        f"{dec / n:.2f} s decomposition, {wr / n:.2f} s write"
        + (f" ({result.resumed_blocks} blocks resumed from a previous run)" if result.resumed_blocks else ""),
        f"memory       peak RSS {fmt_bytes(result.peak_rss)} (plan {fmt_bytes(result.plan.estimate)} of "
        f"{fmt_bytes(result.plan.budget)}; batch {result.plan.batch_size}, activations "
        f"{'in RAM' if result.plan.activations_in_ram else 'spilled to disk'})",
    ]
    if len(result.block_times) > 1:
        ends = (min(result.block_times), max(result.block_times))
        first, last = (result.block_times[i].rss for i in ends)
        lines.append(f"{'':13}RSS after first block {fmt_bytes(first)}, after last block {fmt_bytes(last)}")
    notes = [n for block in result.notes.values() for n in block]
    starved = [n for n in notes if STARVED in n]
    if len(notes) > len(starved):
        count = len(notes) - len(starved)
        lines.append(f"numerics     {count} guarded case(s); see {result.out}/.romcomp/manifest.json")
    if starved:
        experts = sum(len(n.rpartition(": ")[2].split(", ")) for n in starved)
        lines.append(f"experts      {experts} expert fit(s) saw too few routed tokens: plain SVD of the "
                     f"weight instead; see {result.out}/.romcomp/manifest.json")  # fmt: skip
    if result.dense_other:
        kept = ", ".join(result.dense_other)
        lines.append(f"kept dense   {kept} in every block (not nn.Linear leaves: not factorized)")
    lines.append(f"output       {result.out}")
    return "\n".join(lines)
