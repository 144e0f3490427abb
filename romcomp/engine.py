"""The streaming block loop: one decoder block in memory at a time.

For each block: materialize its tensors from the lazy checkpoint, run the calibration activations through it
while hooks accumulate input statistics, decompose each linear, swap in the low-rank pair, run the
compressed (or keep the dense) outputs as the next block's inputs, write the block, free it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoModelForCausalLM

from romcomp.activations import Boundary
from romcomp.archs import ArchSpec
from romcomp.checkpoint import LazyCheckpoint
from romcomp.errors import RomcompError
from romcomp.hf.modeling_romcomp import swap_linear
from romcomp.memory import release_heap
from romcomp.methods import Decompose
from romcomp.stats import collect_input_stats, collect_output_stats


class _StopForward(Exception):
    """Raised by the block-0 pre-hook: we only need the inputs of the first block."""


@dataclass
class BlockTimes:
    forward: float = 0.0  # calibration forwards + covariance accumulation
    decompose: float = 0.0
    write: float = 0.0
    rss: int = 0  # process RSS after the block was freed: flat across blocks when memory is bounded


@dataclass
class Engine:
    """State shared by the steps of one run."""

    model: nn.Module  # the meta-device shell
    arch: ArchSpec
    ckpt: LazyCheckpoint
    method: Decompose
    ranks: dict[str, int]
    out_dtype: torch.dtype
    batch_size: int
    calib_stream: str = "compressed"
    sequential: bool = False
    output_method: Decompose | None = None  # the method's output-statistics variant, if it has one
    compute_dtype: torch.dtype = torch.float32  # calibration forwards (bfloat16: autocast)
    block_kwargs: dict[int, dict] = field(default_factory=dict)

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.get_submodule(self.arch.blocks)

    @property
    def base(self) -> nn.Module:
        return self.model.get_submodule(self.arch.blocks.rpartition(".")[0])

    # -- set-up ----------------------------------------------------------------------------------------
    def capture_inputs(self, windows: torch.Tensor, boundary: Boundary | None) -> None:
        """Run embeddings (and mask/rotary set-up) for every batch and keep block 0's inputs and kwargs.

        With ``boundary=None`` only the kwargs are captured (resuming: the activations are on disk).
        """
        embed_name = f"{self.arch.embed}.weight"
        with self._materialized({embed_name: self.ckpt.get(embed_name).float()}):
            seen: dict = {}

            def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
                seen["hidden"] = args[0] if args else kwargs["hidden_states"]
                seen["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                raise _StopForward

            handle = self.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
            try:
                for start, stop in self.batches(windows.shape[0]):
                    size = stop - start
                    if boundary is None and size in self.block_kwargs:
                        continue
                    try:
                        self.base(input_ids=windows[start:stop], use_cache=False)
                    except _StopForward:
                        pass
                    self.block_kwargs.setdefault(size, seen["kwargs"])
                    if boundary is not None:
                        boundary.write(start, seen["hidden"])
            finally:
                handle.remove()

    def batches(self, n: int) -> Iterator[tuple[int, int]]:
        for start in range(0, n, self.batch_size):
            yield start, min(start + self.batch_size, n)

    @contextmanager
    def _materialized(self, tensors: dict[str, torch.Tensor]) -> Iterator[None]:
        """Temporarily give meta parameters real values (top-level tensors such as the embedding)."""
        from accelerate.utils import set_module_tensor_to_device

        for name, value in tensors.items():
            set_module_tensor_to_device(self.model, name, "cpu", value=value)
        try:
            yield
        finally:
            for name in tensors:
                set_module_tensor_to_device(self.model, name, "meta")

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

    def forward(self, block: nn.Module, source: Boundary, sink: Boundary | None) -> None:
        """Run the calibration windows through ``block``; outputs (float32) go to ``sink`` when given.

        With a bfloat16 compute dtype, autocast runs the matmuls in bfloat16 (weights and activations
        rounded per op) while boundaries, norms' accumulations and the statistics stay float32.
        """
        low = self.compute_dtype != torch.float32
        with torch.inference_mode(), torch.autocast("cpu", dtype=self.compute_dtype, enabled=low):
            for start, stop in self.batches(source.shape[0]):
                out = block(source.read(start, stop), **self.block_kwargs[stop - start])
                out = out[0] if isinstance(out, tuple) else out
                if not torch.isfinite(out).all():
                    raise RomcompError(f"non-finite activations after block samples {start}..{stop}")
                if sink is not None:
                    sink.write(start, out.float())

    def compress_block(
        self, index: int, source: Boundary, sink: Boundary
    ) -> tuple[nn.Module, BlockTimes, list[str]]:
        """Calibrate, decompose and swap the linears of block ``index``; fill ``sink`` with its outputs."""
        times, notes = BlockTimes(), []
        block = self.load_block(index)
        prefix = self.arch.block_prefix(index)
        stages = [[g] for g in self.arch.groups] if self.sequential else [list(self.arch.groups)]
        for n_stage, stage in enumerate(stages):
            t0 = time.perf_counter()
            dense_outputs = self.calib_stream == "dense" and n_stage == 0
            by_output = [g for g in stage if self._output_stats_cheaper(block, g)]
            by_input = [g for g in stage if g not in by_output]
            with (
                collect_input_stats(block, by_input) as stats,
                collect_output_stats(block, [g[0] for g in by_output]) as out_stats,
            ):
                self.forward(block, source, sink if dense_outputs else None)
            times.forward += time.perf_counter() - t0
            t0 = time.perf_counter()
            for group in stage:
                for name in group:
                    full = prefix + name
                    if full in self.ranks and group in by_output:
                        notes += self._swap(block, name, full, out_stats[name], self.output_method)
                    elif full in self.ranks:
                        notes += self._swap(block, name, full, stats[group[0]], self.method)
                if group[0] in stats:  # the group's whitening root is no longer needed
                    stats[group[0]].derived.clear()
            del stats, out_stats  # covariances are not needed by the compressed forward below
            times.decompose += time.perf_counter() - t0
        if self.calib_stream == "compressed":
            t0 = time.perf_counter()
            self.forward(block, source, sink)
            times.forward += time.perf_counter() - t0
        return block, times, notes

    def _output_stats_cheaper(self, block: nn.Module, group: Sequence[str]) -> bool:
        """Accumulate output moments for a one-linear group when that is the smaller covariance (and
        the method can use it): down_proj's d_out² instead of d_in² (4096² vs 11008² in Llama-2-7B)."""
        if self.output_method is None or len(group) != 1:
            return False
        linear = block.get_submodule(group[0])
        return linear.out_features < linear.in_features + int(linear.bias is not None)

    def _swap(self, block: nn.Module, name: str, full: str, stats, method: Decompose) -> list[str]:
        linear = block.get_submodule(name)
        factors = method(
            linear.weight.data, None if linear.bias is None else linear.bias.data, stats, self.ranks[full]
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
        prefix = f"{self.arch.blocks}."
        names = [n for n in self.ckpt.keys() if not n.startswith(prefix)]
        if tied:
            names = [n for n in names if not n.startswith(f"{self.arch.lm_head}.")]
        return names


def build_shell(hf_config) -> nn.Module:
    """The whole model on the meta device (no memory), float32, in eval mode, with no KV cache."""
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    model.eval()
    model.config.use_cache = False
    return model
