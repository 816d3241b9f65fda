"""The bench's learning-rate choice: per family of methods that differ only in ``lr=``, the lr with
the best mean held-out validation score; dev reported there. Synthetic runs, no training."""

from __future__ import annotations

from pipeline.bench import BenchConfig, choose, lr_family, summarise, to_markdown


def fake(method, seed, dev, valid=None, dev_best=None, params=10):
    """A finished bench run of ``method`` as the runner records it (``payload``: metrics.json)."""
    kind = method.partition(":")[0]
    ev = {"best": {"score": dev, "accuracy": dev, "f1": dev / 2}, "final": {"score": dev - 0.125},
          "best_epoch": 2, "chosen_on": "eval"}  # fmt: skip
    payload = {"eval": ev, "trainable_params": params}
    if valid is not None:
        ev.update(chosen_on="valid", best_on_eval={"score": dev_best, "accuracy": dev_best},
                  best_on_eval_epoch=3)  # fmt: skip
        payload["valid"] = {"fraction": 0.25, "best": {"score": valid}, "final": {"score": 0.0}}
    costs = {"wall_s": 1.0, "cpu_s": 1.0, "peak_rss_bytes": 2e8, "gpu_peak_bytes": None,
             "gpu_energy_j": None}  # fmt: skip
    return {"kind": kind, "method": method, "seed": seed, "payload": payload, "costs": costs,
            "others_cpu_s": 0.0, "load_before": 0.0, "load_after": 0.0}  # fmt: skip


A, B = "cached:read:hidden=16,lr=1e-3", "cached:read:hidden=16,lr=3e-3"


def three_seeds():
    # lr=3e-3 wins on validation (mean 0.75 > 0.5) although lr=1e-3 is better on dev
    runs = []
    for seed, dev_a, dev_b in ((0, 0.875, 0.5), (1, 0.875, 0.625), (2, 0.875, 0.75)):
        runs.append(fake(A, seed, dev_a, valid=0.5, dev_best=1.0))
        runs.append(fake(B, seed, dev_b, valid=0.75, dev_best=dev_b + 0.25, params=12))
    return runs


def test_families_are_the_methods_but_their_lr():
    assert lr_family(A) == ("cached:read:hidden=16", "1e-3")
    assert lr_family("cached:read:lr=1e-3;hidden=16") == ("cached:read:hidden=16", "1e-3")
    assert lr_family("online:full") == ("online:full", None)
    assert lr_family("online:full:lr=2e-5") == ("online:full", "2e-5")


def test_the_lr_is_chosen_on_validation_and_dev_reported_there():
    [entry] = choose([A, B], three_seeds())
    assert entry["family"] == "cached:read:hidden=16" and entry["chosen_on"] == "valid"
    assert (entry["method"], entry["lr"], entry["lr_value"]) == (B, "3e-3", 3e-3)
    assert [c["valid_score_mean"] for c in entry["candidates"]] == [0.5, 0.75]
    assert entry["valid"]["score"] == {"mean": 0.75, "std": 0.0}
    assert entry["dev"]["score"] == {"mean": 0.625, "std": 0.125}  # exact in binary
    assert entry["dev"]["f1"] == {"mean": 0.3125, "std": 0.0625}
    assert entry["dev_best_on_eval"]["score"] == {"mean": 0.875, "std": 0.125}
    assert entry["runs"] == 3 and entry["seeds"] == [0, 1, 2] and entry["trainable_params"] == 12
    assert entry["best_epoch"] == [2, 2, 2] and entry["best_on_eval_epoch"] == [3, 3, 3]
    assert entry["valid_fraction"] == 0.25


def test_ties_go_to_the_first_listed_and_the_default_lr_is_a_member():
    runs = [fake("online:full", 0, 0.5, valid=0.75, dev_best=0.5),
            fake("online:full:lr=5e-5", 0, 0.875, valid=0.75, dev_best=0.875)]  # fmt: skip
    [entry] = choose(["online:full", "online:full:lr=5e-5"], runs)
    assert (entry["method"], entry["lr"], entry["lr_value"]) == ("online:full", "default", 2e-5)
    assert entry["dev"]["score"] == {"mean": 0.5, "std": None}  # one seed: no deviation
    [entry] = choose(["online:full:lr=5e-5", "online:full"], runs)
    assert entry["method"] == "online:full:lr=5e-5"


def test_without_held_out_samples_the_choice_is_on_dev_and_says_so():
    runs = [fake(A, 0, 0.875), fake(B, 0, 0.5)]
    [entry] = choose([A, B], runs)
    assert (entry["chosen_on"], entry["method"], entry["valid"]) == ("eval", A, None)
    assert entry["dev_best_on_eval"]["score"] == {"mean": 0.875, "std": None}
    assert "dev (optimistic)" in to_markdown(summarise(BenchConfig("b", "d", "o", [A, B]), runs))


def test_a_family_without_finished_runs_has_no_choice():
    failed = {"kind": "cached", "method": A, "seed": 0, "load_before": 0.0, "load_after": 0.0}
    entries = choose([A, "cached:linear"], [failed, fake("cached:linear", 0, 0.5, valid=0.5,
                                                         dev_best=0.5)])  # fmt: skip
    assert [e["method"] for e in entries] == [None, "cached:linear"]
    assert entries[0]["candidates"] == []


def test_the_report_carries_the_choice_and_the_validation_columns():
    cfg = BenchConfig("b", "d", "o", [A, B], seeds=[0, 1, 2], valid_fraction=0.25)
    report = summarise(cfg, three_seeds())
    assert report["config"]["valid_fraction"] == 0.25
    assert report["chosen"][0]["method"] == B
    rows = {r["method"]: r for r in report["table"]}
    assert rows[B]["chosen_on"] == "valid" and rows[B]["valid_best_mean"] == 0.75
    assert rows[B]["score_best_mean"] == 0.625 and rows[B]["score_best_std"] == 0.125
    assert rows[A]["score_best_on_eval_mean"] == 1.0
    text = to_markdown(report)
    assert "0.25 of it held out for validation" in text
    assert "| dev score, epoch chosen on validation (mean ± std) |" in text
    assert (
        "| cached:read:hidden=16 | validation | 3e-3 (0.003) | 1e-3: 0.5000, 3e-3: 0.7500 | 3 "
        "| 0.7500 ± 0.0000 | 0.6250 ± 0.1250 | accuracy 0.6250 ± 0.1250, f1 0.3125 ± 0.0625 "
        "| 0.8750 ± 0.1250 | 12 |"
    ) in text
