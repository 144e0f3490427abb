"""The streaming block loop: one decoder block in memory at a time, in stages.

For each block: materialize its tensors from the lazy checkpoint, then for each stage (a linear group, or
the whole block) **collect** statistics with hooks while the calibration activations run through it,
**fit** each linear of the stage, **apply** (swap in the low-rank pair), and finally **propagate**: run the
block to produce the next block's inputs; write the block, free it.

Activation *streams*: the compressed model's (always) and, for the error-aware fit, the dense model's. A
stream is one :class:`Boundary` file per block boundary; both are durable before a block counts as done.
"""

from __future__ import annotations

import copy
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import init_empty_weights
from torch import nn
from tqdm import tqdm
from transformers import AutoModel, AutoModelForCausalLM

from romcomp.compress.activations import Boundary
from romcomp.compress.experts import fit_experts
from romcomp.compress.memory import release_heap, resident_bytes
from romcomp.compress.stats import CrossCollector, StopForward, collect_input_stats, collect_output_stats
from romcomp.errors import RomcompError
from romcomp.hf.modeling_romcomp import QUANT_METHOD, swap_linear
from romcomp.methods import Decompose, GradStats
from romcomp.model.archs import ArchSpec
from romcomp.model.checkpoint import LazyCheckpoint
from romcomp.model.discovery import is_experts_module, materialized, text_config, top_level_names


@dataclass
class BlockTimes:
    forward: float = 0.0  # calibration forwards + covariance accumulation
    decompose: float = 0.0
    write: float = 0.0
    rss: int = 0  # process RSS after the block was freed: flat across blocks when memory is bounded


@dataclass
class Variant:
    """One output of a run (one ratio): its rank map and its compressed activation stream."""

    ranks: dict[str, int]
    source: Boundary | None = None
    sink: Boundary | None = None


@dataclass
class Tee:
    """Several boundaries written as one (:meth:`Engine.forward`'s ``sink``): every ratio's copy of the
    dense stream when the ratios share their statistics."""

    sinks: list[Boundary | None]

    def write(self, start: int, out: torch.Tensor) -> None:
        for sink in self.sinks:
            if sink is not None:
                sink.write(start, out)


