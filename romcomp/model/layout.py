"""Checkpoints whose tensor names differ from the model's: transformers' conversion mapping, applied lazily.

transformers 5 stores a mixture-of-experts layer as fused 3-D parameters (``experts.gate_up_proj``:
experts × 2·intermediate × hidden) while checkpoints on disk keep one tensor per expert and projection
(``block_sparse_moe.experts.3.w1.weight``); ``from_pretrained`` converts with the family's registered
mapping (renamings, then merges). romcomp streams one block at a time, so it applies the same mapping
per tensor on demand: a renamed tensor is read under its old name, a merged one is stacked (experts) and
concatenated (gate with up) from its sources when the block is loaded. Only the operations those
mappings use for fused experts are supported; any other is refused by name before work starts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from romcomp.errors import BadInputError, RomcompError
from romcomp.model.checkpoint import LazyCheckpoint

SUPPORTED_OPS = ("MergeModulelist", "Concatenate")


def _natural(key: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


@dataclass
class Recipe:
    """How one model tensor is built: sources per pattern (each a list, in expert order) and the ops."""

    sources: list[list[str]]
    ops: list[tuple[str, int]]  # (operation class name, dim)


class ConvertedCheckpoint(LazyCheckpoint):
    """A :class:`LazyCheckpoint` seen under the model's tensor names."""

    def __init__(self, raw: LazyCheckpoint, recipes: dict[str, Recipe]) -> None:
        self.directory = raw.directory
        self.raw = raw
        self.recipes = recipes
        self.weight_map = raw.weight_map  # on-disk accounting (num_params, weight_bytes) stays the raw one

    def keys(self) -> list[str]:
        return list(self.recipes)

    def __contains__(self, name: str) -> bool:
        return name in self.recipes

    def with_prefix(self, prefix: str) -> list[str]:
        return [n for n in self.recipes if n.startswith(prefix)]

    def get(self, name: str) -> torch.Tensor:
        if name not in self.recipes:
            raise RomcompError(f"tensor '{name}' is missing from the checkpoint in {self.directory}")
        recipe = self.recipes[name]
        parts = [[self.raw.get(s) for s in group] for group in recipe.sources]
        return self._combine(parts, recipe.ops)

    def spec(self, name: str) -> tuple[str, tuple[int, ...]]:
        recipe = self.recipes[name]
        specs = [[self.raw.spec(s) for s in group] for group in recipe.sources]
        dtype = specs[0][0][0]
        probes = [
            [torch.empty(shape, dtype=torch.float32, device="meta") for _, shape in group] for group in specs
        ]
        return dtype, tuple(self._combine(probes, recipe.ops).shape)

    @staticmethod
    def _combine(parts: list[list[torch.Tensor]], ops: list[tuple[str, int]]) -> torch.Tensor:
        if not ops:
            return parts[0][0]
        merged = [torch.stack(group, dim=ops[0][1]) if ops[0][0] == "MergeModulelist" else group[0]
                  for group in parts]  # fmt: skip
        for op, dim in ops[1:]:
            if op == "Concatenate":
                merged = [torch.cat(merged, dim=dim)]
        return merged[0]

    def verify(self, expected: dict[str, tuple[int, ...]], optional: set[str] = frozenset()) -> None:
        self.raw.verify({}, set())  # headers, index consistency, dtypes of what is there
        missing = [n for n in expected if n not in self.recipes and n not in optional]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise RomcompError(
                f"tensor '{missing[0]}'{more} is missing from the checkpoint in {self.directory}"
            )
        for name, shape in expected.items():
            if name in self.recipes:
                found = self.spec(name)[1]
                if found != tuple(shape):
                    raise RomcompError(
                        f"tensor '{name}' built from {self.directory} has shape {found}; "
                        f"config.json implies {shape}"
                    )


def as_model_names(ckpt: LazyCheckpoint, model: torch.nn.Module) -> LazyCheckpoint:
    """``ckpt`` itself when it already uses the model's tensor names, else a :class:`ConvertedCheckpoint`
    built from the mapping transformers registers for the model's family."""
    expected = set(model.state_dict())
    if expected <= set(ckpt.keys()) | {"lm_head.weight"}:
        return ckpt
    from transformers.conversion_mapping import get_model_conversion_mapping

    transforms = get_model_conversion_mapping(model)
    recipes: dict[str, dict] = {}
    for key in sorted(ckpt.keys(), key=_natural):
        target, how = key, None
        for transform in transforms:
            renamed, pattern = transform.rename_source_key(target)
            if pattern is None:
                continue
            target = renamed
            if type(transform).__name__ == "WeightConverter":
                how = (transform, pattern)
        entry = recipes.setdefault(target, {"how": how, "sources": {}})
        pattern = how[1] if how else None
        entry["sources"].setdefault(pattern, []).append(key)
    built: dict[str, Recipe] = {}
    for target, entry in recipes.items():
        if entry["how"] is None:
            built[target] = Recipe([entry["sources"][None]], [])
            continue
        transform = entry["how"][0]
        ops = []
        for op in transform.operations:
            name = type(op).__name__
            if name not in SUPPORTED_OPS:
                raise BadInputError(
                    f"the checkpoint's '{target}' needs transformers' {name} conversion, which romcomp does "
                    f"not apply when streaming (supported: {', '.join(SUPPORTED_OPS)})"
                )
            ops.append((name, int(getattr(op, "dim", 0))))
        order = [p for p in transform.source_patterns if p in entry["sources"]]
        built[target] = Recipe([entry["sources"][p] for p in order], ops)
    return ConvertedCheckpoint(ckpt, built)
