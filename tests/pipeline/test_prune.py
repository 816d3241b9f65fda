"""LST's pruned-backbone initialisation: computed in stage one, loaded in stage two."""

from __future__ import annotations

import pytest
import torch

from pipeline.backbone import hidden_states, load_backbone
from pipeline.sidenets import StoreInfo, build, init_from_store, parse_spec
from pipeline.sidenets.lst import Lst
from storage import StoreMismatchError, open_store
from tests.conftest import _save, small_cache


@pytest.fixture(scope="module")
def wide_ff_bert(tmp_path_factory) -> str:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=64)  # fmt: skip
    return _save(BertModel(cfg), tmp_path_factory.mktemp("wide"))


def test_r1_keeps_every_weight_and_r2_keeps_sub_blocks(wide_ff_bert, glue_dir, tmp_path):
    bb = load_backbone(wide_ff_bert, "cpu")
    for r in (1, 2):
        out = tmp_path / f"r{r}"
        small_cache(wide_ff_bert, f"glue:{glue_dir}", out, lst_prune=r)
        store = open_store(out)
        keep = store.extra(f"lst_init/r{r}/hidden_index")
        assert len(keep) == 32 // r
        for i, block in enumerate(bb.blocks, start=1):
            q = block.attention.self.query.weight.detach().numpy()
            qkv = store.extra(f"lst_init/r{r}/block{i}/qkv_weight")
            assert qkv.shape == (3 * 32 // r, 32 // r)
            if r == 1:
                assert (keep == range(32)).all()
                assert (qkv[:32] == q).all()
            else:
                assert set(qkv[:16].ravel().tolist()) <= set(q.ravel().tolist())


def test_lst_starts_from_the_stored_pruned_blocks(wide_ff_bert, glue_dir, tmp_path):
    out = tmp_path / "s"
    small_cache(wide_ff_bert, f"glue:{glue_dir}", out, lst_prune=2)
    store = open_store(out)
    info = StoreInfo.from_meta(store.meta)
    model = build(parse_spec("lst:r=2,init=pruned"), info)
    assert isinstance(model, Lst)
    init_from_store(model, store.extra)
    for block, layer in zip(model.blocks, (1, 2), strict=True):
        want = store.extra(f"lst_init/r2/block{layer}/ff2_weight")
        assert torch.equal(block.ff[2].weight, torch.from_numpy(want))
    keep = store.extra("lst_init/r2/hidden_index")
    assert torch.equal(model.down_in.weight.argmax(1), torch.from_numpy(keep))
    with pytest.raises(StoreMismatchError, match="--lst-prune 4"):
        init_from_store(build(parse_spec("lst:r=4,init=pruned"), info), store.extra)
    # the caller reads the arrays: without a store to read them from, a pruned init is refused
    with pytest.raises(StoreMismatchError, match="train it from a store"):
        init_from_store(build(parse_spec("lst:r=2,init=pruned"), info), None)
    # building alone (evaluate, predict: a checkpoint supplies the weights) needs no store
    build(parse_spec("lst:r=2,init=pruned"), info)


def test_at_r1_a_pruned_side_block_is_the_backbones_block(wide_ff_bert, glue_dir, tmp_path):
    """Nothing pruned: side block i, fed hidden state i - 1, gives hidden state i (post-LN,
    the backbone's LayerNorms and attention scale), up to float rounding."""
    out = tmp_path / "r1"
    small_cache(wide_ff_bert, f"glue:{glue_dir}", out, lst_prune=1, dtype="float32")
    store = open_store(out)
    model = build(parse_spec("lst:r=1,init=pruned,dropout=0"), StoreInfo.from_meta(store.meta))
    init_from_store(model, store.extra)
    model.eval()
    bb = load_backbone(wide_ff_bert, "cpu")
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102], [101, 7592, 102, 0, 0, 0]])
    mask = ids != 0
    hs = hidden_states(bb, ids, mask.long(), None, [0, 1, 2])
    for i, block in enumerate(model.blocks, start=1):
        with torch.no_grad():
            got = block(hs[i - 1].clone(), mask, False)
        assert torch.allclose(got[mask], hs[i][mask], atol=1e-5), i


def test_a_store_without_the_layer_norms_is_refused_with_the_fix(wide_ff_bert, glue_dir,
                                                                  tmp_path):  # fmt: skip
    out = tmp_path / "s"
    small_cache(wide_ff_bert, f"glue:{glue_dir}", out, lst_prune=2)
    store = open_store(out)

    def older(name: str):  # a store cached before the LayerNorms were stored
        if "/ln" in name:
            return store.extra(name.replace("ln1", "nope"))
        return store.extra(name)

    model = build(parse_spec("lst:r=2,init=pruned"), StoreInfo.from_meta(store.meta))
    with pytest.raises(StoreMismatchError, match="--overwrite"):
        init_from_store(model, older)
