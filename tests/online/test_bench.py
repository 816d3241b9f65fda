"""``sidecache bench`` end to end on a tiny backbone, and the table from synthetic runs."""

from __future__ import annotations

import json

import pytest

from pipeline.bench import BenchConfig, plan_jobs, summarise, to_markdown
from pipeline.errors import ConfigError
from stages.cli import main


@pytest.mark.slow  # five subprocesses, each importing torch and transformers: ~25 s when idle
def test_bench_runs_end_to_end_and_writes_the_table(model_dir, glue_dir, tmp_path):
    out = tmp_path / "bench"
    rc = main(["bench", "--backbone", model_dir("bert"), "--data", f"glue:{glue_dir}",
               "--out", str(out), "--methods", "cached:read:hidden=16,online:full:lr=1e-4",
               "--seeds", "0", "--epochs", "1", "--batch-size", "16", "--limit", "48",
               "--eval-limit", "16", "--max-length", "32", "--device", "cpu"])  # fmt: skip
    assert rc == 0
    report = json.loads((out / "bench.json").read_text())
    rows = {r["method"]: r for r in report["table"]}
    assert set(rows) == {"cached:read:hidden=16", "online:full:lr=1e-4"}
    for r in rows.values():
        assert r["runs"] == 1 and not r["failed"]
        assert 0 <= r["score_final_mean"] <= 1 and r["trainable_params"] > 0
        assert r["wall_s"] > 0 and r["cpu_s"] > 0 and r["peak_mb_above_idle"] > 0
        assert r["gpu_energy_j"] == "unavailable"
    cached = rows["cached:read:hidden=16"]
    assert cached["stage_one_cpu_s"] > 0 and cached["amortised_cpu_s"] > cached["cpu_s"]
    assert rows["online:full:lr=1e-4"]["stage_one_cpu_s"] is None
    assert set(report["ratios"]) == {  # no online READ ran; full fine-tuning with its own lr did
        f"{k} (read:hidden=16)"
        for k in ("cache_plus_read_over_full_ft_cpu", "cache_plus_read_over_full_ft_wall",
                  "peak_cached_read_over_full_ft")
    }  # fmt: skip
    text = (out / "bench.md").read_text()
    assert "| cached:read:hidden=16 | 1 |" in text and "online:full" in text
    assert (out / "bench.csv").read_text().startswith("method,")
    # each job's log shows how far it got: one line per epoch
    log = (out / "jobs" / "online-full-lr=1e-4-s0.log").read_text()
    assert "full epoch 1/1: dev score" in log, log


@pytest.mark.slow  # six subprocesses: ~30 s when idle
def test_bench_holds_out_validation_samples_and_chooses_the_lr_on_them(model_dir, glue_dir,
                                                                        tmp_path):  # fmt: skip
    out = tmp_path / "bench"
    lrs = "cached:read:hidden=16;lr=1e-3,cached:read:hidden=16;lr=3e-2,online:full:lr=1e-4"
    rc = main(["bench", "--backbone", model_dir("bert"), "--data", f"glue:{glue_dir}",
               "--out", str(out), "--methods", lrs, "--seeds", "0", "--epochs", "2",
               "--batch-size", "16", "--limit", "48", "--eval-limit", "16", "--max-length", "32",
               "--device", "cpu", "--valid-fraction", "0.25"])  # fmt: skip
    assert rc == 0
    report = json.loads((out / "bench.json").read_text())
    assert report["config"]["valid_fraction"] == 0.25
    runs = [r for r in report["runs"] if r["kind"] in ("cached", "online")]
    assert len(runs) == 3
    for r in runs:
        ev, held = r["payload"]["eval"], r["payload"]["valid"]
        assert ev["chosen_on"] == "valid" and held["fraction"] == 0.25
        assert ev["best_epoch"] in (1, 2) and ev["best_on_eval_epoch"] in (1, 2)
    online_run = next(r for r in runs if r["kind"] == "online")["payload"]
    held_scores = [h["valid"]["score"] for h in online_run["history"]]
    assert online_run["valid"]["best"]["score"] == max(held_scores)
    assert all(r["chosen_on"] == "valid" for r in report["table"])
    cached, online = report["chosen"]
    assert cached["family"] == "cached:read:hidden=16" and online["family"] == "online:full"
    means = {c["method"]: c["valid_score_mean"] for c in cached["candidates"]}
    assert cached["method"] == max(means, key=means.__getitem__)
    by_method = {r["method"]: r for r in runs}
    chosen_run = by_method[cached["method"]]["payload"]
    assert cached["dev"]["score"]["mean"] == chosen_run["eval"]["best"]["score"]
    assert cached["valid"]["score"]["mean"] == chosen_run["valid"]["best"]["score"]
    assert online["method"] == "online:full:lr=1e-4" and online["chosen_on"] == "valid"
    text = (out / "bench.md").read_text()
    assert "| cached:read:hidden=16 | validation |" in text


def fake_run(kind, method, seed, score, wall, cpu, peak_mb):
    costs = {"wall_s": wall, "cpu_s": cpu, "peak_rss_bytes": peak_mb * 1e6,
             "gpu_peak_bytes": None, "gpu_energy_j": None}  # fmt: skip
    payload = {"eval": {"best": {"score": score + 0.01}, "final": {"score": score}},
               "trainable_params": 10}  # fmt: skip
    return {"kind": kind, "method": method, "seed": seed, "costs": costs, "payload": payload,
            "others_cpu_s": 1.0, "load_before": 1.0, "load_after": 2.0}  # fmt: skip


