"""nova_kernels._sync: every kind of host read raises inside forbid_host_sync, nothing else
does, host_sync_ok lets a marked CPU-only path through, and the guard is gone afterwards."""

from __future__ import annotations

import pytest
import torch

from nova_kernels._sync import HostSyncError, forbid_host_sync, host_sync_ok

READS = {
    "item": lambda x: x.sum().item(),
    "bool": lambda x: bool(x.sum() > 0),
    "int": lambda x: int(x[0]),
    "float": lambda x: float(x[0]),
    "tolist": lambda x: x.tolist(),
    "numpy": lambda x: x.numpy(),
    "nonzero": lambda x: x.nonzero(),
    "where1": lambda x: torch.where(x > 0),
    "bool_mask": lambda x: x[x > 0],
    "bool_mask_put": lambda x: x.clone().__setitem__(x > 0, 1.0),
    "masked_select": lambda x: x.masked_select(x > 0),
    "unique": lambda x: torch.unique(x),
    "repeat_interleave": lambda x: torch.repeat_interleave(torch.tensor([1, 2])),
    "equal": lambda x: torch.equal(x, x),
}

FINE = {
    "arith": lambda x: (x * 2 + 1).exp().sum(),
    "gather": lambda x: x.gather(0, torch.tensor([0, 2])),
    "index_long": lambda x: x[torch.tensor([1, 0])],
    "where3": lambda x: torch.where(x > 0, x, 0.0),
    "repeat_interleave_sized": lambda x: torch.repeat_interleave(
        torch.arange(2), torch.tensor([1, 2]), output_size=3
    ),
    "shape": lambda x: x.shape[0] + x.numel(),
}


@pytest.mark.parametrize("name", list(READS))
def test_host_reads_raise(name):
    x = torch.randn(5)
    READS[name](x)  # fine outside
    with pytest.raises(HostSyncError), forbid_host_sync():
        READS[name](x)
    with forbid_host_sync(), host_sync_ok("test: a CPU-only path"):
        READS[name](x)
    READS[name](x)  # the guard is gone


@pytest.mark.parametrize("name", list(FINE))
def test_device_side_ops_pass(name):
    x = torch.randn(5, requires_grad=False)
    with forbid_host_sync():
        FINE[name](x)


def test_autograd_inside():
    w = torch.randn(4, 3, requires_grad=True)
    with forbid_host_sync():
        (torch.randn(2, 4) @ w).logsumexp(-1).sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
