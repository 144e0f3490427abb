"""Gradients of the language-model loss without holding the model: one block in memory, like the forward.

FWSVD (and any method or allocation that weighs weights by the loss) needs ``∂L/∂W`` of every block linear
over the calibration windows. The whole-model backward holds every block and every activation; here:

1. **forward**: the dense model's block inputs for every window are written to disk, boundary after
   boundary (:class:`Boundary` files), one block materialized at a time;
2. **head**: the final norm and output head run on the last boundary (every block replaced by an identity
   that hands the stored hidden states on, so the family's own code computes them) and the next-token
   cross-entropy of each window is differentiated to its hidden states;
3. **reverse**: from the last block to the first, the block is loaded, its forward recomputed on each
   window's stored input with autograd on, and the gradient arriving from the block above is
   back-propagated: its linears' weight gradients are accumulated and the gradient of its input is stored
   for the block below. Then the block and the boundaries above it are freed.

Peak memory: one block with its autograd activations for one window, the accumulators, and one window of
each boundary. Per linear the pass keeps ``Σ_windows g²`` summed over output rows (``fisher_in``, one
value per input channel: FWSVD's importance) and, with ``full=True``, ``Σ_windows g`` (d_out × d_in).
Results are cached per block (atomic files), so a killed run resumes the reverse pass where it stopped.
Each window's loss is its mean over its predicted tokens, and its gradient is squared per window (the
empirical Fisher of the official FWSVD/ASVD code, which runs one window per batch).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from romcomp.compression.activations import Boundary
from romcomp.compression.blocks import BlockIO
from romcomp.compression.memory import (
    HEAD_CHUNK,
)  # the head's logits: chunk × vocabulary, not window × vocabulary
from romcomp.compression.runner import Runner, Streams
from romcomp.errors import RomcompError
from romcomp.model.checkpoint import atomic_save_safetensors
from romcomp.model.discovery import materialized, module_name, text_config, top_level_names
from romcomp.model.shell import identity_block

GRAD_DIR = "gradients"


def gradients_path(work: Path, index: int) -> Path:
    return work / GRAD_DIR / f"block-{index:05d}.safetensors"


def _clone_args(value):
    """Block arguments captured under inference mode, as ordinary tensors autograd may save."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple | list):
        return type(value)(_clone_args(v) for v in value)
    if isinstance(value, dict):
        return {k: _clone_args(v) for k, v in value.items()}
    return value


def _head_tensors(io: BlockIO, skip_input_embedding: bool) -> dict[str, torch.Tensor]:
    """Every top-level tensor the head step needs (final norm, output head, position tables); a tied head
    gets the embedding. With ``skip_input_embedding`` an untied model's input embedding stays on meta: the
    blocks are identities fed the stored hidden states, so its values are never used (a vocabulary ×
    hidden matrix less: 0.87 GiB for Qwen2.5-1.5B)."""
    ckpt, arch = io.ckpt, io.arch
    embed = f"{module_name(io.model, io.model.get_input_embeddings())}.weight"
    names = top_level_names(ckpt, arch.blocks, None)
    head = io.model.get_output_embeddings()
    tied = head is not None and arch.lm_head and f"{arch.lm_head}.weight" not in names
    if skip_input_embedding and not tied:
        names = [n for n in names if n != embed]
    tensors = {n: ckpt.get(n).float() for n in names}
    if tied:
        tensors[f"{arch.lm_head}.weight"] = tensors[embed]
    return tensors


def _takes(model: nn.Module, argument: str) -> bool:
    """Whether the family's forward takes ``argument`` (``logits_to_keep``: positions whose logits the
    head computes; ``inputs_embeds``: hidden states instead of token ids)."""
    return argument in inspect.signature(model.forward).parameters