def test_table_statistics_amortisation_and_ratios():
    methods = ["cached:read", "cached:linear", "online:read", "online:full"]
    cfg = BenchConfig(backbone="b", data="d", out="o", seeds=[0, 1], methods=methods)
    idle = {"kind": "idle", "costs": {"peak_rss_bytes": 100e6}, "load_before": 0.5,
            "load_after": 0.5}  # fmt: skip
    stage_one = {"kind": "cache", "costs": {"wall_s": 40.0, "cpu_s": 80.0, "peak_rss_bytes": 1e9}}
    stage_one.update(load_before=1.0, load_after=1.0)
    runs = [idle, stage_one]
    for seed, score in ((0, 0.8), (1, 0.9)):
        runs += [fake_run("cached", "cached:read", seed, score, 10.0, 20.0, 110),
                 fake_run("cached", "cached:linear", seed, score, 4.0, 8.0, 105),
                 fake_run("online", "online:read", seed, score, 100.0, 200.0, 400),
                 fake_run("online", "online:full", seed, score, 300.0, 600.0, 1100)]  # fmt: skip
    report = summarise(cfg, runs)
    rows = {r["method"]: r for r in report["table"]}
    read = rows["cached:read"]
    assert read["score_final_mean"] == pytest.approx(0.85)
    assert read["score_final_std"] == pytest.approx(0.0707107, rel=1e-5)
    assert read["peak_mb_above_idle"] == pytest.approx(10.0)
    assert report["n_cached_networks"] == 4
    assert read["amortised_cpu_s"] == pytest.approx(20.0 + 80.0 / 4)
    r = report["ratios"]
    assert r["cache_plus_read_over_online_read_wall"] == pytest.approx(50.0 / 100.0)
    assert r["cache_plus_read_over_full_ft_cpu"] == pytest.approx(100.0 / 600.0)
    assert r["peak_cached_read_over_full_ft"] == pytest.approx(10.0 / 1000.0)
    assert "cache_plus_read_over_full_ft_cpu" in to_markdown(report)


def test_ratios_pair_each_cached_read_with_online_read_of_the_same_spec():
    methods = ["cached:read:lr=1e-3", "cached:read:hidden=64", "online:read:lr=1e-3",
               "online:full:lr=1e-5"]  # fmt: skip
    cfg = BenchConfig(backbone="b", data="d", out="o", seeds=[0], methods=methods)
    idle = {"kind": "idle", "costs": {"peak_rss_bytes": 100e6}, "load_before": 0.5,
            "load_after": 0.5}  # fmt: skip
    stage_one = {"kind": "cache", "costs": {"wall_s": 10.0, "cpu_s": 20.0, "peak_rss_bytes": 1e9},
                 "load_before": 1.0, "load_after": 1.0}  # fmt: skip
    runs = [idle, stage_one,
            fake_run("cached", "cached:read:lr=1e-3", 0, 0.8, 30.0, 40.0, 150),
            fake_run("cached", "cached:read:hidden=64", 0, 0.8, 20.0, 20.0, 130),
            fake_run("online", "online:read:lr=1e-3", 0, 0.8, 200.0, 400.0, 500),
            fake_run("online", "online:full:lr=1e-5", 0, 0.9, 700.0, 1400.0, 1700)]  # fmt: skip
    r = summarise(cfg, runs)["ratios"]
    assert r["cache_plus_read_over_online_read_wall (read:lr=1e-3)"] == pytest.approx(40 / 200)
    assert r["peak_cached_read_over_full_ft (read:lr=1e-3)"] == pytest.approx(50 / 1600)
    assert r["cache_plus_read_over_full_ft_cpu (read:hidden=64)"] == pytest.approx(40 / 1400)
    assert "cache_plus_read_over_online_read_wall (read:hidden=64)" not in r  # no online pair


def test_jobs_are_interleaved_and_bad_methods_refused():
    cfg = BenchConfig(backbone="b", data="d", out="o", seeds=[0, 1],
                      methods=["cached:linear", "online:full"])  # fmt: skip
    from pathlib import Path

    names = [j["name"] for j in plan_jobs(cfg, Path("o"))]
    assert names == ["idle-0", "stage-one", "cached-linear-s0", "online-full-s0",
                     "online-full-s1", "cached-linear-s1", "idle-1"]  # fmt: skip
    for bad in ("read", "cached:bogus", "online:linear"):
        with pytest.raises(ConfigError):
            plan_jobs(BenchConfig(backbone="b", data="d", out="o", methods=[bad]), Path("o"))


def test_a_valid_fraction_outside_zero_to_one_is_refused_before_any_job(tmp_path):
    from pipeline.bench import run_bench

    for bad in (-0.1, 1.0):
        cfg = BenchConfig(backbone="b", data="d", out=str(tmp_path), methods=["cached:linear"],
                          valid_fraction=bad)  # fmt: skip
        with pytest.raises(ConfigError, match="--valid-fraction"):
            run_bench(cfg)
    assert not any(tmp_path.iterdir())
