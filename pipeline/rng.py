"""Random-number streams of their own, on CPU and CUDA alike.

Dropout draws from torch's global generators: the CPU one for CPU tensors, the device's own for
CUDA tensors. A network that should train exactly as it would alone (one of K in a pass, or
after a resume) swaps its state in before its step and out after (:func:`swap`). CUDA generator
states are a seed and an offset kept on the host, so swapping them costs no device sync.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

RngState = tuple[torch.Tensor, torch.Tensor | None]  # (CPU state, the CUDA device's or None)


def capture(device: torch.device) -> RngState:
    """The global generators' states that computations on ``device`` draw from."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def restore(state: RngState, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if device.type == "cuda":
        if state[1] is None:
            raise ValueError("a CPU random-number state cannot drive a CUDA device")
        torch.cuda.set_rng_state(state[1], device)


def seeded(seed: int, device: torch.device) -> RngState:
    """The states ``torch.manual_seed(seed)`` gives, without touching the caller's."""
    with torch.random.fork_rng(devices=_devices(device)):
        torch.manual_seed(seed)
        return capture(device)


@contextmanager
def swapped(state: RngState, device: torch.device) -> Iterator[None]:
    """Run with ``state`` in the global generators, then put the caller's back."""
    with torch.random.fork_rng(devices=_devices(device)):
        restore(state, device)
        yield


def _devices(device: torch.device) -> list[int]:
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]