def head_gradient(io: BlockIO, windows: torch.Tensor, last: Boundary, sink: Boundary) -> float:
    """``∂L_w/∂h`` of each window's mean next-token loss w.r.t. the last block's outputs ``h``, into
    ``sink``; returns the mean loss (a check against the model's own perplexity). The head runs on
    ``HEAD_CHUNK`` positions at a time where the family lets it (``logits_to_keep``), the gradients of the
    chunks' shares of the loss summed."""
    layers = io.layers
    fed: dict[str, torch.Tensor] = {}

    def feed(*args, **kwargs):
        return fed["h"]

    for layer in layers:
        layer.forward = identity_block
    layers[-1].forward = feed
    predicted = windows.shape[1] - 1
    chunk = HEAD_CHUNK if _takes(io.model, "logits_to_keep") else predicted
    embeds = _takes(io.model, "inputs_embeds")  # then the input embedding is not needed at all
    hidden = text_config(io.model.config).hidden_size
    losses = []
    try:
        with materialized(io.model, _head_tensors(io, embeds)):
            for w in range(windows.shape[0]):
                inputs = (
                    {"inputs_embeds": torch.zeros(1, windows.shape[1], hidden)}
                    if embeds
                    else {"input_ids": windows[w : w + 1]}
                )
                fed["h"] = last.read(w, w + 1).clone().requires_grad_(True)
                grad, loss_sum = torch.zeros_like(fed["h"]), 0.0
                for start in range(0, predicted, chunk):
                    keep = torch.arange(start, min(start + chunk, predicted))
                    kwargs = {"logits_to_keep": keep} if chunk < predicted else {}
                    logits = io.model(**inputs, use_cache=False, **kwargs).logits
                    logits = logits[0] if kwargs else logits[0, :-1]
                    targets = windows[w, keep + 1]
                    loss = nn.functional.cross_entropy(logits.float(), targets, reduction="sum") / predicted
                    grad += torch.autograd.grad(loss, fed["h"])[0]
                    loss_sum += float(loss.detach())
                sink.write(w, grad)
                losses.append(loss_sum)
    finally:
        for layer in layers:
            del layer.forward
    return sum(losses) / len(losses)


def block_gradients(io: BlockIO, index: int, block: nn.Module, source: Boundary, grad_out: Boundary,
                    grad_in: Boundary | None, full: bool) -> dict[str, torch.Tensor]:  # fmt: skip
    """Recompute the loaded block ``index`` on each window's input with autograd, back-propagate
    ``grad_out`` (the gradient of its outputs), accumulate its linears' weight gradients and write its
    input gradient to ``grad_in`` (None for block 0)."""
    linears = {name: block.get_submodule(name) for name in io.arch.linears}
    for p in block.parameters():
        p.requires_grad_(False)
    for linear in linears.values():
        linear.weight.requires_grad_(True)
    fisher = {n: torch.zeros(m.in_features, dtype=torch.float64) for n, m in linears.items()}
    total = {n: torch.zeros_like(m.weight) for n, m in linears.items()} if full else {}
    args, kwargs = _clone_args(io.block_calls[(index, 1)])
    for w in range(source.shape[0]):
        x = source.read(w, w + 1).clone().requires_grad_(grad_in is not None)
        out = block(x, *args, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        wanted = [m.weight for m in linears.values()] + ([x] if grad_in is not None else [])
        grads = torch.autograd.grad(out, wanted, grad_outputs=grad_out.read(w, w + 1))
        for (name, _), g in zip(linears.items(), grads, strict=False):
            fisher[name] += g.double().pow(2).sum(dim=0)
            if full:
                total[name] += g
        if grad_in is not None:
            if not torch.isfinite(grads[-1]).all():
                raise RomcompError(f"non-finite gradient below block {index} (window {w})")
            grad_in.write(w, grads[-1])
    prefix = io.arch.block_prefix(index)
    result = {f"{prefix}{n}.fisher_in": v for n, v in fisher.items()}
    result.update({f"{prefix}{n}.grad": v for n, v in total.items()})
    return result


class GradientStore(Mapping):
    """The cached pass's results, read from disk one tensor at a time when asked for: with ``full`` they
    are as large as the model's block linears, so they are never all held in memory."""

    def __init__(self, work: Path, n_blocks: int) -> None:
        self.where: dict[str, Path] = {}
        for i in range(n_blocks):
            path = gradients_path(work, i)
            with safe_open(str(path), framework="pt") as f:
                self.where.update(dict.fromkeys(f.keys(), path))

    def __getitem__(self, key: str) -> torch.Tensor:
        with safe_open(str(self.where[key]), framework="pt") as f:
            return f.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.where)

    def __len__(self) -> int:
        return len(self.where)


