"""The harvest's fast paths against the plain ones (issue 11): statistics in few passes, token
ids through pinned staging, blocking events, one GPU per torchrun rank. The CPU tests run
everywhere; the CUDA ones skip without a GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from saecache.core import distributed
from saecache.core.distributed import Ranks
from saecache.core.errors import SaecacheError
from saecache.harvest.capture import HostBuffer, ResidualCapture
from saecache.storage import stats
from tests.reference import reference_sequence_sums

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
U = 2.0 ** -24  # fp32 unit roundoff


def gamma(n: int) -> float:
    """Higham's γ_n: any order of summing n fp32 terms is off by at most γ_n · Σ|terms|."""
    return n * U / (1 - n * U)


def batch(dtype: torch.dtype, bad: bool, seed: int = 0, shape=(4, 64, 48)) -> torch.Tensor:
    """Random residuals with a mean offset; with ``bad``, inf/nan rows in two sequences and
    one sequence with no finite row at all."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * 3 + 0.5).to(dtype)
    if bad:
        x[1, 3, 5] = float("inf")
        x[1, 7, :] = float("nan")
        x[1, 9, 0], x[1, 9, 1] = float("-inf"), float("nan")
        x[2, 0, 0] = float("nan")
        x[3, :, 2] = float("inf")  # every row of sequence 3
    return x


def assert_matches_reference(new: torch.Tensor, x: torch.Tensor) -> None:
    """new (B, d + 4) against the plain implementation, to fp32 accumulation tolerance.

    Both sum exactly representable fp32 terms (fp16/bf16 upcast exactly) in different orders,
    so each is within γ_n·Σ|terms| of the exact sum (n = T for Σx, d then T for the norms),
    and the two within twice that; ‖x‖² from the rounded norm adds 3u per row. Counts exact.
    """
    ref = reference_sequence_sums(x)
    _, t, d = x.shape
    xd = x.double()
    ok = torch.isfinite(xd).all(dim=-1, keepdim=True)
    abs_sum = torch.where(ok, xd, 0.0).abs().sum(dim=1)  # (B, d)
    assert ((new[:, :d].double() - ref[:, :d].double()).abs() <= 2 * gamma(t) * abs_sum).all()
    rtol = 2 * (gamma(t) + gamma(d) + 3 * U)
    torch.testing.assert_close(new[:, d:d + 2], ref[:, d:d + 2], rtol=rtol, atol=0)
    assert torch.equal(new[:, d + 2:], ref[:, d + 2:])  # finite rows, non-finite values


@pytest.mark.parametrize("bad", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sequence_sums_agree_with_the_plain_implementation(dtype, bad):
    x = batch(dtype, bad)
    new = stats.sequence_sums(x)
    assert new.dtype == torch.float32 and new.shape == (4, stats.width(48))
    assert torch.isfinite(new).all()  # bad rows are left out, not summed
    assert_matches_reference(new, x)
    if bad:
        assert new[:, -1].tolist() == [0, 51, 1, 64] and new[:, -2].tolist() == [64, 61, 63, 0]


@pytest.mark.parametrize("bad", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_the_cpu_gather_and_the_sync_free_mask_give_the_same_bits(dtype, bad):
    x = batch(dtype, bad, seed=1)
    row_ok = torch.isfinite(torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32))
    gathered = stats._sums_of_gathered_rows(x, row_ok)
    masked = stats._sums_of_masked_rows(x, row_ok)
    assert all(torch.equal(a, b) for a, b in zip(gathered, masked))


def test_a_finite_row_whose_fp32_norm_overflows_is_left_out_as_documented():
    x = batch(torch.bfloat16, bad=False)
    x[0, 5, :] = 1e20  # finite in bf16 and fp32, but Σx² > fp32 max
    new, ref = stats.sequence_sums(x), reference_sequence_sums(x)
    assert torch.isinf(ref[0, -3])  # the plain code summed it: Σ‖x‖² = inf
    assert new[0, -2] == ref[0, -2] - 1 and new[0, -1] == 0 == ref[0, -1]
    assert torch.isfinite(new).all()
    kept = torch.cat([x[:, :5], x[:, 6:]], dim=1)[:1]  # the same sequence without that row
    torch.testing.assert_close(new[:1], stats.sequence_sums(kept), rtol=4 * gamma(64), atol=0)


# ----------------------------------------------------------------------------- token ids


class _Blocks(nn.Module):
    """The least a ResidualCapture needs: a parameter and a list of blocks."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 4)])


class _Event:
    """Stands in for a CUDA event: remembers how it was made, recorded and waited on."""

    made: list[dict] = []

    def __init__(self, **kwargs):
        self.kwargs, self.stream, self.waited_with = kwargs, None, None
        _Event.made.append(kwargs)

    def record(self, stream) -> None:
        self.stream = stream

    def synchronize(self) -> None:
        self.waited_with = self.staging.clone()


def test_on_the_cpu_token_ids_are_used_in_place_and_buffers_have_no_staging():
    capture = ResidualCapture(_Blocks(), "layers", (0,))
    buffer = HostBuffer.allocate(1, seqs=3, ctx=5, d=4, pin=False)
    assert buffer.ids is None and buffer.nbytes == buffer.resid.nbytes + buffer.sums.nbytes
    tokens = np.arange(10, dtype=np.int32).reshape(2, 5)
    ids = capture.upload(tokens, buffer)
    assert ids.dtype == torch.int32 and ids.data_ptr() == tokens.ctypes.data  # no copy at all


