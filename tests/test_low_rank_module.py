"""The low-rank pair's forward: two products, with the factor modules' hooks honoured."""

from __future__ import annotations

import torch

from romcomp.hf.modeling_romcomp import LowRankLinear


def test_pair_forward_equals_its_modules_and_keeps_hooks():
    """The direct path gives the bytes of ``up(down(x))``; a hook on a factor (an observer, accelerate's
    offloading) is still called, and what it returns is used."""
    torch.manual_seed(0)
    pair = LowRankLinear(24, 40, 6, bias=True)
    x = torch.randn(3, 5, 24)
    direct = pair(x)
    assert torch.equal(direct, pair.up(pair.down(x)))
    seen = []
    handle = pair.down.register_forward_hook(lambda _m, _a, out: seen.append(out.shape) or out * 2)
    hooked = pair(x)
    handle.remove()
    assert seen == [torch.Size([3, 5, 6])]
    torch.testing.assert_close(hooked, pair.up(2 * pair.down(x)))
