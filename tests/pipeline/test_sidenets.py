"""The contract every side network passes, plus READ/LST-specific guarantees."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.loader import StoreLoader
from pipeline.sidenets import REGISTRY, StoreInfo, build, loss_fn, parse_spec
from pipeline.sidenets.base import SideBatch
from storage import StoreMismatchError, open_store
from tests.conftest import small_cache

SPECS = [
    "read", "read:rnn=lstm,aggregate=mean", "read:rnn=elman,pool=first",
    "lst", "lst:r=4,pool=first",
    "linear", "linear:layer=1,pool=first", "mlp", "mlp:mix=false,layer=-1",
]  # fmt: skip


@pytest.fixture(scope="module")
def store(model_dir, glue_dir, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("side") / "s"
    small_cache(model_dir("bert"), f"glue:{glue_dir}", out, dtype="float32")
    return str(out)


def first_batch(store: str, size: int = 8) -> tuple[SideBatch, StoreInfo]:
    reader = open_store(store)
    batch = next(iter(StoreLoader(reader, size, shuffle=True, seed=3).epoch(0)))
    return batch, StoreInfo.from_meta(reader.meta)


def fresh(spec: str, info: StoreInfo, seed: int = 0, **over) -> torch.nn.Module:
    torch.manual_seed(seed)
    s = parse_spec(spec)
    s.model.update(over)
    return build(s, info)


def test_every_registered_kind_is_covered():
    assert {s.split(":")[0] for s in SPECS} == set(REGISTRY)


@pytest.mark.parametrize("spec", SPECS)
def test_output_shape_and_gradients_reach_every_parameter(spec, store):
    batch, info = first_batch(store)
    model = fresh(spec, info)
    out = model(batch)
    assert out.shape == (len(batch.lengths), info.num_outputs)
    loss_fn(info, out, batch.labels).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("spec", SPECS)
def test_a_tiny_batch_is_overfitted(spec, store):
    batch, info = first_batch(store, size=8)
    # a random tiny BERT's [CLS] states barely differ between samples: pool over all tokens
    model = fresh(spec, info, dropout=0.0, pool="mean")
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(300):
        opt.zero_grad()
        loss = loss_fn(info, model(batch), batch.labels)
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.05
    assert (model(batch).argmax(1) == batch.labels).all()


@pytest.mark.parametrize("spec", SPECS)
def test_state_dict_round_trip(spec, store):
    batch, info = first_batch(store)
    a, b = fresh(spec, info, seed=1).eval(), fresh(spec, info, seed=2).eval()
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(batch), b(batch))


def test_side_networks_import_nothing_from_transformers():
    root = Path(__file__).parents[2] / "pipeline" / "sidenets"
    for file in root.glob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any(n.startswith("transformers") for n in names), file


def test_read_correction_starts_near_zero(store):
    batch, info = first_batch(store)
    model = fresh("read:pool=first,dropout=0", info).eval()
    probe = fresh("linear:pool=first,dropout=0", info).eval()
    probe.head.load_state_dict(model.head.state_dict())  # same head on the uncorrected state
    assert torch.allclose(model(batch), probe(batch), atol=1e-2)


def test_lst_gates_start_at_one_half_and_need_all_positions(store, model_dir, glue_dir, tmp_path):
    _, info = first_batch(store)
    model = fresh("lst", info)
    assert torch.equal(torch.sigmoid(model.alpha / 0.1), torch.full_like(model.alpha, 0.5))
    first = tmp_path / "first"
    small_cache(model_dir("bert"), f"glue:{glue_dir}", first, dtype="float32", positions="first")
    with pytest.raises(StoreMismatchError, match="--positions all"):
        fresh("lst", StoreInfo.from_meta(open_store(first).meta))
    with pytest.raises(StoreMismatchError, match="pools 'mean'"):
        fresh("read:pool=mean", StoreInfo.from_meta(open_store(first).meta))


def test_unknown_kind_and_key_are_refused():
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown side network"):
        parse_spec("transformer")
    with pytest.raises(ConfigError, match="unknown key 'width'"):
        parse_spec("read:width=3")
    with pytest.raises(ConfigError, match="is not a int"):
        parse_spec("read:hidden=big")
    spec = parse_spec("read:hidden=16,lr=3e-4,rnn=lstm,name=r1")
    assert spec.model["hidden"] == 16 and spec.train.lr == 3e-4 and spec.train.name == "r1"


@pytest.mark.parametrize("spec", ["read", "lst:r=4", "mlp"])
def test_bfloat16_precision_computes_products_in_bfloat16(spec, store):
    """``precision=bfloat16``: the same network (same seed, same weights) with its linear layers
    computing in bfloat16; float32 parameters, gradients and outputs; checkpoints load back."""
    batch, info = first_batch(store)
    full = fresh(spec, info, seed=5).eval()
    low = fresh(f"{spec}{',' if ':' in spec else ':'}precision=bfloat16", info, seed=5).eval()
    assert {k.removeprefix("net."): v for k, v in low.state_dict().items()}.keys() == set(
        full.state_dict()
    )
    for (_, a), (_, b) in zip(full.state_dict().items(), low.state_dict().items(), strict=True):
        assert torch.equal(a, b)
    seen: list[torch.dtype] = []
    for module in low.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    out = low(batch)
    assert seen and set(seen) == {torch.bfloat16}
    assert out.dtype == torch.float32
    ref = full(batch)
    assert not torch.equal(out, ref) and torch.allclose(out, ref, rtol=0.05, atol=0.05)
    low.train()
    loss_fn(info, low(batch), batch.labels).backward()
    for name, p in low.named_parameters():
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
        assert p.grad.abs().sum() > 0, name
    again = fresh(f"{spec}{',' if ':' in spec else ':'}precision=bfloat16", info, seed=9).eval()
    again.load_state_dict(low.state_dict())
    low.eval()
    assert torch.equal(again(batch), low(batch))


@pytest.mark.parametrize("spec", ["read", "lst:r=4", "mlp", "read:pool=first"])
def test_padding_to_a_bucket_leaves_the_real_samples_alone(spec, store):
    """bfloat16 networks see their batch padded to :func:`bucket` rows with zero pseudo-samples
    (so oneDNN builds few kernels); the real samples' outputs are those of the unpadded batch."""
    from pipeline.sidenets.precision import bucket, padded

    assert [bucket(r) for r in (1, 16, 17, 100, 420, 1025)] == [16, 16, 32, 112, 448, 1152]
    assert all(r <= bucket(r) <= r * 1.125 for r in range(128, 5000))
    batch, info = first_batch(store, size=5)
    big = padded(batch)
    rows = batch.hidden.shape[0]
    assert big.hidden.shape[0] == bucket(rows) > rows and int(big.lengths.sum()) == bucket(rows)
    assert torch.equal(big.hidden[:rows], batch.hidden) and not big.hidden[rows:].any()
    assert int(big.lengths[5:].max()) <= int(batch.lengths.max())
    model = fresh(spec, info, seed=2).eval()
    assert torch.allclose(model(big)[:5], model(batch), rtol=1e-5, atol=1e-6)


