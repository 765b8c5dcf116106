"""The training step's fast paths (issue 11), each checked against the plain path on CPU.

    fused bias matmuls      fp32: the old x @ W + b to float rounding; bf16 autocast: bf16 out,
                            no (N, F) cast, the mse still an fp32 mean
    one pass over acts      the metrics lines of the old three-pass step, bit for bit
    AuxK                    skipped before dead_window tokens (same loss and gradients); the dense
                            form equals the old embedding_bag one, value and gradients
    events, precision,      blocking copy events; "tf32" sets TF32 in the loop and the bench's
    throughput window       limit alike; the window's clock read after the device sync

The tests marked cuda run only where CUDA is (a bf16 step's dtypes, no hidden syncs in a step
of every architecture, the reader's events blocking) and skip cleanly elsewhere.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch
from torch.nn.functional import embedding_bag
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

from saecache.sae import losses
from saecache.sae.archs import ARCHS
from saecache.sae.metrics import FiringStats, RunningMetrics, fire_counts
from saecache.sae.model import SAE, SAEConfig
from saecache.train import loop, reader
from saecache.train.config import ReaderConfig, TrainConfig
from saecache.train.trainer import SAETrainer, set_precision

D, F, B = 16, 64, 48
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
SPARSITY = {"relu": dict(l1=("3e-4", "adaptive:8")), "topk": dict(k=(6,)),
            "batchtopk": dict(k=(6,)), "jumprelu": dict(l1=("1e-3", "adaptive:8"))}


def config(arch: str, device="cpu", **changes) -> TrainConfig:
    base = dict(cache="unused", layers=(0,), arch=arch, expansion=F // D, tokens=B * 12,
                snapshots=(), lr=1e-3, device=device, dead_window=B * 3, aux_k=8,
                progress=False, reader=ReaderConfig(batch_size=B), **SPARSITY[arch])
    return TrainConfig(**{**base, **changes})


def trainers(arch: str, device="cpu", **changes) -> list[SAETrainer]:
    cfg = config(arch, device, **changes)
    return [SAETrainer(spec, cfg, D) for spec in cfg.run_specs(0, D)]


def batches(n: int, device="cpu") -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return [(torch.randn(B, D, generator=gen) * 2 + 0.5).to(device) for _ in range(n)]


def sae_with_biases(arch: str) -> SAE:
    k = 6 if arch in ("topk", "batchtopk") else None
    sae = SAE.initialized(SAEConfig(d=D, n_features=F, arch=arch, k=k,
                                    apply_b_dec_to_input=ARCHS[arch].apply_b_dec_to_input), seed=1)
    with torch.no_grad():  # nonzero biases, so that the fused add is exercised
        sae.b_enc.copy_(torch.linspace(-0.3, 0.3, F))
        sae.b_dec.copy_(torch.linspace(-1.0, 1.0, D))
    return sae


# ---- 1. fused bias matmuls ------------------------------------------------------------------

def dot_bound(a: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Rounding bound of a @ w + b in fp32, in either summation order: the classic γ_n bound
    (n + 1)·u·(|a| @ |w| + |b|), n the inner dimension, u = 2⁻²⁴; addmm and matmul-then-add
    differ only in where the bias enters the sum, so each is within this of the exact value."""
    n, u = a.shape[-1], torch.finfo(torch.float32).eps / 2
    return (n + 1) * u * (a.abs() @ w.abs() + b.abs())


@pytest.mark.parametrize("arch", list(ARCHS))
def test_fused_bias_matmuls_are_the_plain_formula_in_fp32(arch):
    sae = sae_with_biases(arch)
    x = batches(1)[0]
    out = sae(x)
    x_in = x - sae.b_dec if sae.cfg.apply_b_dec_to_input else x
    with torch.no_grad():
        plain_pre = x_in @ sae.W_enc + sae.b_enc  # the old formula
        exact_pre = x_in.double() @ sae.W_enc.double() + sae.b_enc.double()
        bound = dot_bound(x_in, sae.W_enc, sae.b_enc).double()
        assert out.pre_acts.dtype == out.acts.dtype == out.x_hat.dtype == torch.float32
        assert bool(((out.pre_acts.double() - exact_pre).abs() <= bound).all())
        assert bool(((plain_pre.double() - exact_pre).abs() <= 2 * bound).all())
        plain_x_hat = out.acts @ sae.W_dec + sae.b_dec  # the old decoder on the same acts
        exact_x_hat = out.acts.double() @ sae.W_dec.double() + sae.b_dec.double()
        x_bound = dot_bound(out.acts, sae.W_dec, sae.b_dec).double()
        assert bool(((out.x_hat.double() - exact_x_hat).abs() <= x_bound).all())
        assert_close(out.x_hat, plain_x_hat, rtol=0, atol=float(2 * x_bound.max()))


