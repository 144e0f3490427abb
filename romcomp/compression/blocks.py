"""One decoder block at a time: materialize it from the lazy checkpoint, run calibration batches through
it, write it out, free it. The toolkit every pass uses; it holds no fit policy and no pass state.

A block's forward needs what its own layer received besides the hidden states (masks that differ between
sliding-window and full-attention layers, Gemma 3's two rotary embeddings, BERT's positional mask):
:meth:`BlockIO.capture_inputs` records those calls once per batch size by running the model's embeddings
with every block replaced by an identity.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from romcomp.compression.activations import Boundary
from romcomp.compression.memory import release_heap
from romcomp.errors import RomcompError
from romcomp.model.archs import ArchSpec
from romcomp.model.checkpoint import LazyCheckpoint
from romcomp.model.discovery import StopForward, materialized, text_config, top_level_names
from romcomp.model.shell import identity_block


@dataclass
class Tee:
    """Several boundaries written as one (a forward's ``sink``): every ratio's copy of the dense stream
    when the ratios share their statistics."""

    sinks: list[Boundary | None]

    def write(self, start: int, out: torch.Tensor) -> None:
        for sink in self.sinks:
            if sink is not None:
                sink.write(start, out)


@dataclass
class BlockIO:
    """Block I/O and calibration forwards over the meta-device shell ``model``."""

    model: nn.Module
    arch: ArchSpec
    ckpt: LazyCheckpoint
    batch_size: int
    out_dtype: torch.dtype = torch.float32  # the checkpoint's: factors and shards are rounded to it
    compute_dtype: torch.dtype = torch.float32  # calibration forwards (bfloat16: autocast)
    block_calls: dict[tuple[int, int], tuple[tuple, dict]] = field(default_factory=dict)  # (block, batch)

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.get_submodule(self.arch.blocks)

    @property
    def base(self) -> nn.Module:
        return self.model.get_submodule(self.arch.base)

    def stream_shape(self, windows: torch.Tensor) -> tuple[int, int, int]:
        """The shape of one boundary: windows × tokens × hidden."""
        return windows.shape[0], windows.shape[1], text_config(self.model.config).hidden_size

    def batches(self, n: int) -> Iterator[tuple[int, int]]:
        for start in range(0, n, self.batch_size):
            yield start, min(start + self.batch_size, n)

    def capture_inputs(self, windows: torch.Tensor, boundaries: Sequence[Boundary]) -> None:
        """Run the embeddings (and the mask/rotary set-up) for every batch; keep block 0's inputs in every
        boundary given and what every block receives besides its hidden states. With no ``boundaries``
        only the calls are captured (resuming: the activations are on disk)."""
        tensors = {n: self.ckpt.get(n).float()
                   for n in top_level_names(self.ckpt, self.arch.blocks, self.arch.lm_head)}  # fmt: skip
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
                    self._capture_batch(windows[start:stop], start, boundaries, seen)
        finally:
            for h in handles:
                h.remove()
            for layer in self.layers:
                del layer.forward

    def _capture_batch(
        self, ids: torch.Tensor, start: int, boundaries: Sequence[Boundary], seen: dict
    ) -> None:
        size = ids.shape[0]
        if not boundaries and (0, size) in self.block_calls:
            return
        try:
            self.base(input_ids=ids, use_cache=False)
        except StopForward:
            pass
        for i in range(len(self.layers)):
            self.block_calls.setdefault((i, size), seen[i][1:])
        for boundary in boundaries:
            boundary.write(start, seen[0][0])
        seen.clear()

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

    def load_block(self, index: int) -> nn.Module:
        """Materialize block ``index`` in float32 (strict: a missing or unexpected tensor is an error)."""
        prefix = self.arch.block_prefix(index)
        block = self.layers[index]
        state = {n[len(prefix) :]: self.ckpt.get(n).float() for n in self.ckpt.with_prefix(prefix)}
        try:
            block.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as e:
            raise RomcompError(
                f"checkpoint tensors of block {index} do not match the architecture: {e}"
            ) from None
        return block

    def forward(self, index: int, block: nn.Module, source: Boundary, sink: Boundary | Tee | None) -> None:
        """Run the calibration windows through ``block``; outputs (float32) go to ``sink`` when given."""
        with self.calibration_mode():
            for start, stop in self.batches(source.shape[0]):
                out = self.call_block(block, index, source.read(start, stop))
                emit(out, sink, start, stop)

    def forward_until_stopped(self, index: int, block: nn.Module, source: Boundary) -> None:
        """Run the calibration windows through ``block`` for its hooks, which may stop each batch early
        (:class:`StopForward`); the outputs are not kept."""
        with self.calibration_mode():
            for start, stop in self.batches(source.shape[0]):
                try:
                    self.call_block(block, index, source.read(start, stop))
                except StopForward:
                    pass

    def block_tensors(self, index: int, block: nn.Module) -> dict[str, torch.Tensor]:
        """Block ``block``'s tensors under their checkpoint names, in the output dtype."""
        prefix = self.arch.block_prefix(index)
        return {prefix + k: v.detach().to(self.out_dtype) for k, v in block.state_dict().items()}

    def free_block(self, index: int) -> None:
        self.layers[index].to("meta")
        release_heap()

    def top_level_names(self, tied: bool) -> list[str]:
        """Everything outside the blocks (embeddings, final norm, untied lm_head), copied unchanged."""
        return top_level_names(self.ckpt, self.arch.blocks, self.arch.lm_head if tied else None)


def emit(out: torch.Tensor, sink: Boundary | Tee | None, start: int, stop: int) -> None:
    """Check a block's outputs for one batch and write them (float32) to ``sink`` when given."""
    if not torch.isfinite(out).all():
        raise RomcompError(f"non-finite activations after block samples {start}..{stop}")
    if sink is not None:
        sink.write(start, out.float())


def rounded(t: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Round to the output dtype first: the calibration stream sees exactly what the saved model computes."""
    return t.to(out_dtype).float()


def outputs_narrower(d_in: int, d_out: int, bias: bool) -> bool:
    """Whether the outputs' moment (d_out²) is smaller than the augmented inputs' ((d_in + bias)²): then
    statistics are accumulated on the output side (down_proj: 4096² instead of 11008² in Llama-2-7B)."""
    return d_out < d_in + int(bias)


def narrower_at_output(linear: nn.Linear) -> bool:
    """:func:`outputs_narrower` for an ``nn.Linear``."""
    return outputs_narrower(linear.in_features, linear.out_features, linear.bias is not None)