def gradient_pass(io: BlockIO, work: Path, windows: torch.Tensor, n_blocks: int, progress: bool,
                  full: bool = False) -> GradientStore:  # fmt: skip
    """Run (or resume) the streamed gradient pass; returns ``{linear name + ".fisher_in": (d_in,)}`` and,
    with ``full``, ``{... + ".grad": (d_out, d_in)}`` for every block linear, read lazily."""
    todo = [i for i in range(n_blocks) if not gradients_path(work, i).exists()]
    if todo:
        gradients_path(work, 0).parent.mkdir(parents=True, exist_ok=True)
        _run(io, work, windows, todo[-1] + 1, progress, full)
    return GradientStore(work, n_blocks)


def _acts(work: Path, index: int) -> Path:
    return work / GRAD_DIR / f"acts-{index:05d}.bin"


def _grads(work: Path, index: int) -> Path:
    return work / GRAD_DIR / f"grad-{index:05d}.bin"


@dataclass
class ForwardSweep:
    """The runner's work for the gradient pass's forward: every block's input kept on disk."""

    io: BlockIO
    work: Path
    label: str = "gradients"

    def sources(self, index: int) -> dict[str, Path]:
        return {"acts": _acts(self.work, index)}

    def sinks(self, index: int) -> dict[str, Path]:
        return {"acts": _acts(self.work, index + 1)}

    def process(self, index: int, block: nn.Module, sources: Streams, sinks: Streams) -> None:
        self.io.forward(index, block, sources["acts"], sinks["acts"])

    def finish(self, index: int, sources: Streams) -> None:
        """Nothing to record: the reverse sweep reads every boundary."""


@dataclass
class ReverseSweep:
    """The runner's work for the reverse sweep: block by block from the top, the gradient of each block's
    input written for the block below, the linears' gradients cached per block."""

    io: BlockIO
    work: Path
    full: bool
    label: str = "gradients"
    _tensors: dict[str, torch.Tensor] | None = None

    def sources(self, index: int) -> dict[str, Path]:
        return {"acts": _acts(self.work, index), "grad": _grads(self.work, index + 1)}

    def sinks(self, index: int) -> dict[str, Path]:
        return {"grad": _grads(self.work, index)} if index else {}

    def process(self, index: int, block: nn.Module, sources: Streams, sinks: Streams) -> None:
        self._tensors = block_gradients(self.io, index, block, sources["acts"], sources["grad"],
                                        sinks.get("grad"), self.full)  # fmt: skip

    def finish(self, index: int, sources: Streams) -> None:
        atomic_save_safetensors(self._tensors, gradients_path(self.work, index))  # after grad_in is durable
        self._tensors = None
        for path in (_acts(self.work, index + 1), _grads(self.work, index + 1)):
            os.remove(path)


def _run(io: BlockIO, work: Path, windows: torch.Tensor, top: int, progress: bool, full: bool) -> None:
    """Forward to boundary ``top`` (reusing committed boundaries), the head, then the reverse pass down
    to block 0; blocks at or above ``top`` are done (their gradient files exist). Per-window calls (a
    block I/O of its own with batch size 1): the reverse pass differentiates one window at a time."""
    io = replace(io, batch_size=1, block_calls={})
    runner = Runner(io, io.stream_shape(windows), in_ram=False, progress=progress)
    first = max((i for i in range(top + 1) if _acts(work, i).exists()), default=None)
    carry = runner.start(windows, {"acts": _acts(work, first or 0)}, fresh=first is None)
    runner.run(ForwardSweep(io, work), range(first or 0, top), carry, total=2 * top, done=first or 0)
    if not _grads(work, top).exists():  # else: resuming the reverse pass below ``top``
        if top != len(io.layers):
            raise RomcompError("the gradient cache is incomplete; rerun with --overwrite")
        grad = Boundary.create(_grads(work, top), runner.shape, in_ram=False)
        head_gradient(io, windows, Boundary.load(_acts(work, top), runner.shape, in_ram=False), grad)
        grad.commit()
    runner.run(ReverseSweep(io, work, full), range(top - 1, -1, -1), total=2 * top, done=top)
    os.remove(_acts(work, 0))