class _Casts(TorchDispatchMode):
    """Records (shape, from dtype, to dtype) of every conversion (aten._to_copy) run under it."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[tuple[int, ...], torch.dtype, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default:
            self.shapes.append((tuple(args[0].shape), args[0].dtype, kwargs.get("dtype")))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_under_bf16_autocast_the_outputs_stay_bf16_and_the_mse_is_fp32(arch):
    sae, x = sae_with_biases(arch), batches(1)[0]
    (trainer,) = trainers(arch)[:1]
    trainer.sae = sae
    with _Casts() as casts, torch.autocast("cpu", dtype=torch.bfloat16):
        out = sae(x)
        loss = ARCHS[arch].loss(sae, x, out, trainer._terms(0))
    assert out.pre_acts.dtype == out.acts.dtype == out.x_hat.dtype == torch.bfloat16
    assert loss.loss.dtype == loss.mse.dtype == loss.sparsity.dtype == torch.float32
    # the mse is the fp32 mean of fp32 differences, not a bf16 one
    assert torch.equal(loss.mse, (x - out.x_hat.float()).pow(2).mean().detach())
    # no (N, F) float tensor converted (jumprelu's step makes its 0/1 floats from a bool mask)
    wide = [cast for cast in casts.shapes if cast[0] == (B, F) and cast[1].is_floating_point]
    assert casts.shapes and wide == [], f"(N, F) activations were cast: {casts.shapes}"


def test_a_bf16_trainer_step_runs_on_cpu_and_its_loss_is_fp32():
    (trainer,) = trainers("topk", precision="bf16")
    for step, x in enumerate(batches(4)):
        trainer.step(x, step)
    line = trainer.metrics_line(3, {})
    assert all(isinstance(line[key], float) and line[key] == line[key] for key in ("loss", "mse", "l0"))


# ---- 2. one pass over the activations -------------------------------------------------------

@torch.no_grad()
def old_after_step(self, x, out, loss, lr, step):
    """The trainer's step bookkeeping before issue 11: three passes over acts."""
    acts = out.acts.detach()
    self.firing.update(acts)
    if self.controller.target is not None:
        self.controller.update((acts != 0).sum(dim=-1).float().mean(), step)
    self.metrics.update(x, out.x_hat.detach().float(), acts)
    self._losses += torch.stack([torch.ones((), device=x.device), loss.loss.detach().float(),
                                 loss.aux.float()]).double()
    self._lr = lr


def metrics_lines(runs: list[SAETrainer], steps: int, every: int = 3) -> list[str]:
    out = []
    for step, x in enumerate(batches(steps)):
        for run in runs:
            run.step(x, step)
            if (step + 1) % every == 0:
                out.append(json.dumps(run.metrics_line(step, {})))
    return out


@pytest.mark.parametrize("arch", list(ARCHS))
def test_the_metrics_lines_are_the_three_pass_ones_bit_for_bit(arch):
    new = trainers(arch)
    old = trainers(arch)
    for run in old:
        run._after_step = types.MethodType(old_after_step, run)
    want, got = metrics_lines(old, 9), metrics_lines(new, 9)
    assert len(got) == 3 * len(new) and got == want
    for a, b in zip(old, new):  # and the state they leave
        assert torch.equal(a.firing.fire_counts, b.firing.fire_counts)
        assert torch.equal(a.firing.tokens_since_fired, b.firing.tokens_since_fired)
        assert torch.equal(a.controller.coefficient, b.controller.coefficient)


def test_fire_counts_feed_the_firing_stats_and_the_metrics_as_acts_did():
    acts = torch.relu(torch.randn(40, 12, generator=torch.Generator().manual_seed(2)) - 0.8)
    acts[:, 3] = 0  # a feature that never fires
    counts = fire_counts(acts)
    assert counts.dtype == torch.int64 and torch.equal(counts, (acts != 0).sum(dim=0))
    by_acts, by_counts = FiringStats(12), FiringStats(12)
    by_acts.update(acts)
    by_counts.add_counts(counts, acts.shape[0])
    assert torch.equal(by_acts.fire_counts, by_counts.fire_counts)
    assert torch.equal(by_acts.tokens_since_fired, by_counts.tokens_since_fired)
    with pytest.raises(ValueError, match="fire counts have shape"):
        by_counts.add_counts(counts[:5], 40)
    x = torch.randn(40, 4)
    m_acts, m_count = RunningMetrics(), RunningMetrics()
    m_acts.update(x, x * 0.9, acts)
    m_count.update(x, x * 0.9, nonzero=counts.sum())
    assert m_acts.summary() == m_count.summary()


