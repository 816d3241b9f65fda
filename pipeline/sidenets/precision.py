"""Lower-precision side networks: ``--sidenet read:precision=bfloat16``.

The network runs under ``torch.autocast``: the ops autocast lowers (linear layers, matmul,
attention) compute in bfloat16, while parameters, gradients, optimiser state and the loss stay
float32 (on CPU, autocast leaves the GRU/LSTM cells in float32). On CPUs with bfloat16 matrix
units (Intel AMX, ``amx_bf16`` in ``/proc/cpuinfo``) and on GPUs this cuts the cost of READ's
per-token projections, most of its step; on other CPUs bfloat16 products are emulated and
slower, which :func:`warn_if_slow` says once.

On CPU, oneDNN builds (JIT-compiles) and keeps a bfloat16 kernel for every new matrix shape: for
MiniLM-sized READ about 20 ms and 7 MB per new row count (``python -m benchmarks.precision
--shapes``; BENCHMARKS.md, "Side networks in bfloat16"). A batch's row count varies
from batch to batch, so unpadded every batch would pay that and memory would grow with every new
count. The wrapper therefore rounds the row count up to :func:`bucket` rows with zero-filled
pseudo-samples (each no longer than the batch's longest sample) and drops their outputs: every
row and sample is computed independently by the side networks (per-row layers, per-sample
pooling and attention), so the real samples' outputs do not depend on them, and the shapes stay
few.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

from pipeline.sidenets.base import SideBatch

log = logging.getLogger(__name__)
PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # named as --dtype names them


@functools.cache
def native_bf16(device_type: str) -> bool:
    """Whether the device has bfloat16 matrix units (CPU: AMX tiles or AVX-512 BF16)."""
    if device_type != "cpu":
        return device_type == "cuda" and torch.cuda.is_bf16_supported()
    cpu = getattr(torch, "cpu", None)
    return any(bool(getattr(cpu, probe, lambda: False)()) for probe in
               ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))  # fmt: skip


@functools.cache
def warn_if_slow(device_type: str) -> None:
    """Once per device type: a warning when bfloat16 products would be emulated there."""
    if not native_bf16(device_type):
        log.warning("precision=bfloat16 on a %s without bfloat16 matrix units: the products are "
                    "emulated and likely slower than float32", device_type)  # fmt: skip


class Autocast(nn.Module):
    """Runs ``net`` under ``torch.autocast(dtype)`` and returns float32 outputs. Its state dict
    is ``net``'s under the prefix ``net.``; :func:`pipeline.sidenets.build` rebuilds the wrapper
    from the spec, so checkpoints load back into the same structure."""

    def __init__(self, net: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.net, self.dtype = net, dtype

    def forward(self, batch: SideBatch) -> torch.Tensor:
        device = batch.hidden.device.type
        warn_if_slow(device)
        with torch.autocast(device, dtype=self.dtype):
            out = self.net(padded(batch))
        return out[: len(batch.lengths)].float()


def bucket(rows: int) -> int:
    """``rows`` rounded up to 4 significant bits (8 sizes per octave: at most 1/8 more from 128
    rows up) and to a multiple of 16."""
    step = 1 << max(rows.bit_length() - 4, 4)
    return -(-rows // step) * step


def padded(batch: SideBatch) -> SideBatch:
    """``batch`` plus zero-row pseudo-samples after the real ones, :func:`bucket` rows in all."""
    rows = batch.hidden.shape[0]
    extra = bucket(rows) - rows
    if extra == 0:
        return batch
    longest = max(1, batch.max_length)
    sizes = [longest] * (extra // longest) + ([extra % longest] if extra % longest else [])
    n = len(sizes)
    return SideBatch(
        hidden=torch.cat([batch.hidden, batch.hidden.new_zeros((extra, *batch.hidden.shape[1:]))]),
        lengths=torch.cat([batch.lengths, torch.tensor(sizes, dtype=batch.lengths.dtype,
                                                       device=batch.lengths.device)]),
        labels=torch.cat([batch.labels, batch.labels[:1].expand(n)]),
        samples=torch.cat([batch.samples, batch.samples[:1].expand(n)]),
        longest=longest,
        segments=None if batch.segments is None else torch.cat(
            [batch.segments, batch.segments.new_zeros(extra)]),
    )  # fmt: skip
