"""``dvc repro`` for real on the repository's own dvc.yaml: a tiny backbone, a tiny GLUE task.

The project is a temporary copy (dvc.yaml, the code it lists as dependencies, a params.yaml
pointing at a config-built backbone and a GLUE-layout STS-B folder); DVC runs the real
``sidecache stage ...`` commands. Checked: metrics per (task, side network), nothing re-runs
when nothing changed, and a stage-two parameter re-runs stage two only, never the backbone.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import WORDS

REPO = Path(__file__).resolve().parents[2]
DVC = Path(sys.executable).with_name("dvc")

pytestmark = pytest.mark.skipif(not DVC.is_file(), reason="dvc is not installed in this venv")


def write_glue_stsb(root: Path) -> None:
    """A GLUE-layout STS-B folder: 10 tab-separated columns, similarity score in the last."""
    folder = root / "STS-B"
    folder.mkdir(parents=True)
    rng = random.Random(0)
    head = "index genre filename year old_index source1 source2 sentence1 sentence2 score"
    for split, n in (("train", 64), ("dev", 24)):
        lines = [head.replace(" ", "\t")]
        for i in range(n):
            a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12)))
            b = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12)))
            score = 5 * len(set(a.split()) & set(b.split())) / len(set(a.split()) | set(b.split()))
            lines.append("\t".join([str(i), "g", "f", "y", "0", "s", "s", a, b, f"{score:.3f}"]))
        (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n")


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{cmd} failed:\n{res.stdout}\n{res.stderr}"
    return res.stdout + res.stderr


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.fixture()
def project(tmp_path: Path, model_dir) -> tuple[Path, dict[str, str]]:  # type: ignore[no-untyped-def]
    proj = tmp_path / "proj"
    proj.mkdir()
    shutil.copy(REPO / "dvc.yaml", proj)
    shutil.copy(REPO / ".dvcignore", proj)
    for pkg in ("pipeline", "stages", "storage"):
        shutil.copytree(REPO / pkg, proj / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    write_glue_stsb(tmp_path / "glue")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params.update(tasks=["stsb"], glue_dir=str(tmp_path / "glue"), datasets={})
    params["cache"].update(backbone=model_dir("bert"), max_length=32, device="cpu")
    params["train"].update(
        sidenets={"read": "read:hidden=8", "linear": "linear"},
        epochs=2,
        batch_size=16,
        device="cpu",
    )
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(os.environ)
    env.update(
        PATH=f"{DVC.parent}{os.pathsep}{env.get('PATH', '')}",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        DVC_NO_ANALYTICS="1",
        SIDECACHE_LOG="WARNING",
    )
    run([str(DVC), "init", "--no-scm", "-q"], proj, env)
    return proj, env


def test_dvc_repro_end_to_end(project: tuple[Path, dict[str, str]]) -> None:
    proj, env = project
    dvc = str(DVC)

    first = run([dvc, "repro"], proj, env)
    assert ran(first) == {
        "cache@stsb-train",
        "cache@stsb-dev",
        "train@stsb",
        "evaluate@stsb-read",
        "evaluate@stsb-linear",
        "report",
    }
    for split in ("train", "dev"):
        manifest = json.loads((proj / "stores" / f"stsb-{split}.json").read_text())
        assert manifest["task"]["type"] == "regression"
        assert manifest["layout"]["positions"] == "all"
    shown = json.loads(run([dvc, "metrics", "show", "--json"], proj, env))
    files = next(iter(shown.values()))["data"]
    rows = {v["data"]["sidenet"]: v["data"] for v in files.values()}
    assert set(rows) == {"read", "linear"}
    for row in rows.values():
        assert row["task"] == "stsb" and row["epochs"] == 2
        assert -1.0 <= row["pearson"] <= 1.0 and -1.0 <= row["spearman"] <= 1.0
        recorded = json.loads(
            (proj / "outputs" / "stsb" / row["sidenet"] / "metrics.json").read_text()
        )
        # the evaluate stage re-ran the best checkpoint and got what training recorded
        assert row["score"] == pytest.approx(recorded["eval"]["best"]["score"], abs=1e-6)
        assert row["trainable_params"] == recorded["trainable_params"] > 0
    page = (proj / "results" / "report" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "stsb" in page
    with (proj / "results" / "cost.csv").open() as f:
        assert {r["run"] for r in csv.DictReader(f)} == {"stsb/read", "stsb/linear"}

    run([dvc, "plots", "show", "-o", "dvc_plots"], proj, env)
    plots = (proj / "dvc_plots" / "index.html").read_text()
    for title in ("learning curve", "quality vs trainable parameters", "quality vs peak memory"):
        assert title in plots

    again = run([dvc, "repro"], proj, env)
    assert ran(again) == set(), again
    assert "cache@stsb-train" not in run([dvc, "status"], proj, env)

    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["train"]["sidenets"]["read"] = "read:hidden=12"
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = run([dvc, "repro"], proj, env)
    assert "train@stsb" in ran(third)
    assert not {s for s in ran(third) if s.startswith("cache@")}, third
    checkpoint = proj / "outputs" / "stsb" / "read" / "metrics.json"
    assert json.loads(checkpoint.read_text())["spec"] == "read:hidden=12,name=read"
