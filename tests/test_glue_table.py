"""``benchmarks.glue_table`` on synthetic bench folders (metrics written here, nothing trained):
folders of one task joined, the lr chosen per family on validation, the cells exact."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from benchmarks.glue_table import main
from pipeline.bench import BenchConfig
from pipeline.errors import ConfigError


def run(method, seed, dev, valid=None, dev_best=None):
    """A finished run as the bench records it; ``dev``/``dev_best``: score dicts."""
    ev = {"best": dev, "final": dev, "best_epoch": 1, "chosen_on": "eval"}
    payload = {"eval": ev, "trainable_params": 7}
    if valid is not None:
        ev.update(chosen_on="valid", best_on_eval=dev_best, best_on_eval_epoch=2)
        payload["valid"] = {"fraction": 0.25, "best": {"score": valid}, "final": None}
    return {"kind": method.partition(":")[0], "name": f"{method}-s{seed}", "method": method,
            "spec": method.partition(":")[2], "seed": seed, "payload": payload,
            "costs": {"wall_s": 1.0, "cpu_s": 1.0, "peak_rss_bytes": 1e8, "gpu_peak_bytes": None,
                      "gpu_energy_j": None}}  # fmt: skip


def mrpc(acc, f1):
    return {"score": (acc + f1) / 2, "accuracy": acc, "f1": f1, "mcc": 0.0}


def config(task, methods, seeds, valid_fraction):
    cfg = BenchConfig("tiny", f"glue:/data/glue/{task}", "o", methods, seeds=seeds,
                      valid_fraction=valid_fraction, limit=400)  # fmt: skip
    return asdict(cfg)


def write_report(folder, cfg, runs):
    folder.mkdir(parents=True)
    (folder / "bench.json").write_text(json.dumps({"config": cfg, "runs": runs}))


def write_jobs(folder, cfg, runs):
    """A bench still running: job files, and results of the runs that finished."""
    jobs = folder / "jobs"
    jobs.mkdir(parents=True)
    for r in runs:
        job = {**{k: r[k] for k in ("kind", "name", "method", "spec", "seed")}, "config": cfg}
        (jobs / f"{r['name']}.json").write_text(json.dumps(job))
        out = {"payload": r["payload"], "costs": r["costs"]}
        (jobs / f"{r['name']}.out.json").write_text(json.dumps(out))


def write_sweep(folder, task, runs, order=None):
    """A sweep's outputs: ``TASK/seedS/NAME/metrics.json``, and ``sweep.csv`` in ``order``."""
    for r in runs:
        name = r["method"].rpartition("name=")[2]
        out = folder / task / f"seed{r['seed']}" / name
        out.mkdir(parents=True)
        metrics = {**r["payload"], "spec": r["spec"], "epochs": 3, "finished": True}
        (out / "metrics.json").write_text(json.dumps(metrics))
    if order is not None:
        rows = ["task,seed,name,spec", *(f'{task},0,x,"{spec}"' for spec in order)]
        (folder / "sweep.csv").write_text("\n".join(rows) + "\n")


