"""The activation cache between blocks: the hidden states every calibration sample has at a block boundary.

Each boundary is a float32 file ``acts-<i>.bin`` in the work directory, written under a temporary name and
renamed once complete, so a resumed run restarts from exactly the bytes an uninterrupted run would use
(bit-identical outputs). With ``in_ram`` the whole boundary also stays in memory; otherwise batches are
read and written with plain file I/O (page cache, not process RSS, holds them).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from romcomp.model.checkpoint import fsync_dir


class Boundary:
    """Activations ``[n_samples, seq_len, hidden]`` at one block boundary."""

    def __init__(self, path: Path, shape: tuple[int, int, int], in_ram: bool) -> None:
        self.path, self.shape, self.in_ram = path, shape, in_ram
        self.sample_bytes = shape[1] * shape[2] * 4
        self.ram: torch.Tensor | None = None

    @classmethod
    def create(cls, path: Path, shape: tuple[int, int, int], in_ram: bool) -> Boundary:
        """A new boundary being written (under ``path.tmp`` until :meth:`commit`)."""
        b = cls(path, shape, in_ram)
        if in_ram:
            b.ram = torch.empty(shape, dtype=torch.float32)
        else:
            with open(b._tmp, "wb") as f:
                f.truncate(shape[0] * b.sample_bytes)
        return b

    @classmethod
    def load(cls, path: Path, shape: tuple[int, int, int], in_ram: bool) -> Boundary:
        """A committed boundary (from a previous block, or a previous run when resuming)."""
        b = cls(path, shape, in_ram)
        expected = shape[0] * b.sample_bytes
        if not path.exists() or path.stat().st_size != expected:
            from romcomp.errors import RomcompError

            raise RomcompError(f"activation cache {path} is missing or truncated; rerun with --overwrite")
        if in_ram:
            b.ram = torch.from_file(str(path), shared=False, size=shape[0] * shape[1] * shape[2]).view(shape)
        return b

    @property
    def _tmp(self) -> Path:
        return self.path.with_name(self.path.name + ".tmp")

    def read(self, start: int, stop: int) -> torch.Tensor:
        if self.ram is not None:
            return self.ram[start:stop]
        with open(self.path, "rb") as f:
            data = os.pread(f.fileno(), (stop - start) * self.sample_bytes, start * self.sample_bytes)
        return torch.frombuffer(bytearray(data), dtype=torch.float32).view(stop - start, *self.shape[1:])

    def write(self, start: int, values: torch.Tensor) -> None:
        values = values.detach().to(torch.float32).contiguous()
        if self.ram is not None:
            self.ram[start : start + values.shape[0]] = values
            return
        with open(self._tmp, "rb+") as f:
            os.pwrite(f.fileno(), values.numpy().tobytes(), start * self.sample_bytes)

    def commit(self) -> None:
        """Make the boundary durable under its final name."""
        if self.ram is not None:
            with open(self._tmp, "wb") as f:
                f.write(self.ram.numpy().tobytes())
        with open(self._tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        os.replace(self._tmp, self.path)
        fsync_dir(self.path.parent)

    def release(self) -> None:
        self.ram = None


class Scratch(Boundary):
    """Per-sample values read back later in the same block (the dense model's stage inputs, see
    :class:`romcomp.compression.fit.DenseTaps`): in memory, or in a plain file (page cache, not RSS) under
    its own name from the start. Never durable and never resumed from: a killed run recomputes the block;
    :meth:`close` deletes the file."""

    @property
    def _tmp(self) -> Path:
        return self.path

    def close(self) -> None:
        self.ram = None
        self.path.unlink(missing_ok=True)
