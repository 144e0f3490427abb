"""The output directory: ownership checks, the lock, the resume manifest, block shards and the final files.

Crash safety: every file is written under a temporary name, fsynced and renamed; the manifest records a
block as done only after its shard and the next activation boundary are durable; ``config.json`` and the
index are written last, so an interrupted output never looks like a loadable model.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from romcomp.compression.config import with_added_args
from romcomp.errors import BadInputError, RomcompError
from romcomp.model.checkpoint import (
    LazyCheckpoint,
    atomic_save_safetensors,
    atomic_stream_safetensors,
    atomic_write_json,
    fsync_dir,
)

WORK = ".romcomp"
MANIFEST = "manifest.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "generation_config.json",
)
HF_CODE = ("modeling_romcomp.py",)


def args_hash(args: dict) -> str:
    return hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()


def shard_name(index: int, total: int) -> str:
    """HF-style 1-based shard names: blocks are 1..n, the dense top-level tensors are n+1."""
    return f"model-{index + 1:05d}-of-{total:05d}.safetensors"


def romcomp_record(config: dict) -> dict | None:
    """The record of the run that wrote an output's ``config.json`` (its ``quantization_config``), or
    None for any other model."""
    record = config.get("quantization_config")
    return record if isinstance(record, dict) and record.get("quant_method") == "romcomp" else None


def is_romcomp_output(path: Path) -> bool:
    if (path / WORK / MANIFEST).exists():
        return True
    config = path / "config.json"
    if config.exists():
        try:
            return romcomp_record(json.loads(config.read_text())) is not None
        except ValueError:
            return False
    return False


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse, before any work, to write into a directory that is not ours (or not empty)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise BadInputError(f"--out {out} exists and is not a directory")
    if any(out.iterdir()) and not is_romcomp_output(out):
        raise BadInputError(
            f"--out {out} exists, is not empty and is not a romcomp output; choose another path"
        )


@dataclass
class Manifest:
    """Progress of one run, persisted in ``<out>/.romcomp/manifest.json``."""

    args: dict
    args_hash: str
    source: dict
    calibration: str
    ranks: dict[str, int]
    blocks_done: list[int] = field(default_factory=list)
    status: str = "running"
    notes: dict[str, list[str]] = field(default_factory=dict)
    threads: int = 0
    plan: dict = field(default_factory=dict)  # the memory plan of the run that started the output
    block_times: dict[str, dict[str, float]] = field(default_factory=dict)  # seconds per phase, RSS after
    profile_seconds: float = 0.0  # the dense pre-pass of a data-driven allocation (0: none, or resumed)
    profile_times: dict[str, dict[str, float]] = field(default_factory=dict)  # per block: forward, spectra

    def to_json(self) -> dict:
        return dict(self.__dict__)


class OutputDir:
    """Owns ``<out>`` for one run: lock, manifest, shards, final files."""

    def __init__(self, out: Path, n_blocks: int) -> None:
        self.out = out
        self.work = out / WORK
        self.n_blocks = n_blocks
        self.total_shards = n_blocks + 1
        self._lock_fd = None

    # -- ownership -------------------------------------------------------------------------------------
    def open(self, manifest: Manifest, overwrite: bool) -> Manifest:
        """Create or reopen the output; returns the manifest to continue from."""
        check_out_dir(self.out, overwrite)
        if overwrite and self.out.exists() and is_romcomp_output(self.out):
            self._lock()  # never delete under a running writer
            shutil.rmtree(self.out)
            self._lock_fd = None
        self.work.mkdir(parents=True, exist_ok=True)
        self._lock()
        path = self.work / MANIFEST
        if not path.exists():
            if (self.out / "config.json").exists():
                raise BadInputError(f"--out {self.out} holds a finished romcomp output; use --overwrite")
            atomic_write_json(path, manifest.to_json())
            return manifest
        previous = Manifest(**json.loads(path.read_text()))
        started = with_added_args(previous.args)
        if started.get("world_size") != manifest.args.get("world_size"):
            raise BadInputError(
                f"--out {self.out} was started by {started['world_size']} worker process(es), this run has "
                f"{manifest.args['world_size']}: resume with as many (each holds its share of the "
                "activations), or pass --overwrite to start over"
            )
        if args_hash(started) != manifest.args_hash:
            changed = sorted(k for k in set(started) | set(manifest.args)
                             if started.get(k) != manifest.args.get(k))  # fmt: skip
            raise BadInputError(
                f"--out {self.out} was started with different arguments ({', '.join(changed)}); "
                "rerun the same command to resume, or pass --overwrite to start over"
            )
        previous.args, previous.args_hash = manifest.args, manifest.args_hash  # predated ones filled in
        if previous.source.get("fingerprint") != manifest.source.get("fingerprint"):
            raise RomcompError(
                f"the source checkpoint changed since {self.out} was started "
                f"({previous.source.get('description')}); "
                "refusing to resume: pass --overwrite to start over"
            )
        return previous

    def _lock(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        fd = open(self.work / "lock", "a+")  # noqa: SIM115 - held for the life of the run
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fd.close()
            raise RomcompError(
                f"another romcomp run is writing to {self.out}; refusing to interleave"
            ) from None
        self._lock_fd = fd

    def close(self) -> None:
        if self._lock_fd is not None:
            self._lock_fd.close()
            self._lock_fd = None

    # -- progress --------------------------------------------------------------------------------------
    def save_manifest(self, manifest: Manifest) -> None:
        atomic_write_json(self.work / MANIFEST, manifest.to_json())

    def acts_path(self, boundary: int, stream: str = "compressed") -> Path:
        """The activation file of one stream at one block boundary (the compressed stream keeps the
        historical name)."""
        tag = "" if stream == "compressed" else f"{stream}-"
        return self.work / f"acts-{tag}{boundary:05d}.bin"

    def write_shard(self, index: int, tensors: dict[str, torch.Tensor]) -> Path:
        path = self.out / shard_name(index, self.total_shards)
        atomic_save_safetensors(tensors, path)
        return path

    def copy_shard(self, index: int, names: list[str], source: LazyCheckpoint) -> Path:
        """Shard ``index`` made of source tensors copied one at a time (embeddings and head can be GBs)."""
        path = self.out / shard_name(index, self.total_shards)
        atomic_stream_safetensors(path, {n: source.spec(n) for n in names}, source.get)
        return path

    # -- the end ---------------------------------------------------------------------------------------
    def finalize(self, config: dict, source_dir: Path, manifest: Manifest) -> None:
        """Tokenizer, modeling code, index, then config.json last: only now does the output look complete."""
        for name in TOKENIZER_FILES:
            if (source_dir / name).exists():
                shutil.copyfile(source_dir / name, self.out / name)
        code_dir = Path(__file__).resolve().parent.parent / "hf"  # romcomp/hf: the remote-code module
        for name in HF_CODE:
            shutil.copyfile(code_dir / name, self.out / name)
        atomic_write_json(self.out / "model.safetensors.index.json", self._index())
        atomic_write_json(self.out / "config.json", config)
        for leftover in self.work.glob("acts-*"):
            leftover.unlink()
        manifest.status = "complete"
        self.save_manifest(manifest)
        fsync_dir(self.out)

    def _index(self) -> dict:
        from safetensors import safe_open

        weight_map: dict[str, str] = {}
        total = 0
        for i in range(self.total_shards):
            name = shard_name(i, self.total_shards)
            with safe_open(str(self.out / name), framework="pt") as f:
                for key in f.keys():
                    weight_map[key] = name
                    sl = f.get_slice(key)
                    total += torch.Size(sl.get_shape()).numel() * _dtype_size(sl.get_dtype())
        return {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}


def _dtype_size(dtype: str) -> int:
    return {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1}[dtype]


class WorkerDir(OutputDir):
    """A distributed run's view of ``<out>`` on a rank other than 0: a work directory of its own
    (``<out>/.romcomp/rank-N``) for its activation boundaries and caches. The shards, the manifest and
    the final files are rank 0's: writing them here does nothing."""

    def __init__(self, out: Path, n_blocks: int, rank: int) -> None:
        super().__init__(out, n_blocks)
        self.work = out / WORK / f"rank-{rank}"

    def join(self, manifest: Manifest, fresh: bool) -> Manifest:
        """Take rank 0's ``manifest``; a fresh run starts from an empty work directory (one left by an
        earlier run is not this run's)."""
        if fresh and self.work.exists():
            shutil.rmtree(self.work)
        self._lock()
        return manifest

    def remove(self) -> None:
        """The run is done: this rank's work directory goes."""
        self.close()
        shutil.rmtree(self.work, ignore_errors=True)

    def save_manifest(self, manifest: Manifest) -> None:
        pass

    def write_shard(self, index: int, tensors: dict[str, torch.Tensor]) -> Path:
        return self.out / shard_name(index, self.total_shards)

    def copy_shard(self, index: int, names: list[str], source: LazyCheckpoint) -> Path:
        return self.out / shard_name(index, self.total_shards)

    def finalize(self, config: dict, source_dir: Path, manifest: Manifest) -> None:
        pass