def test_precision_is_checked():
    from pipeline.errors import ConfigError
    from pipeline.online.methods import parse_method

    with pytest.raises(ConfigError, match="one of float32, bfloat16; found 'fp16'"):
        parse_spec("read:precision=fp16")
    with pytest.raises(ConfigError, match="precision applies to the side networks"):
        parse_method("full:precision=bfloat16")
    assert parse_method("read:precision=bfloat16").train.precision == "bfloat16"


def test_loader_is_deterministic_and_streams_like_ram(store):
    reader = open_store(store)
    ram = StoreLoader(reader, 7, shuffle=True, seed=5)
    disk = StoreLoader(reader, 7, shuffle=True, seed=5, ram_budget=0)
    assert ram.in_ram and not disk.in_ram
    for epoch in range(2):
        a, b = list(ram.epoch(epoch)), list(disk.epoch(epoch))
        assert len(a) == len(b) == len(ram)
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x.samples, y.samples) and torch.equal(x.hidden, y.hidden)
    seen = torch.cat([b.samples for b in ram.epoch(0)]).numpy()
    assert np.array_equal(np.sort(seen), np.arange(reader.layout.n_samples))
    other = torch.cat([b.samples for b in ram.epoch(1)]).numpy()
    assert not np.array_equal(seen, other)
    for b in ram.epoch(0):  # a sample's rows stay together
        for i, s in enumerate(b.samples.tolist()):
            a0 = int(b.starts[i])
            rows = b.hidden[a0 : a0 + int(b.lengths[i])]
            assert torch.equal(rows[:, 0], torch.from_numpy(reader.sample(s)[:, 0]))
        break
