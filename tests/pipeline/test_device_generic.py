"""The CUDA-facing bookkeeping, pinned down on the CPU: random-number streams, checkpoints that
load anywhere, optimiser state following its parameters, deterministic mean pooling, verify's
exact-or-tolerance decision, and the bench's energy reading."""

from __future__ import annotations

import pytest
import torch

from pipeline import rng
from pipeline.bench.worker import _gpu_energy_mj
from pipeline.checkpoints import checkpoint, resume, save, to_cpu
from pipeline.errors import ConfigError
from pipeline.optim import AdamW
from pipeline.sidenets import SideBatch, StoreInfo, build, parse_spec
from pipeline.sidenets.base import pool_rows
from pipeline.train import TrainConfig, make_member
from pipeline.verify import TOLERANCE, inexact_reason, off_by

CPU = torch.device("cpu")
INFO = StoreInfo(hidden_size=8, layers=(0, 1, 2), positions="all", pooling="mean", num_heads=2,
                 causal=False, task={"type": "classification", "num_labels": 2})  # fmt: skip


def test_rng_swap_restores_the_callers_stream():
    state = rng.seeded(3, CPU)
    before = torch.get_rng_state()
    with rng.swapped(state, CPU):
        a = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's stream is untouched
    rng.restore(state, CPU)
    assert torch.equal(torch.rand(4), a)
    assert rng.capture(CPU)[1] is None


def test_a_cpu_state_cannot_drive_cuda():
    with pytest.raises(ValueError, match="CUDA"):
        rng.restore((torch.get_rng_state(), None), torch.device("cuda"))


def _member(tmp_path, spec="read:hidden=8"):
    cfg = TrainConfig(train="", eval="", specs=[], epochs=1, out=str(tmp_path))
    return make_member("m", parse_spec(spec), INFO, 10, cfg, CPU)


def test_members_stream_is_the_generator_after_building(tmp_path):
    m = _member(tmp_path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        build(parse_spec("read:hidden=8"), INFO)
        assert torch.equal(m.rng[0], torch.get_rng_state())
    assert m.rng[1] is None and m.device == CPU


def test_resume_refuses_a_checkpoint_of_another_device_type(tmp_path):
    m = _member(tmp_path)
    state = checkpoint(m, INFO, {"id": 1}, full=True)
    state["device_type"] = "cuda"
    save(state, m.folder / "last.pt")
    with pytest.raises(ConfigError, match="--device cuda"):
        resume(m, {"id": 1})


def test_resume_reads_a_checkpoint_written_before_streams_had_two_parts(tmp_path):
    m = _member(tmp_path)
    state = checkpoint(m, INFO, {"id": 1}, full=True)
    state["rng"] = state["rng"][0]  # the CPU state alone
    del state["device_type"]
    save(state, m.folder / "last.pt")
    resume(m, {"id": 1})
    assert torch.equal(m.rng[0], state["rng"]) and m.rng[1] is None


def test_checkpoints_hold_only_cpu_tensors(tmp_path):
    m = _member(tmp_path)
    state = checkpoint(m, INFO, {"id": 1}, full=True)
    tensors = []

    def walk(x):
        if isinstance(x, torch.Tensor):
            tensors.append(x)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list | tuple):
            for v in x:
                walk(v)

    walk(state)
    assert tensors and all(t.device.type == "cpu" for t in tensors)
    nested = to_cpu({"a": [torch.ones(1)], "b": (torch.zeros(2), 3)})
    assert nested["b"][1] == 3 and isinstance(nested["b"], tuple)


def test_optimiser_moments_follow_their_parameters():
    p = torch.nn.Parameter(torch.ones(3))
    opt = AdamW([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    state = opt.state_dict()
    on_meta = torch.nn.Parameter(torch.empty(3, device="meta"))
    other = AdamW([on_meta], lr=0.1)
    other.load_state_dict(state)
    moments = other.moments[0]
    assert moments is not None and all(t.device.type == "meta" for t in moments)


def test_mean_pooling_is_the_row_by_row_sum_bit_for_bit():
    torch.manual_seed(0)
    lengths = torch.tensor([3, 1, 7, 2])
    rows = torch.randn(int(lengths.sum()), 16)
    batch = SideBatch(rows[:, None], lengths, torch.zeros(4, dtype=torch.long), torch.arange(4))
    want = torch.zeros(4, 16).index_add_(0, torch.repeat_interleave(torch.arange(4), lengths), rows)
    got = pool_rows(batch, rows, "mean", INFO)
    assert torch.equal(got, want / lengths.float()[:, None])


def test_verify_is_exact_only_on_the_recording_device_type():
    written_on_gpu = {"device": "cuda", "numerics": {"gpu": "NVIDIA H200"}}
    assert "written on cuda" in inexact_reason(written_on_gpu, CPU)
    from pipeline.backbone import cpu_numerics

    same = {"device": "cpu", "numerics": cpu_numerics()}
    assert inexact_reason(same, CPU) is None
    other = {"device": "cpu", "numerics": {**cpu_numerics(), "cpu_capability": "OTHER"}}
    assert "CPU numerics" in inexact_reason(other, CPU)


def test_tolerance_is_a_share_of_the_stored_rms():
    stored = torch.ones(4, 8).numpy()
    assert off_by(stored, stored) == 0.0
    fresh = stored.copy()
    fresh[0, 0] += TOLERANCE / 2
    assert off_by(stored, fresh) == pytest.approx(TOLERANCE / 2)


def test_no_gpu_no_energy():
    assert _gpu_energy_mj(CPU) is None
    assert _gpu_energy_mj(None) is None


def test_padding_by_index_equals_padding_by_mask_values_and_gradients():
    torch.manual_seed(1)
    lengths = torch.tensor([2, 5, 1, 3])
    rows = torch.randn(int(lengths.sum()), 6, requires_grad=True)
    labels = torch.zeros(4, dtype=torch.long)
    for longest in (0, 5):  # unknown (read from lengths) and given by the loader
        batch = SideBatch(rows.detach(), lengths, labels, torch.arange(4), longest=longest)
        out, mask = batch.padded(rows)
        want = rows.new_zeros((4, 5, 6))
        want[torch.arange(5)[None, :] < lengths[:, None]] = rows
        assert torch.equal(out, want) and torch.equal(mask, torch.arange(5) < lengths[:, None])
        (grad,) = torch.autograd.grad((out * torch.arange(30.0).view(1, 5, 6)).sum(), rows)
        (ref,) = torch.autograd.grad((want * torch.arange(30.0).view(1, 5, 6)).sum(), rows)
        assert torch.equal(grad, ref)


def test_loaders_batches_know_their_longest_sample():
    batch = SideBatch(
        torch.zeros(6, 1, 2), torch.tensor([1, 4, 1]), torch.zeros(3), torch.arange(3)
    )
    assert batch.max_length == 4 and batch.longest == 0
    parts = batch.split(4)
    assert [p.longest for p in parts] == [1, 4, 1]
    assert batch.to(CPU).longest == 0
