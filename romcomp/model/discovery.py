"""Architecture discovery: where the blocks are and which ``nn.Linear`` leaves share an input.

No per-family table: the blocks are the ``nn.ModuleList`` of ``num_hidden_layers`` modules that holds
``nn.Linear`` leaves, and one traced forward of block 0 (real weights, a few tokens) tells which linears
read the very same tensor (a group: one input covariance serves all of them) and in which order they run.
A group of one linear that writes a hidden-size output ends a residual *sublayer* (attention, MLP), which
the allocation uses to weigh truncation error. Routers (outputs the size of the expert count) stay dense.
A family whose layout discovery gets wrong can still be described by hand in :data:`OVERRIDES`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from romcomp.errors import BadInputError
from romcomp.model.archs import ArchSpec
from romcomp.model.checkpoint import LazyCheckpoint

OVERRIDES: dict[str, ArchSpec] = {}  # model_type -> a hand-written spec, for layouts discovery gets wrong
TRACE_TOKENS = 8
_EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


class StopForward(Exception):
    """Raised by a hook once everything a forward is run for has been seen: the rest of the model (or
    block) is skipped."""


def text_config(hf_config):
    """The decoder's own config (``text_config`` of composite models, else the config itself)."""
    get = getattr(hf_config, "get_text_config", None)
    return get(decoder=True) if get is not None else hf_config


def module_name(root: nn.Module, module: nn.Module) -> str | None:
    """Dotted name of ``module`` under ``root`` ("" for ``root`` itself), None when not found."""
    for name, found in root.named_modules():
        if found is module:
            return name
    return None


def find_blocks(model: nn.Module, n_layers: int) -> str:
    """The dotted name of the ``ModuleList`` of decoder (or encoder) blocks."""
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    found = [
        n for n, m in lists if len(m) == n_layers and any(isinstance(x, nn.Linear) for x in m[0].modules())
    ]
    if len(found) == 1:
        return found[0]

    def leaves(m: nn.Module) -> str:
        kinds = sorted({type(x).__name__ for x in m.modules() if not list(x.children())})
        return "/".join(kinds) or "no"

    seen = (
        ", ".join(f"{n or '<root>'}[{len(m)}] of {leaves(m[0])} leaves" for n, m in lists if len(m)) or "none"
    )
    if not found:
        raise BadInputError(
            f"no ModuleList of {n_layers} blocks with nn.Linear leaves (found: {seen}); romcomp compresses "
            "nn.Linear leaves only"
        )
    raise BadInputError(f"several ModuleLists could be the {n_layers} blocks: {', '.join(found)}")


def discover(model: nn.Module, hf_config, ckpt: LazyCheckpoint | None = None) -> ArchSpec:
    """The :class:`ArchSpec` of ``model``: a meta shell whose tensor names match ``ckpt``, or (without
    ``ckpt``) a model with its weights loaded."""
    override = OVERRIDES.get(hf_config.model_type)
    if override is not None:
        return override
    cfg = text_config(hf_config)
    blocks = find_blocks(model, cfg.num_hidden_layers)
    base = module_name(model, model.base_model) or ""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    lm_head = module_name(model, head) if head is not None else None
    calls = _trace_block0(model, ckpt, blocks, base, lm_head)
    if not calls:
        raise BadInputError(
            f"block 0 of {blocks} ran no nn.Linear leaf on a traced forward; nothing to compress"
        )
    experts = {int(getattr(cfg, k)) for k in _EXPERT_COUNT_KEYS if isinstance(getattr(cfg, k, None), int)}
    groups: list[list[str]] = []
    by_input: dict[int, int] = {}
    block0 = model.get_submodule(blocks)[0]
    for name, key in calls:
        linear = block0.get_submodule(name)
        if linear.out_features == 1 or linear.out_features in experts:
            continue  # a router or a gate scalar: tiny, and its errors flip discrete choices
        if key not in by_input:
            by_input[key] = len(groups)
            groups.append([])
        groups[by_input[key]].append(name)
    if not groups:
        raise BadInputError(
            f"block 0 of {blocks} has only router-sized nn.Linear leaves; nothing to compress"
        )
    hidden = cfg.hidden_size
    writes = [len(g) == 1 and block0.get_submodule(g[0]).out_features == hidden for g in groups]
    sublayers: list[tuple[int, ...]] = []
    current: list[int] = []
    for i, writer in enumerate(writes):
        current.append(i)
        if writer:
            sublayers.append(tuple(current))
            current = []
    if current:
        sublayers.append(tuple(current))
    return ArchSpec(
        blocks=blocks,
        groups=tuple(tuple(g) for g in groups),
        sublayers=tuple(sublayers),
        base=base,
        lm_head=lm_head,
        experts=expert_projections(block0),
    )


