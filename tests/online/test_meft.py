"""MEFT: the reversible custom autograd function gives ordinary autograd's gradients, and stores
activations whose size does not grow with depth."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.backbone import load_backbone
from pipeline.extract import DeviceBatch
from pipeline.online.batches import TokenBatch
from pipeline.online.meft import Meft, MeftConfig
from pipeline.sidenets.base import StoreInfo, loss_fn


def batch(n: int = 5, seed: int = 0) -> TokenBatch:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 10, n)
    width = int(lengths.max())
    ids = rng.integers(1000, 2000, (n, width))
    mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
    ids = ids * mask
    return TokenBatch(
        DeviceBatch(
            samples=np.arange(n),
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            token_type_ids=torch.zeros(n, width, dtype=torch.int64),
            lengths=torch.from_numpy(lengths),
        ),
        torch.from_numpy(rng.integers(0, 2, n)),
    )


def meft(path: str, dtype: torch.dtype, seed: int = 0) -> Meft:
    bb = load_backbone(path, "cpu")
    torch.manual_seed(seed)
    model = Meft(bb, MeftConfig(bottleneck=8, pool="mean"), 2)
    with torch.no_grad():  # adapters away from their zero start, so G and A are not trivial
        for name, p in model.named_parameters():
            if "adapter" in name:
                p.normal_(0, 0.2)
    return model.to(dtype)


def grads(model: Meft, b: TokenBatch, reversible: bool, seed: int = 1) -> dict[str, torch.Tensor]:
    info = StoreInfo(32, (0,), "all", "mean", 4, False, {"type": "classification", "num_labels": 2})
    model.reversible = reversible
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # same dropout masks in both runs
    loss_fn(info, model(b), b.labels).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_reversible_gradients_equal_ordinary_autograd(bert_of_depth, mode):
    """float64, 4 blocks; in train mode dropout is on and replayed from the saved RNG states."""
    model = meft(bert_of_depth(4), torch.float64)
    model.train(mode == "train")
    b = batch()
    rev, ref = grads(model, b, True), grads(model, b, False)
    assert len(rev) == 4 * 2 * 4 + 2  # 2 adapters x 4 tensors per block, and the head
    assert set(rev) - set(ref) == {
        f"blocks.3.adapter_g.{p}" for p in ("down.weight", "down.bias", "up.weight", "up.bias")
    }
    for name in set(rev) - set(ref):  # the last G does not reach the head: zero gradient
        assert not rev[name].any()
    for name in ref:
        err = (rev[name] - ref[name]).abs().max() / ref[name].abs().max().clamp_min(1e-30)
        assert err < 1e-9, (name, float(err))


def test_only_adapters_and_head_train(bert_of_depth):
    model = meft(bert_of_depth(2), torch.float32)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("adapter" in n or n.startswith("head.") for n in names)


def saved_bytes(model: Meft, b: TokenBatch) -> int:
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(b).sum()
    return total


def test_stored_activations_do_not_grow_with_depth(bert_of_depth):
    b = batch(8)
    rev, plain = {}, {}
    for depth in (2, 4):
        model = meft(bert_of_depth(depth), torch.float32).eval()
        model.reversible = True
        rev[depth] = saved_bytes(model, b)
        model.reversible = False
        plain[depth] = saved_bytes(model, b)
    assert rev[2] == rev[4]
    assert plain[4] > 1.5 * plain[2] and plain[2] > 4 * rev[2]
