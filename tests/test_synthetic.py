"""The synthetic task's generator and the linear-probe module."""

import math

import pytest
import torch

from myopia.analysis.probes import ProbeStats
from myopia.tasks.base import batch_generator
from myopia.tasks.synthetic import SyntheticConfig, SyntheticTask, generate, window_sum


def test_window_sum_by_hand():
    fx = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    # shift 1, window 3: c_n = fx_{n-1} + fx_{n-2} + fx_{n-3}, zero before the start
    assert window_sum(fx, 3, 1).tolist() == [[0.0, 1.0, 3.0, 6.0, 9.0, 12.0]]
    # shift 0 puts fx_n in its own window
    assert window_sum(fx, 3, 0).tolist() == [[1.0, 3.0, 6.0, 9.0, 12.0, 15.0]]
    # shift 2, window 2
    assert window_sum(fx, 2, 2).tolist() == [[0.0, 0.0, 1.0, 3.0, 5.0, 7.0]]


def test_generator_matches_the_formula():
    cfg = SyntheticConfig(seq_len=24, window=10, shift=1, p=0.5, frequency=10.0)
    inp, y, x = generate(cfg, 8, batch_generator(0, 0, 0))
    z = inp[..., 1]
    assert torch.equal(inp[..., 0], x)
    for b in range(8):
        for n in range(24):
            c = sum(math.sin(10 * x[b, n - i].item()) for i in range(1, 11) if n - i >= 0)
            want = c if z[b, n] == 1 else x[b, n].item()
            assert y[b, n, 0].item() == pytest.approx(want, abs=1e-5)
    assert set(z.unique().tolist()) <= {0.0, 1.0}


def test_batches_are_a_pure_function_of_seed_and_step():
    task = SyntheticTask(SyntheticConfig(seq_len=8), seed=3)
    a, b = task.train_batch(5, 0, 4), task.train_batch(5, 0, 4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(task.train_batch(6, 0, 4)[0], a[0])
    assert not torch.equal(task.heldout_batch(5, 4)[0], a[0])


def test_trivial_loss_matches_the_paper():
    task = SyntheticTask(SyntheticConfig(seq_len=64), seed=0)
    assert task.trivial_loss(n_batches=8, batch_size=512) == pytest.approx(1.2569, abs=0.01)


def test_probe_recovers_a_planted_linear_feature_and_not_noise():
    g = torch.Generator().manual_seed(0)
    d, n = 32, 4000
    direction = torch.randn(d, generator=g)

    def sample(n):
        h = torch.randn(n, d, generator=g) + 3.0  # non-zero mean: the R² must be centred
        planted = h @ direction + 5.0
        noise = torch.randn(n, generator=g) + 5.0
        return h, torch.stack([planted, noise], dim=-1)

    train, test = ProbeStats(d, 2), ProbeStats(d, 2)
    for _ in range(2):
        train.add(*sample(n))
    test.add(*sample(n))
    r2 = test.r2(train.fit(ridge=1e-6))
    assert r2[0] > 0.999
    assert abs(r2[1]) < 0.01


def test_probe_r2_from_statistics_equals_direct_computation():
    g = torch.Generator().manual_seed(1)
    h, z = torch.randn(500, 6, generator=g), torch.randn(500, 2, generator=g)
    z[:, 0] += h[:, 0] * 2
    stats = ProbeStats(6, 2)
    stats.add(h, z)
    fit = stats.fit(ridge=1e-3)
    pred = fit.predict(h)
    direct = 1 - ((z.double() - pred) ** 2).sum(0) / ((z.double() - z.double().mean(0)) ** 2).sum(0)
    torch.testing.assert_close(stats.r2(fit), direct, rtol=1e-9, atol=1e-9)
