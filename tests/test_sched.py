import math
from sched import linear_warmup_decay, lr_factor, warmup_steps_for

import pytest
import torch


def test_warmup_rises_linearly_to_the_peak():
    assert lr_factor(0, 10, 100) == pytest.approx(0.1)     # the first step already learns
    assert lr_factor(4, 10, 100) == pytest.approx(0.5)
    assert lr_factor(9, 10, 100) == pytest.approx(1.0)     # last warm-up step: the peak


def test_decay_falls_linearly_to_zero_after_the_last_step():
    assert lr_factor(10, 10, 100) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100) == pytest.approx(0.5)
    assert lr_factor(99, 10, 100) == pytest.approx(1 / 90)  # the last step still moves
    assert lr_factor(100, 10, 100) == 0.0
    assert lr_factor(150, 10, 100) == 0.0


def test_no_warmup_starts_at_the_peak():
    assert lr_factor(0, 0, 10) == 1.0
    assert lr_factor(9, 0, 10) == pytest.approx(0.1)


def test_warmup_steps_from_ratio_or_count():
    assert warmup_steps_for(1000, warmup_ratio=0.1) == 100
    assert warmup_steps_for(15, warmup_ratio=0.1) == 2      # rounded up
    assert warmup_steps_for(1000, warmup_ratio=0.1, warmup_steps=7) == 7
    assert warmup_steps_for(5, warmup_steps=7) == 5


def test_lambda_lr_is_stepped_once_per_optimizer_step():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=2.0)
    scheduler = linear_warmup_decay(optimizer, warmup_steps=2, total_steps=4)
    seen = []
    for _ in range(4):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([1.0, 2.0, 2.0, 1.0])
    assert optimizer.param_groups[0]["lr"] == 0.0
    assert all(math.isfinite(x) for x in seen)