@dataclass
class Engine:
    """State shared by the steps of one run."""

    model: nn.Module  # the meta-device shell
    arch: ArchSpec
    ckpt: LazyCheckpoint
    method: Decompose
    out_dtype: torch.dtype
    batch_size: int
    calib_stream: str = "compressed"
    sequential: bool = False
    output_method: Decompose | None = None  # the method's output-statistics variant, if it has one
    fit: str = "local"  # "error-aware": regress the dense outputs on the compressed inputs (two streams)
    cross_method: Decompose | None = None  # the error-aware fit (CrossStats -> Factors)
    compute_dtype: torch.dtype = torch.float32  # calibration forwards (bfloat16: autocast)
    block_calls: dict[tuple[int, int], tuple[tuple, dict]] = field(default_factory=dict)  # (block, batch)
    gradients: Mapping[str, torch.Tensor] | None = None  # the streamed gradient pass's (read lazily)
    density: float = 1.0  # LPAF's pruning target

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.get_submodule(self.arch.blocks)

    @property
    def base(self) -> nn.Module:
        return self.model.get_submodule(self.arch.base)

    # -- set-up ----------------------------------------------------------------------------------------
    def capture_inputs(self, windows: torch.Tensor, boundaries: Sequence[Boundary]) -> None:
        """Run the embeddings (and the mask/rotary set-up) for every batch; keep block 0's inputs and
        what every block receives besides its hidden states (masks differ between sliding-window and
        full-attention layers, Gemma 3 has two rotary embeddings, BERT passes its mask positionally).

        The blocks are replaced by identities for the capture, so one forward records every block's call
        without computing any. Every stream starts from the same block-0 inputs. With no ``boundaries``
        only the calls are captured (resuming: the activations are on disk).
        """
        tensors = {n: self.ckpt.get(n).float() for n in top_level_names(self.ckpt, self.arch.blocks,
                                                                          self.arch.lm_head)}  # fmt: skip
        n_layers = len(self.layers)
        seen: dict[int, tuple[torch.Tensor, tuple, dict]] = {}

        def recorder(index: int):
            def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
                hidden = args[0] if args else kwargs["hidden_states"]
                rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                seen[index] = (hidden, tuple(args[1:]), rest)
                if index == n_layers - 1:
                    raise StopForward

            return hook

        handles = [layer.register_forward_pre_hook(recorder(i), with_kwargs=True)
                   for i, layer in enumerate(self.layers)]  # fmt: skip
        for layer in self.layers:
            layer.forward = identity_block
        try:
            with materialized(self.model, tensors), torch.inference_mode():
                for start, stop in self.batches(windows.shape[0]):
                    size = stop - start
                    if not boundaries and (0, size) in self.block_calls:
                        continue
                    try:
                        self.base(input_ids=windows[start:stop], use_cache=False)
                    except StopForward:
                        pass
                    for i in range(n_layers):
                        self.block_calls.setdefault((i, size), seen[i][1:])
                    for boundary in boundaries:
                        boundary.write(start, seen[0][0])
                    seen.clear()
        finally:
            for h in handles:
                h.remove()
            for layer in self.layers:
                del layer.forward

    @contextmanager
    def calibration_mode(self) -> Iterator[None]:
        """Inference mode, and autocast to ``compute_dtype`` when it is not float32 (matmuls in bfloat16;
        boundaries, norms' accumulations and the statistics stay float32)."""
        low = self.compute_dtype != torch.float32
        with torch.inference_mode(), torch.autocast("cpu", dtype=self.compute_dtype, enabled=low):
            yield

    def call_block(self, block: nn.Module, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """Block ``index``'s forward on ``hidden`` with the arguments its own layer received; its output
        hidden states (a family returning a tuple gives its first element)."""
        args, kwargs = self.block_calls[(index, hidden.shape[0])]
        out = block(hidden, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def batches(self, n: int) -> Iterator[tuple[int, int]]:
        for start in range(0, n, self.batch_size):
            yield start, min(start + self.batch_size, n)

    # -- one block -------------------------------------------------------------------------------------
    def load_block(self, index: int) -> nn.Module:
        """Materialize block ``index`` in float32 (strict: a missing or unexpected tensor is an error)."""
        prefix = self.arch.block_prefix(index)
        names = self.ckpt.with_prefix(prefix)
        block = self.layers[index]
        state = {n[len(prefix) :]: self.ckpt.get(n).float() for n in names}
        try:
            block.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as e:
            raise RomcompError(
                f"checkpoint tensors of block {index} do not match the architecture: {e}"
            ) from None
        return block

    def forward(self, index: int, block: nn.Module, source: Boundary, sink: Boundary | None) -> None:
        """Run the calibration windows through ``block``; outputs (float32) go to ``sink`` when given.

        With a bfloat16 compute dtype, autocast runs the matmuls in bfloat16 (weights and activations
        rounded per op) while boundaries, norms' accumulations and the statistics stay float32.
        """
        with self.calibration_mode():
            for start, stop in self.batches(source.shape[0]):
                out = self.call_block(block, index, source.read(start, stop))
                self._emit(out, sink, start, stop)

    @staticmethod
    def _emit(out: torch.Tensor, sink: Boundary | None, start: int, stop: int) -> None:
        """Check a block's outputs for one batch and write them (float32) to ``sink`` when given."""
        if not torch.isfinite(out).all():
            raise RomcompError(f"non-finite activations after block samples {start}..{stop}")
        if sink is not None:
            sink.write(start, out.float())

    def compress_block(
        self, index: int, variants: Sequence[Variant], dense_source: Boundary | None = None,
        dense_sink: Boundary | None = None,
    ) -> tuple[list[nn.Module], BlockTimes, list[list[str]]]:  # fmt: skip
        """Collect, fit and apply every stage of block ``index`` for each variant (one per ratio), then
        propagate: fill each variant's ``sink`` (and ``dense_sink``, the dense model's stream, for the
        error-aware fit) with the block's outputs. The block is loaded once for all variants."""
        times = BlockTimes()
        base = self.load_block(index)
        # error-aware: ``base`` stays dense for the dense stream; local: the last variant may take it
        keep_base = self.fit == "error-aware"
        blocks = [copy.deepcopy(base) for _ in variants[: None if keep_base else -1]]
        blocks += [] if keep_base else [base]
        if self.fit == "error-aware":
            notes, filled = self._fit_error_aware(
                index, base, blocks, variants, dense_source, dense_sink, times
            )
            t0 = time.perf_counter()
            if not filled:
                self.forward(index, base, dense_source, dense_sink)
        elif self._shares_statistics(variants):
            notes = self._fit_local(index, blocks, variants, times)
            t0 = time.perf_counter()
        else:
            pairs = zip(blocks, variants, strict=True)
            notes = [self._fit_local(index, [b], [v], times)[0] for b, v in pairs]
            t0 = time.perf_counter()
        for block, v in zip(blocks, variants, strict=True):
            if self.fit == "error-aware" or self.calib_stream == "compressed":
                self.forward(index, block, v.source, v.sink)
        times.forward += time.perf_counter() - t0
        return blocks, times, notes

    def stages(self) -> list[list[tuple[str, ...]]]:
        """Linear groups fitted together: one at a time (each sees its predecessors compressed) or all."""
        return [[g] for g in self.arch.groups] if self.sequential else [list(self.arch.groups)]

    def _fit_error_aware(
        self, index: int, dense: nn.Module, blocks: list[nn.Module], variants: Sequence[Variant],
        dense_source: Boundary, dense_sink: Boundary | None, times: BlockTimes,
    ) -> tuple[list[list[str]], bool]:  # fmt: skip
        """Each stage's linears regress the dense block's outputs on the compressed block's inputs.

        Collect runs the dense block on the dense stream once per batch, shared by every variant, and
        each compressed copy on its own stream; all stop at the stage's last leader, except the dense
        forward of the last stage, which runs on and fills ``dense_sink`` (one dense forward saved).
        Returns the notes and whether ``dense_sink`` was filled.
        """
        prefix = self.arch.block_prefix(index)
        notes: list[list[str]] = [[] for _ in variants]
        stages = self.stages()
        filled = False
        for n_stage, stage in enumerate(stages):
            names = [prefix + name for group in stage for name in group]
            active = [j for j, v in enumerate(variants) if any(n in v.ranks for n in names)]
            if not active:
                continue  # the whole stage stays dense in every variant: nothing to fit
            t0 = time.perf_counter()
            last = n_stage == len(stages) - 1
            leaders = [g[0] for g in stage]
            collector = CrossCollector(
                dense, [blocks[j] for j in active], leaders, stop=True, stop_dense=not last
            )
            try:
                sink = dense_sink if last else None
                pairs = [(blocks[j], variants[j].source) for j in active]
                self._paired_forward(index, dense, dense_source, sink, pairs)
                filled = sink is not None
            finally:
                collector.close()
            times.forward += time.perf_counter() - t0
            t0 = time.perf_counter()
            for stats, j in zip(collector.stats, active, strict=True):
                for group in stage:
                    for name in group:
                        if prefix + name in variants[j].ranks:
                            notes[j] += self._swap(blocks[j], name, prefix + name, stats[group[0]],
                                                   self.cross_method, variants[j].ranks)  # fmt: skip
                    stats[group[0]].hat.derived.clear()
            del collector
            times.decompose += time.perf_counter() - t0
        for j, (block, v) in enumerate(zip(blocks, variants, strict=True)):
            notes[j] += self._fit_experts(index, block, v, times)
        return notes, filled

    def _paired_forward(
        self, index: int, dense: nn.Module, dense_source: Boundary, dense_sink: Boundary | None,
        compressed: list[tuple[nn.Module, Boundary]],
    ) -> None:  # fmt: skip
        """Per batch: the dense forward (to ``dense_sink`` when it runs to the end), then each compressed
        one; hooks pair their inputs and may stop a forward early."""
        with self.calibration_mode():
            for start, stop in self.batches(dense_source.shape[0]):
                for module, stream in [(dense, dense_source), *compressed]:
                    try:
                        out = self.call_block(module, index, stream.read(start, stop))
                    except StopForward:
                        continue
                    if module is dense and dense_sink is not None:
                        self._emit(out, dense_sink, start, stop)

    def _fit_local(
        self, index: int, blocks: list[nn.Module], variants: Sequence[Variant], times: BlockTimes
    ) -> list[list[str]]:
        """Each linear is fitted to its own outputs on the inputs it sees (the compressed stream's, or the
        dense model's with ``calib_stream='dense'``, whose outputs then go to the sinks right away).

        One ratio per call, unless the ratios share their statistics (:meth:`_shares_statistics`): then
        one forward of the dense ``blocks[0]`` fills every ratio's stream and collects one set of
        statistics, and each dense weight is decomposed at every ratio's rank, so a method's
        rank-independent work (SVD-LLM's inverse and SVD) is done once — bit-identical to fitting each
        ratio alone (same inputs, same arithmetic), half the time for two ratios."""
        notes: list[list[str]] = [[] for _ in variants]
        prefix = self.arch.block_prefix(index)
        for n_stage, stage in enumerate(self.stages()):
            t0 = time.perf_counter()
            dense_outputs = self.calib_stream == "dense" and n_stage == 0
            by_output = [g for g in stage if self._output_stats_cheaper(blocks[0], g)]
            by_input = [g for g in stage if g not in by_output]
            with (
                collect_input_stats(blocks[0], by_input) as stats,
                collect_output_stats(blocks[0], [g[0] for g in by_output]) as out_stats,
            ):
                sinks = Tee([v.sink for v in variants]) if dense_outputs else None
                self.forward(index, blocks[0], variants[0].source, sinks)
            times.forward += time.perf_counter() - t0
            t0 = time.perf_counter()
            for group in stage:
                for name in group:
                    source, full = blocks[0].get_submodule(name), prefix + name
                    by, method = (out_stats[name], self.output_method) if group in by_output else (
                        stats[group[0]], self.method)  # fmt: skip
                    for j, (block, v) in enumerate(zip(blocks, variants, strict=True)):
                        if full in v.ranks:
                            notes[j] += self._swap(block, name, full, by, method, v.ranks, source=source)
                if group[0] in stats:  # the group's whitening root (SVD-LLM: inverse, SVD) is done with
                    stats[group[0]].derived.clear()
            del stats, out_stats  # covariances are not needed by the compressed forward below
            times.decompose += time.perf_counter() - t0
        pairs = zip(notes, blocks, variants, strict=True)
        return [n + self._fit_experts(index, b, v, times) for n, b, v in pairs]

    def _shares_statistics(self, variants: Sequence[Variant]) -> bool:
        """Whether every ratio's linears see the same inputs: the dense stream in one stage (each ratio's
        stream is then the dense model's, the same bytes), so statistics can be collected once."""
        return len(variants) > 1 and self.calib_stream == "dense" and len(self.stages()) == 1

    def _fit_experts(self, index: int, block: nn.Module, variant: Variant, times: BlockTimes) -> list[str]:
        """The block's fused MoE expert projections, after its linears: per-expert statistics over the
        routed tokens of one more forward of the compressed block (stopped after the experts), local fit
        (see :mod:`romcomp.compress.experts`)."""
        if not self.arch.experts:
            return []
        clock = {"forward": 0.0}

        def run(_stats: dict) -> None:
            t0 = time.perf_counter()
            with self.calibration_mode():
                for start, stop in self.batches(variant.source.shape[0]):
                    try:
                        self.call_block(block, index, variant.source.read(start, stop))
                    except StopForward:
                        pass
            clock["forward"] = time.perf_counter() - t0

        def choose(by_output: bool) -> Decompose:
            return self.output_method if by_output else self.method

        t0 = time.perf_counter()
        notes = fit_experts(block, list(self.arch.experts), variant.ranks, self.arch.block_prefix(index),
                            run, choose, self.out_dtype)  # fmt: skip
        times.forward += clock["forward"]
        times.decompose += time.perf_counter() - t0 - clock["forward"]
        return notes

    def _output_stats_cheaper(self, block: nn.Module, group: Sequence[str]) -> bool:
        """Accumulate output moments for a one-linear group when that is the smaller covariance (and
        the method can use it): down_proj's d_out² instead of d_in² (4096² vs 11008² in Llama-2-7B)."""
        if self.output_method is None or len(group) != 1:
            return False
        linear = block.get_submodule(group[0])
        return linear.out_features < linear.in_features + int(linear.bias is not None)

    def _swap(
        self,
        block: nn.Module,
        name: str,
        full: str,
        stats,
        method: Decompose,
        ranks: dict[str, int],
        source: nn.Module | None = None,
    ) -> list[str]:
        """Replace linear ``name`` of ``block`` by its factors; ``source``: the dense linear to factor, when
        another block's copy of it (the same tensor for every ratio, see :meth:`_fit_local`)."""
        linear = block.get_submodule(name) if source is None else source
        if self.gradients is not None:  # a gradient method (FWSVD): the loss's sensitivities, not moments
            grad = self.gradients.get(f"{full}.grad")
            stats = GradStats(self.gradients[f"{full}.fisher_in"], grad, self.density)
        factors = method(
            linear.weight.data, None if linear.bias is None else linear.bias.data, stats, ranks[full]
        )
        factors.check_finite(full)
        pair = swap_linear(block, name, factors.rank)
        # Round to the output dtype first: the calibration stream sees exactly what the saved model computes.
        pair.down.weight.data = factors.down.to(self.out_dtype).float()
        pair.up.weight.data = factors.up.to(self.out_dtype).float()
        if factors.bias is not None:
            pair.up.bias.data = factors.bias.to(self.out_dtype).float()
        return [f"{full}: {n}" for n in factors.notes]

    def block_tensors(self, index: int, block: nn.Module) -> dict[str, torch.Tensor]:
        prefix = self.arch.block_prefix(index)
        return {prefix + k: v.detach().to(self.out_dtype) for k, v in block.state_dict().items()}

    def free_block(self, index: int) -> None:
        self.layers[index].to("meta")
        release_heap()

    def top_level_names(self, tied: bool) -> list[str]:
        """Everything outside the blocks (embeddings, final norm, untied lm_head), copied unchanged."""
        return top_level_names(self.ckpt, self.arch.blocks, self.arch.lm_head if tied else None)


@dataclass
class Target:
    """One output directory being written: its :class:`OutputDir`, manifest and rank map."""

    output: Any
    manifest: Any
    ranks: dict[str, int]


def stream_blocks(engine: Engine, targets: Sequence[Target], windows: torch.Tensor, in_ram: bool,
                  n_blocks: int, progress: bool) -> dict[int, BlockTimes]:  # fmt: skip
    """The block loop over one or more outputs in lockstep (one per ratio), resuming after the blocks
    every manifest records as done. A block counts as done only after its shard and every stream's next
    boundary are durable; input boundaries are deleted only after every manifest is saved, so a kill
    between two manifests recomputes that block for all outputs (same bytes). The dense stream lives
    in the first output's work directory."""
    times: dict[int, BlockTimes] = {}
    first = min(min(set(range(n_blocks)) - set(t.manifest.blocks_done), default=n_blocks) for t in targets)
    if first == n_blocks:
        return times
    shape = (windows.shape[0], windows.shape[1], text_config(engine.model.config).hidden_size)
    home = targets[0].output

    def boundaries(index: int, make) -> tuple[Boundary | None, list[Boundary]]:
        dense = make(home.acts_path(index, "dense")) if engine.fit == "error-aware" else None
        return dense, [make(t.output.acts_path(index)) for t in targets]

    if first == 0:
        dense_source, sources = boundaries(0, lambda p: Boundary.create(p, shape, in_ram))
        starts = [b for b in [dense_source, *sources] if b is not None]
        engine.capture_inputs(windows, starts)
        for b in starts:
            b.commit()
    else:
        engine.capture_inputs(windows, [])
        dense_source, sources = boundaries(first, lambda p: Boundary.load(p, shape, in_ram))
    bar = tqdm(
        total=n_blocks, initial=first, desc="blocks", unit="block", disable=not progress, file=sys.stderr
    )
    for index in range(first, n_blocks):
        dense_sink, sinks = boundaries(index + 1, lambda p: Boundary.create(p, shape, in_ram))
        variants = [Variant(t.ranks, src, snk) for t, src, snk in zip(targets, sources, sinks, strict=True)]
        blocks, bt, notes = engine.compress_block(index, variants, dense_source, dense_sink)
        t0 = time.perf_counter()
        for t, block in zip(targets, blocks, strict=True):
            t.output.write_shard(index, engine.block_tensors(index, block))
        for b in [dense_sink, *sinks]:
            if b is not None:
                b.commit()
        bt.write = time.perf_counter() - t0
        del blocks, variants
        engine.free_block(index)
        olds = [b for b in [dense_source, *sources] if b is not None]
        for b in olds:
            b.release()
        bt.rss, rss_anon = resident_bytes()
        for t, block_notes in zip(targets, notes, strict=True):
            if index in t.manifest.blocks_done:
                continue  # recomputed after a kill between two manifests: same bytes, already recorded
            t.manifest.blocks_done.append(index)
            if block_notes:
                t.manifest.notes[str(index)] = block_notes
            t.manifest.block_times[str(index)] = {
                "forward": round(bt.forward, 3), "decompose": round(bt.decompose, 3),
                "write": round(bt.write, 3), "rss": bt.rss, "rss_anon": rss_anon,
            }  # fmt: skip
            t.output.save_manifest(t.manifest)
        for b in olds:
            os.remove(b.path)
        times[index] = bt
        dense_source, sources = dense_sink, sinks
        bar.update(1)
    bar.close()
    for b in [dense_source, *sources]:
        if b is not None:
            b.release()
    return times


def identity_block(hidden_states=None, *args, **kwargs):
    """A block's forward that hands its hidden states on unchanged (captures and the gradient head)."""
    return hidden_states if hidden_states is not None else args[0]


def is_encoder(hf_config) -> bool:
    """A checkpoint of a bare (encoder) model such as ``BertModel``, loaded with ``AutoModel``, rather
    than a causal LM: decided by the architectures the checkpoint declares."""
    archs = getattr(hf_config, "architectures", None) or []
    return bool(archs) and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


def auto_class(hf_config) -> type:
    """The transformers Auto class a checkpoint loads with: ``AutoModel`` for an encoder, else
    ``AutoModelForCausalLM``."""
    return AutoModel if is_encoder(hf_config) else AutoModelForCausalLM


def build_shell(hf_config) -> nn.Module:
    """The whole model on the meta device (no memory), float32, in eval mode, with no KV cache; MoE
    experts run through romcomp's experts implementation (one routed expert at a time)."""
    auto = auto_class(hf_config)
    with init_empty_weights():
        model = auto.from_config(hf_config, dtype=torch.float32)
    if any(is_experts_module(m) for m in model.modules()):
        model.set_experts_implementation(QUANT_METHOD)  # runs factored experts, feeds their statistics
    model.eval()
    model.config.use_cache = False
    return model