def test_on_cuda_token_ids_go_through_the_pinned_staging_once_its_last_unit_has_landed():
    capture = ResidualCapture(_Blocks(), "layers", (0,))
    capture.cuda = True  # the CUDA branch; its device stays the CPU so the copy can run here
    buffer = HostBuffer.allocate(1, seqs=3, ctx=5, d=4, pin=False)
    buffer.ids = torch.full((3, 5), -1, dtype=torch.int32)  # what the previous unit sent
    buffer.ready = _Event()
    buffer.ready.staging = buffer.ids
    tokens = np.arange(10, dtype=np.int32).reshape(2, 5)
    ids = capture.upload(tokens, buffer)
    assert (buffer.ready.waited_with == -1).all()  # waited before the staging was overwritten
    assert ids.data_ptr() == buffer.ids.data_ptr()  # sent from the staging tensor
    assert ids.tolist() == tokens.tolist() and (buffer.ids[2] == -1).all()


def test_the_event_the_writers_wait_on_is_blocking(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Event", _Event)
    capture = ResidualCapture(_Blocks(), "layers", (0,))
    capture.cuda, capture.copy_stream = True, "the copy stream"
    buffer = HostBuffer.allocate(1, seqs=1, ctx=2, d=4, pin=False)
    _Event.made.clear()
    capture.finish(buffer)
    assert _Event.made == [{"blocking": True}] and buffer.ready.stream == "the copy stream"


# ----------------------------------------------------------------------------- torchrun


@pytest.fixture
def fake_group(monkeypatch):
    """Rank 1 of 2 under torchrun with the process group calls recorded, not made."""
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.append(("set_device", index)))

    def init_process_group(backend, timeout=None, device_id=None):
        calls.append(("init", backend, device_id))

    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    return calls


def test_nccl_ranks_take_their_own_gpu_before_joining(fake_group, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    group = distributed.ranks()
    assert group == Ranks(rank=1, world=2, local_rank=1)
    assert fake_group == [("set_device", 1), ("init", "nccl", torch.device("cuda", 1))]
    assert group.device("cuda") == "cuda:1"


def test_device_id_is_passed_only_where_torch_takes_it(fake_group, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(dist, "init_process_group",
                        lambda backend, timeout=None: fake_group.append(("init", backend)))
    distributed.ranks()
    assert fake_group == [("set_device", 1), ("init", "nccl")]


def test_a_rank_without_a_gpu_of_its_own_is_refused_before_joining(fake_group, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SaecacheError) as err:
        distributed.ranks()
    assert str(err.value) == ("torchrun started local rank 1 but 1 GPU(s) are visible: "
                              "pass --nproc-per-node 1 or fewer")
    assert fake_group == []


def test_gloo_ranks_touch_no_gpu(fake_group, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.ranks() == Ranks(1, 2, 1)
    assert fake_group == [("init", "gloo", None)]


def test_every_rank_device_is_its_local_gpu_and_an_index_is_refused():
    group = Ranks(rank=3, world=4, local_rank=1)
    assert group.device("cuda") == "cuda:1" and group.device("cpu") == "cpu"
    assert Ranks().device("cuda:2") == "cuda:2"  # one process: any GPU
    with pytest.raises(SaecacheError) as err:
        group.device("cuda:0")
    assert str(err.value) == ("--device cuda:0 under torchrun: each rank uses its own GPU, "
                              "cuda:LOCAL_RANK; pass --device cuda (choose GPUs with "
                              "CUDA_VISIBLE_DEVICES)")


# ----------------------------------------------------------------------------- CUDA only


@CUDA
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_stats_equal_cpu_stats_and_never_wait_for_the_host(dtype):
    x = batch(dtype, bad=True, shape=(4, 256, 96))
    on_gpu = x.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        new = stats.sequence_sums(on_gpu)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_matches_reference(new.cpu(), x)
    assert torch.equal(new.cpu()[:, -2:], stats.sequence_sums(x)[:, -2:])


@CUDA
def test_cuda_harvest_with_one_and_three_buffers_is_byte_identical(tiny_model, tmp_path, monkeypatch):
    from saecache.harvest.loop import harvest
    from tests.conftest import harvest_config, tree_digest

    made = []

    class Recording(torch.cuda.Event):
        def __new__(cls, **kwargs):
            made.append(kwargs)
            return super().__new__(cls, **kwargs)

    monkeypatch.setattr(torch.cuda, "Event", Recording)
    digests = []
    for buffers in (1, 3):
        cache = tmp_path / f"b{buffers}.zarr"
        result = harvest(harvest_config(cache, tiny_model, device="cuda", buffers=buffers))
        assert result.cache.complete
        digests.append(tree_digest(cache))
    assert digests[0] == digests[1]
    assert made and all(kwargs == {"blocking": True} for kwargs in made)  # capture's events


@CUDA
def test_cuda_buffers_stage_token_ids_in_pinned_memory():
    buffer = HostBuffer.allocate(2, seqs=3, ctx=5, d=4, pin=True)
    assert buffer.ids.is_pinned() and buffer.ids.shape == (3, 5) and buffer.resid.is_pinned()
    capture = ResidualCapture(_Blocks().cuda(), "layers", (0,))
    tokens = np.arange(15, dtype=np.int32).reshape(3, 5)
    ids = capture.upload(tokens, buffer)
    assert ids.is_cuda and ids.cpu().tolist() == tokens.tolist()
