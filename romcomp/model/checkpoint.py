"""Lazy reading of a safetensors checkpoint and crash-safe writing of output files.

Nothing is loaded until asked for: the engine materializes one block's tensors at a time, so memory does
not grow with the number of layers.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from romcomp.errors import RomcompError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


FLOAT_DTYPES = ("F32", "F16", "BF16")
"""safetensors dtype names romcomp reads (quantized/int checkpoints need dequantizing first)."""


class LazyCheckpoint:
    """Tensor name → shard file map from the index (or the single file), read on demand."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.weight_map = self._read_weight_map()

    def _read_weight_map(self) -> dict[str, str]:
        index = self.directory / INDEX_NAME
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise RomcompError(f"corrupt checkpoint index {index}: {e}") from None
            for shard in sorted(set(weight_map.values())):
                if not (self.directory / shard).exists():
                    raise RomcompError(
                        f"checkpoint shard {self.directory / shard} named in the index is missing"
                    )
            return weight_map
        single = self.directory / SINGLE_NAME
        if not single.exists():
            raise RomcompError(f"no {INDEX_NAME} or {SINGLE_NAME} in {self.directory}")
        with self._open(SINGLE_NAME) as f:
            return dict.fromkeys(f.keys(), SINGLE_NAME)

    def _open(self, shard: str):
        try:
            return safe_open(str(self.directory / shard), framework="pt")
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
            raise RomcompError(f"cannot read checkpoint shard {self.directory / shard}: {e}") from None

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def get(self, name: str) -> torch.Tensor:
        """One tensor, checked to be finite (a NaN in the source is reported by name, not propagated)."""
        if name not in self.weight_map:
            raise RomcompError(f"tensor '{name}' is missing from the checkpoint index in {self.directory}")
        shard = self.weight_map[name]
        try:
            with self._open(shard) as f:
                tensor = f.get_tensor(name)
        except RomcompError:
            raise
        except Exception as e:
            raise RomcompError(f"cannot read tensor '{name}' from {self.directory / shard}: {e}") from None
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise RomcompError(f"tensor '{name}' in {self.directory / shard} contains NaN or Inf")
        return tensor

    def verify(self, expected: dict[str, tuple[int, ...]], optional: set[str] = frozenset()) -> None:
        """Check every shard header against the model's parameters before any expensive work.

        Reads headers only (no tensor data): a truncated or corrupt shard, an index entry pointing at a
        shard that lacks the tensor, a parameter missing from the index, a non-float dtype or a shape
        that disagrees with ``config.json`` each end in one error naming the tensor and file. NaN/Inf
        need the data and are caught when each block is read (:meth:`get`).
        """
        missing = [n for n in expected if n not in self.weight_map and n not in optional]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            where = self.directory
            raise RomcompError(f"tensor '{missing[0]}'{more} is missing from the checkpoint in {where}")
        by_shard: dict[str, list[str]] = {}
        for name, shard in self.weight_map.items():
            by_shard.setdefault(shard, []).append(name)
        for shard, names in sorted(by_shard.items()):
            path = self.directory / shard
            with self._open(shard) as f:
                present = set(f.keys())
                for name in names:
                    if name not in present:
                        raise RomcompError(f"index maps tensor '{name}' to {path}, which does not contain it")
                    if name in expected:
                        self._check_tensor(f.get_slice(name), name, path, expected[name])

    @staticmethod
    def _check_tensor(view: object, name: str, path: Path, shape: tuple[int, ...]) -> None:
        dtype = view.get_dtype()  # type: ignore[attr-defined]
        if dtype not in FLOAT_DTYPES:
            raise RomcompError(f"tensor '{name}' in {path} has dtype {dtype}; expected one of {FLOAT_DTYPES}")
        found = tuple(view.get_shape())  # type: ignore[attr-defined]
        if found != tuple(shape):
            raise RomcompError(f"tensor '{name}' in {path} has shape {found}; config.json implies {shape}")

    def spec(self, name: str) -> tuple[str, tuple[int, ...]]:
        """(safetensors dtype, shape) of a tensor from its shard header, without reading the data."""
        with self._open(self.weight_map[name]) as f:
            view = f.get_slice(name)
            return view.get_dtype(), tuple(view.get_shape())

    def get_many(self, names: list[str]) -> dict[str, torch.Tensor]:
        return {n: self.get(n) for n in names}

    def with_prefix(self, prefix: str) -> list[str]:
        return [n for n in self.weight_map if n.startswith(prefix)]

    def weight_bytes(self) -> int:
        """Size on disk of the weight files."""
        return sum((self.directory / s).stat().st_size for s in set(self.weight_map.values()))

    def num_params(self) -> int:
        """Parameter count read from the headers only."""
        total = 0
        for shard in sorted(set(self.weight_map.values())):
            with self._open(shard) as f:
                for name in f.keys():
                    total += int(torch.Size(f.get_slice(name).get_shape()).numel())
        return total


def fsync_dir(directory: Path) -> None:
    """Make a rename durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _temporary(path: Path) -> Iterator[Path]:
    """A temporary sibling of ``path``, removed if writing it fails (e.g. the disk is full)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary name, fsync, rename: a reader sees the old file or the new one, never half."""
    with _temporary(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: object) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_save_safetensors(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None
) -> None:
    """``save_file`` under a temporary name, fsync, rename."""
    with _temporary(path) as tmp:
        save_file(
            {k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata or {"format": "pt"}
        )
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    fsync_dir(path.parent)


ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}


def atomic_stream_safetensors(
    path: Path, specs: dict[str, tuple[str, tuple[int, ...]]], load: Callable[[str], torch.Tensor],
    metadata: dict | None = None,
) -> None:  # fmt: skip
    """Write a safetensors file tensor by tensor: the header from ``specs`` (name -> dtype, shape), then
    each tensor from ``load(name)`` written and dropped before the next is read.

    Why: ``save_file`` holds every tensor (and a serialized copy) at once; the top-level shard of a model
    with a 150k vocabulary and an untied head is 1.8 GB in float32, which alone broke a 4 GB budget.
    """
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name in sorted(specs):
        dtype, shape = specs[name]
        size = math.prod(shape) * ITEMSIZE[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with _temporary(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            for name in sorted(specs):
                tensor = load(name).contiguous()
                dtype, shape = specs[name]
                if tuple(tensor.shape) != tuple(shape) or tensor.element_size() != ITEMSIZE[dtype]:
                    raise RomcompError(f"tensor '{name}' changed shape or dtype while being written")
                f.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
                del tensor
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    fsync_dir(path.parent)