@pytest.fixture
def folders(tmp_path):
    lo, hi = "cached:read:lr=1e-3", "cached:read:lr=3e-3"
    cached = []
    for seed, a in enumerate((0.75, 0.875, 1.0)):
        # lr=3e-3 wins on validation although lr=1e-3 is better on dev
        cached.append(run(lo, seed, mrpc(a, a), valid=0.5, dev_best=mrpc(a, a)))
        b = a - 0.25
        cached.append(run(hi, seed, mrpc(b, b - 0.25), valid=0.75, dev_best=mrpc(a, b)))
    write_report(tmp_path / "mrpc-cached", config("MRPC", [lo, hi], [0, 1, 2], 0.25), cached)
    full = ["online:full:lr=2e-5", "online:full:lr=5e-5"]  # a tie: the first listed wins
    online = [
        run(full[0], 0, mrpc(0.5, 0.25), valid=0.625, dev_best=mrpc(0.625, 0.5)),
        run(full[1], 0, mrpc(0.875, 0.875), valid=0.625, dev_best=mrpc(1.0, 1.0)),
    ]
    write_jobs(tmp_path / "mrpc-online", config("MRPC", full, [0], 0.25), online)
    cola = [run("cached:read", s, {"score": 0.25, "mcc": 0.25}) for s in (0, 1)]
    cola += [run("cached:read:lr=3e-3", s, {"score": 0.5, "mcc": 0.5}) for s in (0, 1)]
    methods = ["cached:read", "cached:read:lr=3e-3"]
    write_report(tmp_path / "cola", config("CoLA", methods, [0, 1], 0.0), cola)
    # a sweep of the same task, and of its stores cached another way (a task named MRPC-sep)
    lin = ["cached:linear:lr=1e-3,name=linear-1e-3", "cached:linear:lr=3e-3,name=linear-3e-3"]
    side = [
        run(m, s, mrpc(0.5, 0.5), valid=0.5, dev_best=mrpc(0.5, 0.5))
        for m in lin
        for s in (0, 1, 2)
    ]
    write_sweep(tmp_path / "side-mrpc", "MRPC", side)
    sep = [run(m.replace("linear", "mlp"), 0, mrpc(a, a), valid=0.5, dev_best=mrpc(a, a))
           for m, a in zip(lin, (0.25, 0.75), strict=True)]  # fmt: skip
    write_sweep(tmp_path / "side-sep", "MRPC-sep", sep, order=[r["spec"] for r in sep][::-1])
    return [tmp_path / "mrpc-cached", tmp_path / "mrpc-online", tmp_path / "cola",
            tmp_path / "side-mrpc", tmp_path / "side-sep"]  # fmt: skip


def test_the_table_chooses_on_validation_and_joins_the_folders_of_a_task(folders, tmp_path):
    out = tmp_path / "glue.md"
    assert main([str(out), *map(str, folders)]) == 0
    lines = out.read_text().splitlines()
    dev_at = lines.index("| method | MRPC acc / F1 | CoLA MCC |")
    assert lines[dev_at + 2 : dev_at + 6] == [
        "| cached:read | 62.50 ± 12.50 / 37.50 ± 12.50 (lr 0.003) | 50.00 ± 0.00 (lr 0.003) † |",
        "| online:full | 50.00 ± – / 25.00 ± – (lr 2e-05, 1 of 3 seeds) | – |",
        "| cached:linear | 50.00 ± 0.00 / 50.00 ± 0.00 (lr 0.001) | – |",  # a tie: name order
        "| cached:mlp (sep) | 75.00 ± – / 75.00 ± – (lr 0.003, 1 of 3 seeds) | – |",  # csv order
    ]
    papers = lines.index("| method | MRPC acc / F1 | CoLA MCC |", dev_at + 1)
    assert lines[papers + 2 : papers + 4] == [
        "| cached:read | 87.50 ± 12.50 / 62.50 ± 12.50 (lr 0.003) | 50.00 ± 0.00 (lr 0.003) † |",
        "| online:full | 62.50 ± – / 50.00 ± – (lr 2e-05, 1 of 3 seeds) | – |",
    ]
    report = json.loads(out.with_suffix(".json").read_text())
    assert list(report["tasks"]) == ["MRPC", "CoLA"]
    settings = report["tasks"]["MRPC"]["settings"]
    assert settings["valid_fraction"] == 0.25 and settings["seeds"] == [0, 1, 2]
    assert settings["limit"] == 400 and len(settings["folders"]) == 4
    cells = {(c["task"], c["family"]): c for c in report["cells"]}
    read = cells["MRPC", "cached:read"]
    assert (read["method"], read["lr_value"], read["chosen_on"]) == ("cached:read:lr=3e-3",
                                                                     3e-3, "valid")  # fmt: skip
    assert read["dev"] == {"accuracy": {"mean": 0.625, "std": 0.125},
                           "f1": {"mean": 0.375, "std": 0.125}}  # fmt: skip
    assert read["valid_score"] == {"mean": 0.75, "std": 0.0}
    assert cells["MRPC", "online:full"]["method"] == "online:full:lr=2e-5"
    cola = cells["CoLA", "cached:read"]
    assert (cola["chosen_on"], cola["lr"]) == ("eval", "3e-3")
    assert cola["dev"] == {"mcc": {"mean": 0.5, "std": 0.0}}


