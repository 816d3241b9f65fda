"""The one-command GPU device check (benchmarks/gpu_check.py, benchmarks/gpu_check.sh), at toy
size on the CPU: every phase runs and reports its figures under the keys the lead reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks import gpu_check, gpu_targets

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def run_check(out: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--out", str(out), *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def positive(report: dict[str, Any], dotted: str) -> float:
    node: Any = report
    for part in dotted.split("."):
        assert isinstance(node, dict) and part in node, f"{dotted}: no {part!r}"
        node = node[part]
    assert isinstance(node, int | float) and node > 0, f"{dotted} = {node!r}"
    return float(node)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("gpu-check")
    done = run_check(root / "out", "--smoke", "--device", "cpu", "--work", str(root / "work"))
    report = json.loads((root / "out" / "gpu_check.json").read_text())
    # 1: something was flagged; only the GPU tier's own results may be (they are not ours)
    assert done.returncode in (0, 1), done.stdout[-3000:] + done.stderr[-3000:]
    assert all(p.startswith("gpu tests:") for p in report["summary"]["problems"]), report["summary"]
    return report


def test_the_smoke_check_runs_every_phase(smoke):
    assert list(smoke["phases"]) == list(gpu_check.PHASES)
    for name, entry in smoke["phases"].items():
        allowed = ("ok", "skipped") if name == "gpu_tests" else ("ok",)
        assert entry["status"] in allowed, (name, entry)
    assert smoke["device"] == "cpu" and smoke["smoke"] is True
    assert smoke["finished_utc"] is not None
    positive(smoke, "environment.cpu_count")
    assert smoke["environment"]["versions"]["zarr"]


def test_stage_one_reports_throughput_and_the_roofline(smoke):
    for model in ("minilm", "bert"):
        for key in ("tokens_per_s", "roofline_ratio", "ratio", "cores_used"):
            positive(smoke, f"stage_one.{model}.{key}")
        for arm in ("forward", "extract", "stage"):
            positive(smoke, f"stage_one.{model}.{arm}.wall_s")
            positive(smoke, f"stage_one.{model}.{arm}.tokens_per_s")
        positive(smoke, f"stage_one.{model}.write.wall_s")
        positive(smoke, f"stage_one.{model}.stage.store.bytes_on_disk")
        assert smoke["stage_one"][model]["stage"]["same_plan"] is True
    # the MiniLM-shaped and BERT-shaped smoke models differ in shape
    m, b = smoke["stage_one"]["minilm"], smoke["stage_one"]["bert"]
    assert (m["layers"], m["hidden_size"]) != (b["layers"], b["hidden_size"])


def test_stage_two_reports_k8_over_k1_step_time_and_memory(smoke):
    for key in ("k8_over_k1", "ms_per_step", "peak_mb", "ms_per_step_k8", "k8_over_k1_stream"):
        positive(smoke, f"stage_two.{key}")
    runs = smoke["stage_two"]["runs"]
    assert sorted(runs) == ["k1_ram", "k1_stream", "k8_ram", "k8_stream"]
    assert all(len(runs[r]["networks"]) == (8 if r.startswith("k8") else 1) for r in runs)
    assert smoke["stage_two"]["loader"]["ram"]["in_ram"] is True
    assert smoke["stage_two"]["loader"]["stream"]["in_ram"] is False
    positive(smoke, "stage_two.loader.stream.samples_per_s")
    assert smoke["stage_two"]["peak_gpu_mb"] is None  # no GPU here


def test_the_online_phase_reports_cache_plus_10_epochs_over_online(smoke):
    on = smoke["online"]
    for key in ("cache_plus_10ep_over_online", "cached_over_online"):
        positive(smoke, f"online.{key}")
    for arm in ("stage_one", "cached", "online"):
        wall = positive(smoke, f"online.wall_s.{arm}")
        assert wall == on["arms"][arm]["wall_s"]
        positive(smoke, f"online.arms.{arm}.tokens_per_s")
        positive(smoke, f"online.peak_mb.{arm}")  # RSS here; GPU memory on CUDA
    for arm in ("cached", "online"):
        positive(smoke, f"online.dev_accuracy.{arm}")
        assert on["arms"][arm]["epochs"] == on["epochs"] == 10
        assert on["arms"][arm]["final_accuracy"] == on["dev_accuracy"][arm]
    w = on["wall_s"]
    assert on["cache_plus_10ep_over_online"] == (w["stage_one"] + w["cached"]) / w["online"]
    # the same READ, the same samples: equal sizes, the BERT-shaped smoke backbone
    assert on["arms"]["cached"]["trainable_params"] == on["arms"]["online"]["trainable_params"]
    assert on["limit"] == gpu_check.SMOKE.online_limit
    assert on["arms"]["stage_one"]["stores"]["train"]["samples"] == on["limit"]
    assert on["arms"]["stage_one"]["stores"]["train"]["layers"] == 4  # 3 layers + embeddings
    assert on["peak_gpu_mb"] is None  # no GPU here


def test_gpu_targets_reads_the_online_ratio_and_is_null_without_it(smoke):
    found = gpu_targets.figures(smoke)
    ratio = found["stage_two.cache_plus_10ep_over_online"]
    assert ratio == smoke["online"]["cache_plus_10ep_over_online"] > 0
    assert gpu_targets.verdicts(found)["stage_two.cache_plus_10ep_over_online"]["met"] in (
        True,
        False,
    )
    for path in sorted((REPO / "benchmarks" / "results").glob("gpu_check-*.json")):
        found = gpu_targets.figures(json.loads(path.read_text()))  # reports without the phase
        assert found["stage_two.cache_plus_10ep_over_online"] is None, path
        assert "no online phase" in found["stage_two.online.missing"]
        assert gpu_targets.verdicts(found)["stage_two.cache_plus_10ep_over_online"]["met"] is None
    failed = {"phases": {"online": {"status": "timeout", "error": "ran past its 60 s limit"}}}
    assert "timeout" in gpu_targets.figures(failed)["stage_two.online.missing"]


def test_the_online_ratios_from_the_arms():
    d: dict[str, Any] = {"epochs": 10, "arms": {
        "stage_one": {"wall_s": 2.0, "peak_gpu_mb": 900.0},
        "cached": {"wall_s": 3.0, "peak_gpu_mb": 600.0, "final_accuracy": 0.75},
    }}  # fmt: skip
    gpu_check.online_ratios(d)  # the online arm not done (yet): no ratio
    assert "cache_plus_10ep_over_online" not in d and d["wall_s"]["cached"] == 3.0
    d["arms"]["online"] = {"wall_s": 25.0, "peak_gpu_mb": 700.0, "final_accuracy": 0.5}
    gpu_check.online_ratios(d)
    assert (d["cache_plus_10ep_over_online"], d["cached_over_online"]) == (0.2, 0.12)
    assert d["break_even_epochs"] == 2.0 / 2.2 and d["accuracy_gap"] == 0.25
    assert d["peak_gpu_mb"] == {"stage_one": 900.0, "cached": 600.0, "online": 700.0}
    assert d["dev_accuracy"] == {"cached": 0.75, "online": 0.5}
    d["arms"]["online"]["wall_s"] = 2.5  # online faster per epoch: caching never pays off
    gpu_check.online_ratios(d)
    assert d["break_even_epochs"] is None


def test_online_limit_is_a_flag():
    args = gpu_check.parse_args(["--out", "x", "--smoke", "--online-limit", "64"])
    assert gpu_check.make_context(args, Path("/tmp")).sizes.online_limit == 64
    args = gpu_check.parse_args(["--out", "x", "--phases", "online"])
    sizes = gpu_check.make_context(args, Path("/tmp")).sizes
    assert sizes.online_limit == gpu_check.FULL.online_limit
    assert sum(gpu_check.LIMITS_S.values()) <= gpu_check.BUDGET_S


def test_verify_passes_on_the_device_and_on_the_cpu(smoke):
    v = smoke["verify"]
    for where in ("device", "cpu"):
        assert v[where]["passed"] is True, v[where]
        assert v[where]["exact"] is True  # a CPU store recomputed on the same CPU
        errors = v[where]["max_abs_error_vs_float32"]
        assert len(errors) == v["store"]["layers"] and all(e >= 0 for e in errors.values())
    assert v["device"]["checksums"]["damaged"] == []


def test_a_phase_past_its_limit_is_recorded_and_the_next_one_runs(tmp_path):
    done = run_check(tmp_path, "--device", "cpu", "--phases", "environment,verify",
                     "--limit-scale", "0.01", timeout=60)  # fmt: skip
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert done.returncode == 1
    assert [e["status"] for e in report["phases"].values()] == ["timeout", "timeout"]
    assert all("limit" in e["error"] for e in report["phases"].values())
    assert len(report["summary"]["problems"]) == 2


def test_pytest_output_is_counted():
    text = (
        "..F.s\n"
        "FAILED tests/gpu/test_a.py::test_x - AssertionError: boom\n"
        "SKIPPED [1] tests/gpu/test_b.py:3: no CUDA\n"
        "1 failed, 3 passed, 1 skipped, 2 deselected in 4.20s\n"
    )
    got = gpu_check.parse_pytest(text)
    assert (got["passed"], got["failed"], got["skipped"], got["errors"]) == (3, 1, 1, 0)
    assert got["failures"] == ["FAILED tests/gpu/test_a.py::test_x - AssertionError: boom"]
    assert got["skip_reasons"] == ["SKIPPED [1] tests/gpu/test_b.py:3: no CUDA"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "usage:"),
        (["--smoke"], "expected OUT_DIR first"),
        (["-h"], "usage:"),
    ],
)
def test_the_script_refuses_bad_arguments(args, message):
    done = subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2 and message in done.stderr


def test_the_script_runs_from_the_repository_root_only(tmp_path):
    done = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], cwd=tmp_path,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 2 and "repository root" in done.stderr


def test_the_script_logs_and_passes_options_on(tmp_path):
    """Wheels missing (no .whl here is fine), options after OUT_DIR reach the check."""
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, SITE=str(tmp_path / "site"))
    done = subprocess.run(["bash", str(SCRIPT), str(out), "--device", "cpu", "--phases",
                           "environment"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["phases"]["environment"]["status"] == "ok"
    assert "gpu_check on cpu" in (out / "gpu_check.log").read_text()


def test_on_cuda_the_resident_mode_leads_the_stage_two_figures():
    modes = gpu_check.modes_for("cuda")
    assert list(modes) == ["resident", "ram", "stream"]
    assert modes["ram"]["device_budget_mb"] == 0 == modes["stream"]["ram_budget_mb"]
    walls = {"k1_resident": 2.0, "k8_resident": 5.0, "k1_ram": 4.0, "k8_ram": 8.0}
    d: dict[str, Any] = {"modes": modes, "primary_mode": "resident", "runs": {
        name: {"wall_s": w, "ms_per_step": w, "peak_gpu_mb": 10 * w} for name, w in walls.items()
    }}  # fmt: skip
    gpu_check.stage_two_ratios(d)
    assert (d["k8_over_k1"], d["ms_per_step"], d["ms_per_step_k8"]) == (2.5, 2.0, 5.0)
    assert (d["k8_over_k1_ram"], d["ram_over_resident_k1"], d["peak_gpu_mb"]) == (2.0, 2.0, 80)
    assert d["k8_over_k1_stream"] is None and d["peak_mb"] == 80


def test_the_second_model_is_cut_to_the_time_left():
    ctx = gpu_check.Context("cuda", False, "/tmp", "/tmp", "/tmp", gpu_check.FULL)
    first = {"layers": 7, "hidden_size": 384, "samples": 67349, "phase_s": 40.0}
    ctx.deadline = gpu_check.time.time() + 100  # BERT-base: ~3.7x MiniLM's values per token
    assert gpu_check.scaled_limit(ctx, first, "bert") == (24000, "as planned")
    ctx.deadline = gpu_check.time.time() + 40
    limit, why = gpu_check.scaled_limit(ctx, first, "bert")
    assert 2400 <= limit < 24000 and "cut" in why
    ctx.deadline = gpu_check.time.time() + 21
    assert gpu_check.scaled_limit(ctx, first, "bert")[0] == 0
