"""``verify`` of stores written on the device: exact on the device that wrote them, within the
tolerance from the CPU, and per-layer maximum errors in the report either way."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.verify import run_verify
from storage import open_store
from tests.conftest import small_cache

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def written(device, model_dir, glue_dir, tmp_path_factory) -> dict[str, str]:
    """A float32 and a bfloat16 store of the tiny BERT, written on the device."""
    root = tmp_path_factory.mktemp("verify")
    out = {}
    for dtype in ("float32", "bfloat16"):
        small_cache(model_dir("bert"), f"glue:{glue_dir}", root / dtype, device=device,
                    dtype=dtype)  # fmt: skip
        out[dtype] = str(root / dtype)
    return out


def per_layer_errors(report: dict, store: str) -> dict[str, float]:
    errors = report["max_abs_error_vs_float32"]
    assert sorted(errors) == sorted(str(x) for x in open_store(store).layout.layers)
    assert all(isinstance(e, float) and np.isfinite(e) and e >= 0 for e in errors.values())
    return errors


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_verify_on_the_writing_device_is_exact(dtype, device, written):
    report = run_verify(written[dtype], samples=1000, device=device)
    assert report["exact"] and report["inexact_reason"] is None and report["mismatches"] == []
    assert report["samples_checked"] == open_store(written[dtype]).layout.n_samples
    assert report["checksums"]["damaged"] == []
    errors = per_layer_errors(report, written[dtype])
    if dtype == "float32":
        assert set(errors.values()) == {0.0}
    else:  # bfloat16 keeps 8 significant bits: a rounding error, nothing more
        assert 0.0 < max(errors.values()) < 0.1


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_verify_from_the_cpu_is_within_the_tolerance(dtype, device, written):
    report = run_verify(written[dtype], samples=1000, device="cpu")
    assert report["mismatches"] == []
    same_device = torch.device(device).type == "cpu"
    assert report["exact"] == same_device
    if not same_device:  # the report says why it compared with a tolerance
        assert isinstance(report["inexact_reason"], str) and report["inexact_reason"]
    errors = per_layer_errors(report, written[dtype])
    # the CPU's float32 against rows the device computed under bfloat16 autocast: a rounding
    # error (a wrong row would be off by about its own size, ~1)
    assert max(errors.values()) < 0.5
