"""What keeps one GPU busy and its figures steady-state, tested on a CPU: the warm-up step
outside the epoch clock (a fake clock), the EMA on prebuilt tensor lists against timm's
ModelEmaV3, validation batches kept on the device, the stack_pixels collate."""

from __future__ import annotations


import pytest
import torch
from timm.utils import ModelEmaV3
from torch.utils.data import TensorDataset

import train_efficientnet
from pipeline.data.augment import BatchAugment
from pipeline.engine.loop import ModelEma, ResidentBatches, TrainStep, first_batch, validation_batches, warm_up
from pipeline.train import image_fit
from pipeline.train.image_inputs import collate_images
from tests.conftest import TINY_IMAGE_ARGS
from tests.test_finetune import FINETUNE

pytestmark = pytest.mark.filterwarnings("ignore:backbone test_efficientnet:UserWarning")
CPU = torch.device("cpu")


class FakeTime:
    """``time.perf_counter`` and ``time.time`` that move only when :meth:`tick` is called."""

    def __init__(self) -> None:
        self.now = 0.0

    def tick(self, module: torch.nn.Module, args) -> None:
        if module.training and torch.is_grad_enabled():  # a training forward, not validation's
            self.now += 1.0

    def perf_counter(self) -> float:
        return self.now

    def time(self) -> float:
        return 1.7e9 + self.now


def test_the_epoch_clock_leaves_out_the_warm_up_step(tiny_dataset, tmp_path, monkeypatch):
    """Each training forward of the trunk takes one second of a fake clock: the warm-up step's
    second is reported on its own, and the epochs' seconds are their steps' alone."""
    clock = FakeTime()
    monkeypatch.setattr(image_fit, "time", clock)
    build = image_fit.build_image_model

    def hooked(*args, **kwargs):
        model = build(*args, **kwargs)
        model.trunk.register_forward_pre_hook(clock.tick)
        return model

    monkeypatch.setattr(image_fit, "build_image_model", hooked)
    summary = train_efficientnet.main(["--data", str(tiny_dataset), "--weights", str(tmp_path / "w"),
                                       *TINY_IMAGE_ARGS, *FINETUNE])
    steps_per_epoch = summary["train_images"] // 16  # --batch-size 16, the last part-batch dropped
    assert steps_per_epoch >= 1
    assert summary["warmup_step_seconds"] == 1.0
    assert summary["train_step_seconds"] == 2 * steps_per_epoch  # --finetune-epochs 2
    assert summary["train_img_s"] == 16.0  # images per step over seconds per step
    (a0, a1), (b0, b1) = summary["train_epoch_windows_unix"]
    assert a1 - a0 == b1 - b0 == steps_per_epoch and a0 == 1.7e9 + 1.0  # after the warm-up's second


def test_the_warm_up_step_leaves_training_where_it_was():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Dropout(0.5),
                                torch.nn.Flatten(), torch.nn.LazyLinear(2))
    augment = BatchAugment("trivial", CPU, seed=3)
    step = TrainStep(model, lambda m, b: m(augment(b[0]).float()).square().mean())
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    step(images)  # materialise the lazy layer
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng, generator = torch.get_rng_state(), augment.state_dict()["generator"].clone()
    runs = []
    warm_up(step, (images,), CPU, guard=lambda run: runs.append(run) or run(), keep=[augment])
    assert len(runs) == 1  # inside the guard
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng) and torch.equal(augment.state_dict()["generator"], generator)


def test_the_warm_up_batch_has_the_training_batches_shape():
    dataset = TensorDataset(torch.arange(10.0).view(10, 1), torch.zeros(10, 2))
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, drop_last=True)
    inputs, targets = first_batch(loader)
    assert inputs.shape == (4, 1) and targets.shape == (4, 2) and inputs[:, 0].tolist() == [0, 1, 2, 3]


def test_the_ema_equals_timms_model_ema_v3_after_100_steps():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 5))
    ours = ModelEma(model, decay=0.99)
    reference = ModelEmaV3(model, decay=0.99, use_warmup=True, warmup_gamma=9.0, warmup_power=1.0, foreach=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for update in range(1, 101):
        model(torch.randn(4, 3, 8, 8)).square().mean().backward()  # batch-norm statistics move too
        optimizer.step()
        optimizer.zero_grad()
        ours.update(model)
        reference.update(model, step=update)
    assert ours.current_decay() == pytest.approx(reference.get_decay(100))
    expected = reference.module.state_dict()
    for key, value in ours.module.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-7)
    assert int(ours.module[1].num_batches_tracked) == 100


def test_validation_batches_are_read_once_and_kept_on_the_device_in_order():
    reads = []

    class Counting(TensorDataset):
        def __getitem__(self, index):
            reads.append(index)
            return super().__getitem__(index)

    images = torch.randint(0, 256, (7, 3, 4, 4), dtype=torch.uint8)
    dataset = Counting(images, torch.arange(7.0).view(7, 1))
    batches = validation_batches(dataset, 3, CPU)
    assert isinstance(batches, ResidentBatches) and len(batches) == 3 and sorted(reads) == list(range(7))
    for _ in range(2):  # every pass slices what was read once
        passed = list(batches)
        assert [len(b[0]) for b in passed] == [3, 3, 1]
        assert torch.equal(torch.cat([b[0] for b in passed]), images)
    assert len(reads) == 7
    # Over the budget: a loader, reading the images again each pass.
    assert isinstance(validation_batches(dataset, 3, CPU, max_bytes=100), torch.utils.data.DataLoader)


def test_the_image_collate_stacks_channels_last_without_a_transpose():
    images = [torch.randint(0, 256, (4, 5, 3), dtype=torch.uint8).permute(2, 0, 1) for _ in range(3)]  # decoded HWC
    targets = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0])]
    batch, stacked = collate_images(list(zip(images, targets)))
    assert batch.shape == (3, 3, 4, 5) and batch.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(batch, torch.stack(images)) and torch.equal(stacked, torch.stack(targets))
    kept = validation_batches(list(zip(images, targets)), 2, CPU, collate=collate_images)
    assert next(iter(kept))[0].is_contiguous(memory_format=torch.channels_last)


def test_resume_states_are_written_behind_from_a_copy_and_the_block_waits(tmp_path, monkeypatch):
    """Inside the epoch loop a state is written by a background thread while training goes on:
    what it writes is the state at the epoch's end, and leaving the loop waits for the file."""
    import threading

    from pipeline.engine import resume as resume_module
    from pipeline.engine.resume import ResumeState

    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    trained_on, writers = threading.Event(), []
    real_save = resume_module.atomic_torch_save

    def slow_save(state, path):
        writers.append(threading.current_thread().name)
        assert trained_on.wait(10)  # the next epoch changes the weights before this write runs
        real_save(state, path)

    monkeypatch.setattr(resume_module, "atomic_torch_save", slow_save)
    state = ResumeState(tmp_path, "loop", "digest", resume=True)
    state.begin({"model": model}, None, 2)
    with state.writing_behind():
        state.end_epoch(1, {"epoch": 1})
        with torch.no_grad():
            model.weight.fill_(2.0)  # the next epoch trains
        trained_on.set()
    assert writers == ["resume-writer"]
    saved = torch.load(tmp_path / "loop.pt", weights_only=True)
    assert saved["epoch"] == 1 and saved["modules"]["model"]["weight"].tolist() == [[1.0, 1.0]]
    state.end_epoch(2, {"epoch": 2})  # outside the block: written before end_epoch returns
    assert writers == ["resume-writer", "MainThread"]
    assert torch.load(tmp_path / "loop.pt", weights_only=True)["epoch"] == 2