def is_experts_module(module: nn.Module) -> bool:
    """An experts module transformers' experts interface drives (``@use_experts_implementation`` sets
    these flags), so romcomp's experts implementation can run it."""
    return all(hasattr(module, a) for a in ("has_gate", "is_transposed", "num_experts"))


def expert_projections(block: nn.Module) -> tuple[str, ...]:
    """The fused 3-D projections of the experts modules in ``block`` that transformers' experts interface
    drives (``@use_experts_implementation``: flags ``has_gate``/``is_transposed``), in call order (the
    up or gate-up projection, then ``down_proj``). Other 3-D parameters stay dense."""
    found = []
    for name, module in block.named_modules():
        if not is_experts_module(module):
            continue
        first = "gate_up_proj" if module.has_gate else "up_proj"
        for proj in (first, "down_proj"):
            param = module._parameters.get(proj)
            if param is not None and param.dim() == 3:
                found.append(f"{name}.{proj}")
    return tuple(found)


def _trace_block0(
    model: nn.Module, ckpt: LazyCheckpoint | None, blocks: str, base: str, lm_head: str | None
) -> list[tuple[str, int]]:
    """(linear name relative to the block, id of its input tensor) in call order, first call only, from
    one forward of a few tokens through the embeddings and a materialized block 0."""
    block0 = model.get_submodule(blocks)[0]
    prefix = f"{blocks}.0."
    names = {n: m for n, m in block0.named_modules() if isinstance(m, nn.Linear)}
    tensors: dict[str, torch.Tensor] = {}
    if ckpt is not None:
        tensors = {n: ckpt.get(n).float() for n in top_level_names(ckpt, blocks, lm_head)}
        tensors.update({n: ckpt.get(n).float() for n in ckpt.with_prefix(prefix)})
    calls: list[tuple[str, int]] = []
    keep: list[torch.Tensor] = []  # inputs stay referenced so their ids stay unique during the trace

    def on_linear(name: str):
        def hook(_m: nn.Module, args: tuple) -> None:
            if all(n != name for n, _ in calls):
                keep.append(args[0])
                calls.append((name, id(args[0])))

        return hook

    def stop(_m: nn.Module, _args: tuple, _out) -> None:
        raise StopForward

    handles = [m.register_forward_pre_hook(on_linear(n)) for n, m in names.items()]
    handles.append(block0.register_forward_hook(stop))
    ids = torch.arange(1, TRACE_TOKENS + 1).remainder(max(2, text_config(model.config).vocab_size - 1))[None]
    try:
        with materialized(model, tensors), torch.inference_mode():
            try:
                model.get_submodule(base)(input_ids=ids, use_cache=False)
            except StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    return calls


def top_level_names(ckpt: LazyCheckpoint, blocks: str, lm_head: str | None) -> list[str]:
    """Checkpoint tensors outside the blocks and (when named) the output head ``lm_head``: what runs before
    block 0, or with ``lm_head=None`` every top-level tensor an output copies."""
    skip = (f"{blocks}.",) + ((f"{lm_head}.",) if lm_head else ())
    return [n for n in ckpt.keys() if not n.startswith(skip)]


@contextmanager
def materialized(model: nn.Module, tensors: dict[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily give meta parameters real values (the tensors that run before block 0, a block)."""
    from accelerate.utils import set_module_tensor_to_device

    was_meta = {}
    for name, value in tensors.items():
        owner, _, leaf = name.rpartition(".")
        was_meta[name] = getattr(model.get_submodule(owner), leaf).is_meta
        set_module_tensor_to_device(model, name, "cpu", value=value)
    try:
        yield
    finally:
        for name in tensors:
            if was_meta[name]:
                set_module_tensor_to_device(model, name, "meta")