def test_folders_of_one_task_must_hold_out_the_same_share(folders, tmp_path):
    other = tmp_path / "mrpc-other"
    write_report(
        other,
        config("MRPC", ["cached:linear"], [0], 0.1),
        [run("cached:linear", 0, mrpc(0.5, 0.5), valid=0.5, dev_best=mrpc(0.5, 0.5))],
    )
    with pytest.raises(ConfigError, match="valid-fraction"):
        main([str(tmp_path / "t.md"), str(folders[0]), str(other)])


def test_the_oracle_is_the_best_any_configuration_reaches_on_dev(folders, tmp_path):
    # a configuration run on one seed only, better than any mean there: no match for a mean
    # over every seed, but its run counts as a single run
    one = "cached:lst:lr=1e-3,name=lst-1e-3"
    write_sweep(tmp_path / "side-one", "MRPC-long",
                [run(one, 0, mrpc(0.9, 0.9), valid=0.1, dev_best=mrpc(1.0, 1.0))])  # fmt: skip
    out = tmp_path / "glue.md"
    assert main([str(out), *map(str, folders), str(tmp_path / "side-one")]) == 0
    lines = out.read_text().splitlines()
    at = lines.index("| task | mode | best configuration, mean over seeds | best single run |")
    assert lines[at + 2 : at + 5] == [
        # lr 1e-3 and 3e-3 tie at 87.5 on dev's own epoch: the first listed; never the chosen lr
        "| MRPC acc | cached | 87.50 (cached:read, lr 1e-3) | 100.00 (cached:read, lr 1e-3) |",
        # no online configuration ran every seed: the best of those that ran, saying so
        "| MRPC acc | online | 100.00 (online:full, lr 5e-5, 1 of 3 seeds) | "
        "100.00 (online:full, lr 5e-5) |",
        "| CoLA MCC | cached | 50.00 (cached:read, lr 3e-3) | 50.00 (cached:read, lr 3e-3) |",
    ]
    report = json.loads(out.with_suffix(".json").read_text())
    assert [(o["task"], o["mode"]) for o in report["oracle"]] == [
        ("MRPC", "cached"), ("MRPC", "online"), ("CoLA", "cached")]  # fmt: skip