def test_fixed_runs_compute_no_l0_for_the_controller():
    fixed, adaptive = trainers("relu")
    calls = []
    for run in (fixed, adaptive):
        run.controller.update = lambda l0, step, run=run: calls.append(run)
        run.step(batches(1)[0], 0)
    assert calls == [adaptive]


# ---- 3. AuxK: skipped before the dead window, dense instead of embedding_bag -----------------

def test_aux_is_not_computed_before_dead_window_tokens(monkeypatch):
    (run,) = trainers("topk")
    window = run.cfg.dead_window  # 3 batches
    calls = []
    real = losses._aux_term
    monkeypatch.setattr(losses, "_aux_term", lambda *a: calls.append(1) or real(*a))
    for step, x in enumerate(batches(5)):
        assert (run._dead() is None) == (run.firing.tokens_seen < window)
        run.step(x, step)
    assert len(calls) == 2  # steps 3 and 4: 144 tokens seen, then 192
    assert run._dead().shape == (F,)


def test_skipping_aux_gives_the_loss_and_gradients_of_an_all_false_mask():
    sae, x = sae_with_biases("topk"), batches(1)[0]

    def grads(dead):
        sae.zero_grad(set_to_none=True)
        loss = losses.topk_aux_loss(sae, x, sae(x), dead, 8)
        loss.loss.backward()
        return [loss.loss.detach(), loss.aux] + [p.grad.clone() for p in sae.parameters()]

    for a, b in zip(grads(None), grads(torch.zeros(F, dtype=torch.bool))):
        assert torch.equal(a, b)


def embedding_bag_aux(sae, e, pre_acts, dead, aux_k):
    """losses._aux_term before issue 11: the sparse decode by embedding_bag."""
    live_masked = pre_acts.masked_fill(~dead, float("-inf"))
    values, indices = torch.topk(live_masked, min(aux_k, pre_acts.shape[-1]), dim=-1, sorted=False)
    weights = torch.relu(values).to(sae.W_dec.dtype)
    e_hat = embedding_bag(indices, sae.W_dec, per_sample_weights=weights, mode="sum")
    num = (e - e_hat).pow(2).sum()
    den = (e - e.mean(dim=0)).pow(2).sum()
    ok = den > 0
    aux = torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))
    return aux * dead.any()


@pytest.mark.parametrize("n_dead", [0, 3, 20, F])  # none, fewer than aux_k (8), more, all
def test_the_dense_aux_decode_is_embedding_bags_value_and_gradients(n_dead):
    sae = sae_with_biases("topk")
    gen = torch.Generator().manual_seed(n_dead)
    pre = torch.randn(B, F, generator=gen, requires_grad=True)
    e = torch.randn(B, D, generator=gen)
    dead = torch.zeros(F, dtype=torch.bool)
    dead[torch.randperm(F, generator=gen)[:n_dead]] = True
    results = []
    for fn in (embedding_bag_aux, losses._aux_term):
        sae.zero_grad(set_to_none=True)
        pre.grad = None
        aux = fn(sae, e, pre, dead, 8)
        aux.backward()
        w_grad = sae.W_dec.grad if sae.W_dec.grad is not None else torch.zeros_like(sae.W_dec)
        results.append((aux.detach(), w_grad.clone(), pre.grad.clone()))
    (want, want_w, want_pre), (got, got_w, got_pre) = results
    # fp32, two summation orders of the same ≤ 8 terms per row: a few ulps of each value
    assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert_close(got_w, want_w, rtol=1e-5, atol=1e-7)
    assert_close(got_pre, want_pre, rtol=1e-5, atol=1e-7)
    assert (n_dead == 0) == (float(want) == 0.0)


