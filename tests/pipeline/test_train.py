"""Stage two end to end: cached == online, single-position stores, outputs, resume, no backbone."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.backbone import load_backbone
from pipeline.data import load_data
from pipeline.errors import ConfigError
from pipeline.extract import forward_rows, make_batch
from pipeline.loader import StoreLoader
from pipeline.optim import AdamW, WarmupDecay, schedule
from pipeline.sidenets import SideBatch, StoreInfo, loss_fn, parse_spec
from pipeline.tokens import tokenize
from pipeline.train import TrainConfig, make_member, run_train, train_step
from storage import open_store
from tests.conftest import small_cache


@pytest.fixture(scope="module")
def stores(model_dir, glue_dir, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("train")
    model = model_dir("bert")
    out = {}
    for split in ("train", "dev"):
        for positions in ("all", "first"):
            path = root / f"{split}-{positions}"
            small_cache(model, f"glue:{glue_dir}", path, split=split, dtype="float32",
                        positions=positions)  # fmt: skip
            out[f"{split}-{positions}"] = str(path)
    out["model"], out["data"] = model, f"glue:{glue_dir}"
    return out


@pytest.mark.parametrize(
    "spec", ["read:dropout=0.1", "lst:dropout=0.1", "read:dropout=0.1,precision=bfloat16"]
)
def test_cached_training_equals_online_training(spec, stores):
    """Same seed, same batches: losses from the float32 store and from the backbone running
    every step (in eval()) agree to float round-off."""
    reader = open_store(stores["train-all"])
    info = StoreInfo.from_meta(reader.meta)
    loader = StoreLoader(reader, 16, shuffle=True, seed=4)
    bb = load_backbone(stores["model"], "cpu")
    tok = tokenize(bb.tokenizer, load_data(stores["data"], "train"), bb.max_length, True)
    cfg = TrainConfig(train="", eval="", specs=[], epochs=1, out="/unused")
    cached = make_member("c", parse_spec(spec), info, 100, cfg, torch.device("cpu"))
    online = make_member("o", parse_spec(spec), info, 100, cfg, torch.device("cpu"))
    losses: dict[str, list[float]] = {"c": [], "o": []}
    for epoch in range(2):
        for batch in loader.epoch(epoch):
            samples = batch.samples.numpy()
            rows = forward_rows(bb, make_batch(tok, samples, bb.device), list(info.layers), "all")
            live = SideBatch(torch.stack(rows, 1), batch.lengths, batch.labels, batch.samples)
            for m, b in ((cached, batch), (online, live)):
                with torch.no_grad():
                    m.model.train()
                    torch.set_rng_state(m.rng[0])
                    losses[m.name].append(float(loss_fn(info, m.model(b), b.labels)))
                train_step(m, b, info)
    c, o = np.array(losses["c"]), np.array(losses["o"])
    assert len(c) > 10
    assert np.all(np.abs(c - o) <= 1e-6 * np.abs(c) + 1e-7), np.abs(c - o).max()


def test_read_trains_identically_from_a_first_position_store(stores, tmp_path):
    spec = "read:pool=first,hidden=16"
    runs = {}
    for positions in ("all", "first"):
        runs[positions] = run_train(TrainConfig(
            train=stores[f"train-{positions}"], eval=stores[f"dev-{positions}"], specs=[spec],
            epochs=2, out=str(tmp_path / positions), batch_size=16, progress=False,
        ))["read"]  # fmt: skip
    assert runs["all"]["eval"] == runs["first"]["eval"]
    assert runs["all"]["train_loss"] == runs["first"]["train_loss"]


def test_many_per_pass_outputs_and_independence(stores, tmp_path):
    specs = ["read:hidden=16", "lst:r=4", "linear", "mlp:hidden=32,lr=3e-3,patience=1"]
    base = dict(train=stores["train-all"], eval=stores["dev-all"], epochs=3, batch_size=16,
                progress=False)  # fmt: skip
    many = run_train(TrainConfig(specs=specs, out=str(tmp_path / "many"), **base))
    assert set(many) == {"read", "lst", "linear", "mlp"}
    for name, result in many.items():
        folder = tmp_path / "many" / name
        assert {"best.pt", "last.pt", "metrics.json", "history.csv"} <= {
            p.name for p in folder.iterdir()
        }
        saved = json.loads((folder / "metrics.json").read_text())
        assert saved["finished"] and saved["eval"]["chosen_on"] == "eval"
        assert set(saved["eval"]) == {"best", "final", "best_epoch", "chosen_on"}
        assert 0.0 <= saved["eval"]["best"]["accuracy"] <= 1.0 and saved["trainable_params"] > 0
        ckpt = torch.load(folder / "best.pt", weights_only=False)
        assert ckpt["store_identity"] == open_store(stores["train-all"]).identity
        assert result["eval"]["best"] == saved["eval"]["best"]
    alone = run_train(TrainConfig(specs=["lst:r=4"], out=str(tmp_path / "alone"), **base))
    assert alone["lst"]["eval"] == many["lst"]["eval"]  # others in the pass change nothing


def test_low_memory_and_streaming_train_identically(stores, tmp_path):
    """--low-memory (one prefetched batch, glibc mmap threshold fixed) and a streamed store give
    the same results as the in-RAM default."""
    base = dict(train=stores["train-all"], eval=stores["dev-all"], specs=["read:hidden=16"],
                epochs=2, batch_size=16, progress=False)  # fmt: skip
    ram = run_train(TrainConfig(out=str(tmp_path / "ram"), **base))["read"]
    lean = run_train(TrainConfig(out=str(tmp_path / "lean"), ram_budget_mb=0, low_memory=True,
                                 **base))["read"]  # fmt: skip
    assert lean["eval"] == ram["eval"] and lean["train_loss"] == ram["train_loss"]
    # --low-memory evaluates in batches of about a training batch's rows (recorded, so
    # evaluate/predict follow)
    sizes = {k: torch.load(tmp_path / k / "read" / "best.pt", weights_only=False)["eval_batch_size"]
             for k in ("ram", "lean")}  # fmt: skip
    train, dev = open_store(stores["train-all"]).layout, open_store(stores["dev-all"]).layout
    per_train, per_dev = train.n_rows / train.n_samples, dev.n_rows / dev.n_samples
    assert sizes == {"ram": 64, "lean": max(1, min(16, round(16 * per_train / per_dev)))}
    # streaming loaders report what they held; in RAM there is nothing to report
    assert ram["loader_memory"] == []
    held = {x["loader"]: x for x in lean["loader_memory"]}
    assert set(held) == {"train", "eval"}
    assert all(0 < x["held_peak"] <= x["held_bound"] for x in held.values())


def test_low_memory_eval_batches_match_training_rows(stores):
    """Longer evaluation samples get proportionally fewer per batch; shorter ones never more
    than a training batch; outside --low-memory the batch is at least 64."""
    from pipeline.train import eval_batch_size

    one, every = open_store(stores["train-first"]), open_store(stores["train-all"])  # 1 vs n rows
    rows = every.layout.n_rows / every.layout.n_samples
    assert rows > 4  # every sample has several tokens, so the two stores differ
    cfg = TrainConfig(train="", eval="", specs=["read"], epochs=1, out="", batch_size=32,
                      low_memory=True)  # fmt: skip
    assert eval_batch_size(cfg, one, every) == max(1, round(32 / rows))
    assert eval_batch_size(cfg, every, one) == 32
    assert eval_batch_size(cfg, every, every) == 32
    assert eval_batch_size(dataclasses.replace(cfg, low_memory=False), one, every) == 64


def test_split_batches_cover_the_batch_in_whole_samples_within_the_row_budget():
    lengths = torch.tensor([3, 9, 1, 1, 4, 2, 6])
    rows = torch.arange(int(lengths.sum()) * 2, dtype=torch.float32).reshape(-1, 1, 2)
    batch = SideBatch(rows, lengths, torch.arange(7) % 2, torch.arange(10, 17))
    assert batch.split(0) == [batch] and batch.split(26) == [batch]
    parts = batch.split(5)
    assert [p.lengths.tolist() for p in parts] == [[3], [9], [1, 1], [4], [2], [6]]
    assert torch.equal(torch.cat([p.hidden for p in parts]), rows)
    assert torch.equal(torch.cat([p.samples for p in parts]), batch.samples)
    assert torch.equal(torch.cat([p.labels for p in parts]), batch.labels)
    assert all(p.hidden.data_ptr() >= rows.data_ptr() for p in parts)  # views, not copies


@pytest.mark.parametrize("spec", ["read:hidden=16,dropout=0", "lst:r=4,dropout=0"])
def test_micro_batches_give_the_whole_batch_gradients(spec, stores):
    """Forward and backward in groups of at most N rows, gradients added up: each step's
    gradients and loss are the whole batch's, to float round-off. (Parameters are not compared
    after several steps: AdamW turns the round-off in a gradient that is zero in exact arithmetic,
    like a key bias under softmax, into a full-size step.)"""
    reader = open_store(stores["train-all"])
    info = StoreInfo.from_meta(reader.meta)
    cfg = TrainConfig(train="", eval="", specs=[], epochs=1, out="/unused")
    whole = make_member("w", parse_spec(spec), info, 100, cfg, torch.device("cpu"))
    micro = make_member("m", parse_spec(spec), info, 100, dataclasses.replace(cfg, micro_rows=40),
                        torch.device("cpu"))  # fmt: skip
    batches = list(StoreLoader(reader, 16, shuffle=True, seed=1).epoch(0))[:4]
    assert all(len(b.split(40)) > 1 for b in batches)  # every step is really split
    for b in batches:
        micro.model.load_state_dict(whole.model.state_dict())  # the same point for both
        before = (whole.loss_sum, micro.loss_sum)
        train_step(whole, b, info)
        train_step(micro, b, info)
        loss_w, loss_m = whole.loss_sum - before[0], micro.loss_sum - before[1]
        assert abs(loss_w - loss_m) <= 1e-5 * abs(loss_w)
        pairs = zip(whole.model.parameters(), micro.model.parameters(), strict=True)
        grads = [(p.grad, q.grad) for p, q in pairs]
        scale = max(float(g.abs().max()) for g, _ in grads if g is not None)
        assert scale > 0
        for g, h in grads:
            assert (g is None) == (h is None)
            if g is not None:
                torch.testing.assert_close(h, g, rtol=1e-4, atol=1e-6 * scale)
    assert whole.loss_count == micro.loss_count == sum(len(b.lengths) for b in batches)


def test_micro_rows_runs_end_to_end_and_a_budget_above_every_batch_changes_nothing(
    stores, tmp_path
):
    base = dict(train=stores["train-all"], eval=stores["dev-all"], specs=["read:hidden=16"],
                epochs=2, batch_size=16, progress=False)  # fmt: skip
    whole = run_train(TrainConfig(out=str(tmp_path / "whole"), **base))["read"]
    roomy = run_train(TrainConfig(out=str(tmp_path / "roomy"), micro_rows=10**6, **base))["read"]
    assert roomy["eval"] == whole["eval"] and roomy["train_loss"] == whole["train_loss"]
    assert roomy["micro_rows"] == 10**6 and whole["micro_rows"] == 0
    split = run_train(TrainConfig(out=str(tmp_path / "split"), micro_rows=24, low_memory=True,
                                  ram_budget_mb=0, **base))["read"]  # fmt: skip
    assert split["finished"] and split["epochs"] == 2
    assert split["train_loss"] == pytest.approx(whole["train_loss"], rel=0.05)
    # evaluation keeps whole batches, so re-evaluating the checkpoint reproduces the record
    from pipeline.evaluate import evaluate_run

    again = evaluate_run(tmp_path / "split" / "read", stores["dev-all"])
    assert again == split["eval"]["best"]


def test_training_resumes_after_an_interruption(stores, tmp_path, monkeypatch):
    import pipeline.train as train_mod

    base = dict(train=stores["train-all"], eval=stores["dev-all"],
                specs=["read:hidden=16", "linear"], batch_size=16, progress=False)  # fmt: skip
    full = run_train(TrainConfig(epochs=3, out=str(tmp_path / "full"), **base))
    real, calls = train_mod.evaluate, {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "evaluate", dying)
    with pytest.raises(KeyboardInterrupt):
        run_train(TrainConfig(epochs=3, out=str(tmp_path / "cut"), **base))
    monkeypatch.setattr(train_mod, "evaluate", real)
    resumed = run_train(TrainConfig(epochs=3, out=str(tmp_path / "cut"), **base))
    for name in full:
        assert resumed[name]["eval"] == full[name]["eval"]
        assert resumed[name]["train_loss"] == full[name]["train_loss"]


def test_lean_adamw_is_bit_identical_to_torch_adamw():
    """Stage two's AdamW + warmup/decay equals torch.optim.AdamW + LambdaLR exactly, including
    parameters that get no gradient and a frozen one, and after a state_dict round trip."""
    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))
            for _ in range(2)]  # fmt: skip
    nets[1].load_state_dict(nets[0].state_dict())
    for net in nets:
        net[0].bias.requires_grad_(False)
    theirs = torch.optim.AdamW(nets[0].parameters(), lr=3e-3, weight_decay=0.05)
    their_sched = torch.optim.lr_scheduler.LambdaLR(theirs, schedule(30, 0.1))
    ours = AdamW(nets[1].parameters(), lr=3e-3, weight_decay=0.05)
    our_sched = WarmupDecay(ours, schedule(30, 0.1))
    for step in range(30):
        x, y = torch.randn(16, 12), torch.randint(0, 3, (16,))
        for net, opt, sched in ((nets[0], theirs, their_sched), (nets[1], ours, our_sched)):
            opt.zero_grad(set_to_none=True)
            out = net(x) if step % 7 else net[2](net[1](torch.zeros(16, 8)))  # net[0] idle
            torch.nn.functional.cross_entropy(out, y).backward()
            opt.step()
            sched.step()
        if step == 15:  # resume from saved states
            state, sched_state = ours.state_dict(), our_sched.state_dict()
            ours = AdamW(nets[1].parameters(), lr=3e-3, weight_decay=0.05)
            our_sched = WarmupDecay(ours, schedule(30, 0.1))
            ours.load_state_dict(state)
            our_sched.load_state_dict(sched_state)
        assert ours.lr == theirs.param_groups[0]["lr"]
        for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
            assert torch.equal(a, b), step


def test_stage_two_never_imports_transformers(stores, tmp_path):
    code = (
        "import sys\nfrom stages.cli import main\n"
        f"rc = main(['train', '--train', {stores['train-first']!r},"
        f" '--eval', {stores['dev-first']!r},"
        f" '--sidenet', 'read:pool=first', '--sidenet', 'linear:pool=first', '--epochs', '1',"
        f" '--out', {str(tmp_path / 'o')!r}, '--no-progress'])\n"
        "assert rc == 0, rc\n"
        "heavy = ('transformers', 'datasets', 'sympy', 'scipy', 'sklearn')\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in heavy)\n"
        "bad += [m for m in ('torch._dynamo', 'torch._inductor') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[2],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]


def test_regression_task_trains_with_mse_and_reports_correlations(model_dir, tmp_path):
    from tests.conftest import sentences

    for split, seed in (("train", 1), ("dev", 2)):
        rows = sentences(80, seed)
        text = "".join(f"{t},{len(t.split()) / 5:.2f}\n" for t, _ in rows)  # target: length
        (tmp_path / f"{split}.csv").write_text("sentence,score\n" + text)
        small_cache(model_dir("bert"), f"csv:{tmp_path}", tmp_path / f"s-{split}", split=split)
    result = run_train(TrainConfig(
        train=str(tmp_path / "s-train"), eval=str(tmp_path / "s-dev"),
        specs=["read:hidden=16,pool=mean,lr=3e-3", "linear:pool=mean,lr=1e-2"], epochs=6,
        out=str(tmp_path / "o"), batch_size=16, progress=False,
    ))  # fmt: skip
    for name in ("read", "linear"):
        best = result[name]["eval"]["best"]
        assert set(best) == {"pearson", "spearman", "score"}
    assert result["read"]["eval"]["best"]["pearson"] > 0.3  # it learns; random would be near 0


def test_adamw_foreach_path_equals_the_tensor_by_tensor_path():
    """What a GPU runs (one foreach kernel per operation) is the CPU's arithmetic: same bits."""
    torch.manual_seed(0)
    ones = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    fused = [torch.nn.Parameter(p.detach().clone()) for p in ones]
    a, b = AdamW(ones, lr=1e-2), AdamW(fused, lr=1e-2)
    for _ in range(5):
        grads = [torch.randn_like(p) for p in ones]
        for p, q, g in zip(ones, fused, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        for i in (0, 1):  # what step() does before choosing the path
            b.steps[i] += 1.0
            if b.moments[i] is None:
                b.moments[i] = (torch.zeros_like(fused[i]), torch.zeros_like(fused[i]))
        with torch.no_grad():
            b._step_foreach([0, 1])
    assert all(torch.equal(p, q) for p, q in zip(ones, fused, strict=True))


def test_a_run_trained_under_another_default_resumes_only_when_the_spec_says_it(stores, tmp_path):
    """A run folder whose spec ("linear") trained at an older default learning rate is refused
    on resume, naming the key; the spec spelling that default out resumes it."""
    base = dict(train=stores["train-all"], eval=stores["dev-all"], batch_size=16, progress=False,
                out=str(tmp_path))  # fmt: skip
    run_train(TrainConfig(specs=["linear"], epochs=1, **base))
    last = tmp_path / "linear" / "last.pt"
    state = torch.load(last, weights_only=False)
    state["train_settings"]["lr"] = 1e-3  # as the release before lr=3e-3 recorded it
    state["optim"]["lr"] /= 3  # the scheduled lr at the end of epoch 1
    torch.save(state, last)
    with pytest.raises(ConfigError, match=r"trained with lr=0\.001 .* now means lr=0\.003"):
        run_train(TrainConfig(specs=["linear"], epochs=2, **base))
    resumed = run_train(TrainConfig(specs=["linear:lr=0.001,name=linear"], epochs=2, **base))
    assert resumed["linear"]["epochs"] == 2 and resumed["linear"]["finished"]
    with pytest.raises(
        ConfigError, match=re.escape("holds a run of 'linear:lr=0.001,name=linear'")
    ):
        run_train(TrainConfig(specs=["linear:lr=0.01,name=linear"], epochs=3, **base))