def test_an_earlier_table_fills_the_cells_no_folder_gives(folders, tmp_path):
    first = tmp_path / "first.md"
    assert main([str(first), *map(str, folders)]) == 0
    # re-run MRPC's cached READ only (better now); the rest comes from the first table
    lo = "cached:read:lr=1e-3"
    rerun = [run(lo, s, mrpc(0.9, 0.9), valid=0.9, dev_best=mrpc(0.9, 0.9)) for s in (0, 1, 2)]
    write_report(tmp_path / "mrpc-rerun", config("MRPC", [lo], [0, 1, 2], 0.25), rerun)
    out = tmp_path / "second.md"
    assert main([str(out), str(tmp_path / "mrpc-rerun"), str(first.with_suffix(".json"))]) == 0
    lines = out.read_text().splitlines()
    dev_at = lines.index("| method | MRPC acc / F1 | CoLA MCC |")
    assert lines[dev_at + 2 : dev_at + 4] == [
        "| cached:read | 90.00 ± 0.00 / 90.00 ± 0.00 (lr 0.001) | 50.00 ± 0.00 (lr 0.003) † |",
        "| online:full | 50.00 ± – / 25.00 ± – (lr 2e-05, 1 of 3 seeds) | – |",
    ]
    # a table that kept no figures per candidate (as the oldest did): its rows count in the
    # oracle with their chosen lr's mean, marked ‡
    old = json.loads(first.with_suffix(".json").read_text())
    for joined in old["tasks"].values():
        for entry in joined["chosen"]:
            for cand in entry["candidates"]:
                cand.pop("dev_best_on_eval", None), cand.pop("dev_best_on_eval_max", None)
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert main([str(out), str(tmp_path / "mrpc-rerun"), str(tmp_path / "old.json")]) == 0
    lines = out.read_text().splitlines()
    at = lines.index("| task | mode | best configuration, mean over seeds | best single run |")
    assert lines[at + 2 : at + 5] == [
        "| MRPC acc | cached ‡ | 90.00 (cached:read, lr 1e-3) | ≥ 90.00 (cached:read, lr 1e-3) |",
        "| MRPC acc | online ‡ | 62.50 (online:full, lr 2e-5, 1 of 3 seeds) | – |",
        "| CoLA MCC | cached ‡ | 50.00 (cached:read, lr 3e-3) | – |",
    ]
    other = tmp_path / "mrpc-other"
    write_report(other, config("MRPC", [lo], [0], 0.1), rerun[:1])
    with pytest.raises(ConfigError, match="valid-fraction"):
        main([str(tmp_path / "t.md"), str(other), str(first.with_suffix(".json"))])


def test_a_table_at_each_kinds_default_learning_rate(folders, tmp_path):
    out = tmp_path / "glue.md"
    assert main([str(out), *map(str, folders)]) == 0
    lines = out.read_text().splitlines()
    at = lines.index("At each kind's default learning rate (what `--sidenet KIND` trains with no "
                     "`lr=`), the epoch chosen on validation as above.")  # fmt: skip
    assert lines[at + 4 : at + 8] == [
        # read and linear default to 3e-3, full fine-tuning to 2e-5; CoLA's read runs at 3e-3
        # with or without lr=3e-3: the first listed
        "| cached:read | 62.50 ± 12.50 / 37.50 ± 12.50 (lr 0.003) | 25.00 ± 0.00 (lr 0.003) † |",
        "| online:full | 50.00 ± – / 25.00 ± – (lr 2e-05, 1 of 3 seeds) | – |",
        "| cached:linear | 50.00 ± 0.00 / 50.00 ± 0.00 (lr 0.003) | – |",
        "| cached:mlp (sep) | 75.00 ± – / 75.00 ± – (lr 0.003, 1 of 3 seeds) | – |",
    ]


def test_a_new_sweep_replaces_the_earlier_tables_side_networks_of_its_task(folders, tmp_path):
    first = tmp_path / "first.md"
    assert main([str(first), *map(str, folders)]) == 0
    # MRPC-sep swept again with its MLP named otherwise: the earlier "cached:mlp (sep)" row
    # goes; MRPC's own side networks and every online row stay
    spec = "cached:mlp:pool=mean,lr=3e-3,name=mlp-mean-3e-3"
    again = [run(spec, s, mrpc(0.5, 0.5), valid=0.5, dev_best=mrpc(0.5, 0.5)) for s in (0, 1, 2)]
    write_sweep(tmp_path / "side-sep-again", "MRPC-sep", again)
    out = tmp_path / "second.md"
    assert main([str(out), str(tmp_path / "side-sep-again"), str(first.with_suffix(".json"))]) == 0
    rows = [line.split(" | ")[0][2:] for line in out.read_text().splitlines()]
    dev = rows[rows.index("method") + 2 :]
    assert dev[: dev.index("")] == [
        "cached:mlp:pool=mean (sep)", "cached:read", "online:full", "cached:linear"]  # fmt: skip
