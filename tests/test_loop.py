"""The shared training loop's library parts: the learning-rate schedule and the scaler path."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.engine.loop import TrainStep, train_one_epoch, validation_workers, warmup_cosine


def learning_rates(total: int, warmup: int, lrs=(0.1, 1.0)) -> list[list[float]]:
    """Each group's learning rate at updates 0..total of a warmup_cosine schedule."""
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs]
    optimizer = torch.optim.AdamW(groups)
    scheduler = warmup_cosine(optimizer, total, warmup)
    seen = []
    for _ in range(total + 1):
        seen.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return seen


def test_warmup_cosine_is_linear_then_half_at_half_way_then_zero():
    seen = learning_rates(total=20, warmup=4)
    expected = {0: 0.025, 1: 0.05, 2: 0.075, 3: 0.1,  # linear warm-up, peak at update warmup - 1
                4: 0.1, 8: 0.05 * (1 + math.cos(math.pi / 4)), 12: 0.05, 20: 0.0}  # cosine over 16 updates
    for step, lr in expected.items():
        assert seen[step][0] == pytest.approx(lr, abs=1e-12), step
        assert seen[step][1] == pytest.approx(10 * lr, abs=1e-11), step  # each group its own peak
    assert learning_rates(10, 0)[0] == [0.1, 1.0] and learning_rates(10, 0)[5][0] == pytest.approx(0.05)
    assert [row[0] for row in learning_rates(4, 1)] == pytest.approx([0.1, 0.1, 0.075, 0.025, 0.0])


def test_warmup_cosine_resumes_where_it_stopped():
    def build():
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        return optimizer, warmup_cosine(optimizer, 30, 6)

    optimizer, scheduler = build()
    for _ in range(9):
        optimizer.step()
        scheduler.step()
    resumed_optimizer, resumed = build()
    resumed_optimizer.load_state_dict(optimizer.state_dict())
    resumed.load_state_dict(scheduler.state_dict())
    for _ in range(15):
        for opt, sched in ((optimizer, scheduler), (resumed_optimizer, resumed)):
            opt.step()
            sched.step()
        assert resumed_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]


def one_epoch(scaler, grad_clip=None) -> torch.Tensor:
    """The weights after one epoch of SGD on a fixed regression, through train_one_epoch."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    batches = [(torch.randn(4, 3) * 5, torch.randn(4, 1)) for _ in range(3)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    step = TrainStep(model, lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]))
    train_one_epoch(step, batches, optimizer, torch.device("cpu"), 1, grad_clip=grad_clip, scaler=scaler,
                    progress=False)
    return torch.cat([model.weight.detach().flatten(), model.bias.detach()])


def by_hand(grad_clip=None) -> torch.Tensor:
    """The same epoch written out: backward, clip, step."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    batches = [(torch.randn(4, 3) * 5, torch.randn(4, 1)) for _ in range(3)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for x, y in batches:
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
    return torch.cat([model.weight.detach().flatten(), model.bias.detach()])


@pytest.mark.parametrize("grad_clip", [None, 0.5])
def test_one_scaler_path_disabled_passes_through_and_enabled_unscales_before_clipping(grad_clip):
    expected = by_hand(grad_clip)
    assert torch.equal(one_epoch(None, grad_clip), expected)  # no scaler: a disabled one
    assert torch.equal(one_epoch(torch.amp.GradScaler("cpu", enabled=False), grad_clip), expected)
    # An enabled scaler multiplies the loss by a power of two and divides the gradients back
    # before clipping and stepping: the same weights.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, enabled=True)
    torch.testing.assert_close(one_epoch(scaler, grad_clip), expected, rtol=1e-6, atol=1e-7)
    assert scaler.get_scale() == 2.0 ** 10  # no overflow, no skipped step


def test_validation_workers_are_the_training_count_at_most_two():
    assert [validation_workers(n) for n in (0, 1, 2, 3, 8)] == [0, 1, 2, 2, 2]
