"""Lower-precision side networks: ``--sidenet read:precision=bfloat16``.

The network runs under ``torch.autocast``: matrix products (linear layers, the RNN's projections)
compute in bfloat16, while parameters, gradients, optimiser state, normalisation and the loss stay
float32. On CPUs with bfloat16 matrix units (Intel AMX, ``amx_bf16`` in ``/proc/cpuinfo``) and on
GPUs this cuts the cost of the products that dominate READ over every token; on other CPUs
bfloat16 products are emulated and slower, which :func:`warn_if_slow` says once.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from pipeline.sidenets.base import SideBatch

log = logging.getLogger(__name__)
PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # named as --dtype names them
_warned: set[str] = set()


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` has bfloat16 matrix units (CPU: AMX tiles or AVX-512 BF16)."""
    if device.type != "cpu":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    cpu = getattr(torch, "cpu", None)
    return any(bool(getattr(cpu, probe, lambda: False)()) for probe in
               ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))  # fmt: skip


def warn_if_slow(device: torch.device) -> None:
    if device.type in _warned or native_bf16(device):
        return
    _warned.add(device.type)
    log.warning("precision=bfloat16 on a %s without bfloat16 matrix units: the products are "
                "emulated and likely slower than float32", device.type)  # fmt: skip


class Autocast(nn.Module):
    """Runs ``net`` under ``torch.autocast(dtype)`` and returns float32 outputs. Its state dict
    is ``net``'s under the prefix ``net.``; :func:`pipeline.sidenets.build` rebuilds the wrapper
    from the spec, so checkpoints load back into the same structure."""

    def __init__(self, net: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.net, self.dtype = net, dtype

    def forward(self, batch: SideBatch) -> torch.Tensor:
        device = batch.hidden.device
        warn_if_slow(device)
        with torch.autocast(device.type, dtype=self.dtype):
            out = self.net(batch)
        return out.float()