class _Largest(TorchDispatchMode):
    """Records the size (elements) of the largest tensor any op returns under it."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_the_dense_aux_term_makes_nothing_larger_than_n_by_f():
    """Its forward and backward, op by op, never make a tensor above N·F elements (3072 here,
    where an (N·k, d) gather or scratch would be 6144). torch.cuda.max_memory_allocated exists
    only on CUDA, and embedding_bag's CPU backward has no (N·k, d) scratch to compare with: at
    N = 4096, F = 32768, k = 512, d = 1024 the dense form's (N, F) matrix and gradient are
    0.5 GiB in bf16, the CUDA scratch N·k·d·4 bytes = 8 GiB (analytic)."""
    sae = sae_with_biases("topk")
    pre = torch.randn(B, F, requires_grad=True)
    e, dead = torch.randn(B, D), torch.ones(F, dtype=torch.bool)
    with _Largest() as mode:
        losses._aux_term(sae, e, pre, dead, 8).backward()
    assert B * 8 * D > B * F and 0 < mode.largest <= B * F


# ---- 4, 5. events, precision, the throughput window -----------------------------------------

def test_the_copy_event_is_a_blocking_one(monkeypatch):
    made = []

    class Event:
        def __init__(self, **kwargs):
            made.append(kwargs)

    monkeypatch.setattr(torch.cuda, "Event", Event)
    reader.copy_event()
    assert made == [{"blocking": True}]


@pytest.fixture
def restore_tf32():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.mark.parametrize("precision,tf32", [("tf32", True), ("fp32", False), ("bf16", False)])
def test_set_precision_turns_tf32_on_for_tf32_only(precision, tf32, restore_tf32):
    torch.backends.cuda.matmul.allow_tf32 = not tf32
    set_precision(precision)
    assert torch.backends.cuda.matmul.allow_tf32 is tf32 and torch.backends.cudnn.allow_tf32 is tf32


def test_the_bench_limit_sets_the_precision_the_loop_sets(monkeypatch, restore_tf32):
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    try:
        import bench_train
    finally:
        sys.path.pop(0)
    seen = []
    monkeypatch.setattr(bench_train, "set_precision", seen.append)
    cache = types.SimpleNamespace(location="unused", layout=types.SimpleNamespace(d=D))
    args = types.SimpleNamespace(expansion=4, batch_size=B, reader_threads=1, mix_chunks=1,
                                 device="cpu")
    bench_train.limit(cache, args, "tf32", ("3e-4",), 1)
    assert seen == ["tf32"]


def test_the_window_reads_the_clock_after_the_device_sync(monkeypatch):
    order = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: order.append("sync"))
    monkeypatch.setattr(loop.time, "perf_counter", lambda: order.append("clock") or 1.0)
    fake = types.SimpleNamespace(wait_seconds=0.0, bytes_read=0)
    window = loop._Window(fake, 0, 0, "cuda:0")
    order.clear()
    window.take(10, B)
    assert order[:2] == ["sync", "clock"]
    cpu = loop._Window(fake, 0, 0, "cpu")
    order.clear()
    cpu.take(10, B)
    assert "sync" not in order


# ---- CUDA only ------------------------------------------------------------------------------

@cuda
def test_cuda_a_bf16_step_keeps_bf16_outputs():
    (trainer,) = trainers("topk", "cuda", precision="bf16")
    x = batches(1, "cuda")[0]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = trainer.sae(x)
        loss = trainer.arch.loss(trainer.sae, x, out, trainer._terms(0))
    assert out.pre_acts.dtype == out.acts.dtype == out.x_hat.dtype == torch.bfloat16
    assert loss.mse.dtype == torch.float32
    trainer.step(x, 0)


@cuda
@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_cuda_a_step_of_every_arch_has_no_hidden_sync(arch, precision):
    runs = trainers(arch, "cuda", precision=precision)
    xs = batches(5, "cuda")
    for run in runs:  # the first step allocates Adam's state, outside the check
        run.step(xs[0], 0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step, x in enumerate(xs[1:], start=1):  # past dead_window: AuxK included
            for run in runs:
                run.step(x, step)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@cuda
def test_cuda_the_readers_copy_events_are_blocking(monkeypatch, train_cache):
    from saecache.storage.cache import Cache
    made = []
    real = torch.cuda.Event

    def recording(**kwargs):
        made.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(torch.cuda, "Event", recording)
    cache = Cache.open(str(train_cache))
    with reader.PrefetchReader(cache, 1, ReaderConfig(batch_size=128, mix_chunks=2, threads=2),
                               "cuda") as prefetch:
        batch = next(prefetch.iter(0))
    assert batch.is_cuda and made and all(kwargs.get("blocking") for kwargs in made)
