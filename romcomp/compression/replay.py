"""Replay of a compressed block's first sublayer: once its linears are all fitted, its outputs are final.

A sequential fit runs the compressed block several times over the calibration windows: the statistics
forwards of the later stages (the MLP's gate/up, then down), the experts' forward and the propagation
that fills the next boundary. Every one of them recomputes the attention sublayer, although after its
last linear (``o_proj``) is fitted its output no longer changes. :class:`Replay` takes the place of that
module in the block: it computes and records the outputs in the first pass over the windows, then returns
the recorded ones — the same bytes the module would compute again, so the run's outputs are bit-identical
with or without it (``tests/test_replay.py``).

The module is found from the layout, not named: the deepest module holding every linear of the block's
first sublayer and no other compressible linear (``self_attn`` in Llama, ``attention`` in BERT). A guard
keeps it safe where that assumption would break: each recorded batch keeps a fingerprint of its inputs
(the float64 sum of every tensor argument); a call whose inputs do not match is computed, not replayed;
an output other than a float32 tensor, or a tuple of one and ``None``s, disables the replay for the block.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from romcomp.compression.activations import Scratch
from romcomp.model.archs import ArchSpec


def first_sublayer(arch: ArchSpec) -> str | None:
    """The name (relative to the block) of the deepest module holding every linear of the first residual
    sublayer and no other compressible linear or expert projection; None when there is none below the
    block itself."""
    if len(arch.sublayers) < 2:
        return None
    inside = [name for g in arch.sublayers[0] for name in arch.groups[g]]
    parts = [name.split(".")[:-1] for name in inside]
    common: list[str] = []
    for level in zip(*parts, strict=False):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    if not common:
        return None
    prefix = ".".join(common) + "."
    others = [n for n in arch.compressible if n not in inside]
    if any(n.startswith(prefix) for n in others):
        return None
    return prefix[:-1]


class Replay(nn.Module):
    """Stands in for ``inner`` (kept outside the module tree, so nothing it owns is visited twice) over
    ``n`` calibration windows taken in order, batch by batch: records ``inner``'s outputs in the first
    pass, returns them afterwards."""

    def __init__(self, inner: nn.Module, store: Scratch, n: int) -> None:
        super().__init__()
        self.__dict__["inner"] = inner
        self.store, self.n, self.at = store, n, 0
        self.recorded = False
        self.shape: int | None = None  # None: a bare tensor; else the tuple's length (tensor + Nones)
        self.prints: dict[int, tuple[float, ...]] = {}
        self.usable = True

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.usable:
            return self.inner(*args, **kwargs)
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        start, size = self.at, hidden.shape[0]
        self.at = (start + size) % self.n
        fingerprint = _fingerprint([*args, *kwargs.values()])
        if self.recorded and self.prints.get(start) == fingerprint:
            out = self.store.read(start, start + size)
            return out if self.shape is None else (out, *([None] * (self.shape - 1)))
        out = self.inner(*args, **kwargs)
        if not self.recorded:
            self._record(start, out, fingerprint)
            self.recorded = self.at == 0
        return out

    def _record(self, start: int, out: Any, fingerprint: tuple[float, ...]) -> None:
        value = out
        if isinstance(out, tuple):
            if not out or any(v is not None for v in out[1:]):
                self.usable = False
                return
            self.shape, value = len(out), out[0]
        if not isinstance(value, torch.Tensor) or value.dtype != torch.float32:  # stored as float32
            self.usable = False
            return
        self.store.write(start, value)
        self.prints[start] = fingerprint


def _fingerprint(values: list[Any]) -> tuple[float, ...]:
    """The float64 sums of every tensor among ``values`` (and inside tuples of them, such as rotary
    ``(cos, sin)``): what a recorded batch is recognized by."""
    flat = [x for v in values for x in (v if isinstance(v, tuple) else (v,))]
    return tuple(float(x.sum(dtype=torch.float64)) for x in flat if isinstance(x, torch.Tensor))


class Replays:
    """The replays of a block's compressed copies (one per output): :meth:`arm` swaps a recording
    :class:`Replay` into a copy once its first sublayer is fitted; :meth:`close` gives every copy its own
    module back and deletes the stores (before a block is written or freed)."""

    def __init__(self, blocks: list[nn.Module], arch: ArchSpec, shape: tuple[int, int, int], work: Path,
                 in_ram: bool) -> None:  # fmt: skip
        self.blocks, self.shape, self.work, self.in_ram = blocks, shape, work, in_ram
        self.name = first_sublayer(arch)
        self.last = max(arch.sublayers[0]) if arch.sublayers else None  # the sublayer's last group
        self.slots: list[Replay | None] = [None] * len(blocks)

    def arm(self, block: nn.Module) -> None:
        """Start recording in ``block`` (its first sublayer's linears are final), once."""
        j = next(i for i, b in enumerate(self.blocks) if b is block)
        if self.name is None or self.slots[j] is not None:
            return
        store = Scratch.create(self.work / f"replay-{j}.bin", self.shape, self.in_ram)
        self.slots[j] = Replay(block.get_submodule(self.name), store, self.shape[0])
        block.set_submodule(self.name, self.slots[j])

    def arm_before(self, groups: int, blocks: list[nn.Module]) -> None:
        """Arm ``blocks`` when the first ``groups`` linear groups (in call order) are final."""
        if self.last is not None and groups > self.last:
            for block in blocks:
                self.arm(block)

    def close(self) -> None:
        for block, replay in zip(self.blocks, self.slots, strict=True):
            if replay is not None:
                block.set_submodule(self.name, replay.inner)
                replay.store.close()
        self.slots = [None] * len(self.blocks)


@contextmanager
def replaying(blocks: list[nn.Module], arch: ArchSpec, shape: tuple[int, int, int], work: Path,
              in_ram: bool) -> Iterator[Replays]:  # fmt: skip
    """:class:`Replays` of ``blocks``, closed on exit."""
    replays = Replays(blocks, arch, shape, work, in_ram)
    try:
        yield replays
    finally:
        replays.close()
