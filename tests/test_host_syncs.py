"""No host sync in a training step: per-step constants are built once, and no step of the
frozen head, the label decoder, the caption model or the shared loop reads a value back."""

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

import pipeline
from pipeline.branches.caption import caption_batches
from pipeline.data import transforms
from pipeline.data.transforms import normalize_batch
from pipeline.engine.loop import ModelEma, TrainStep, train_one_epoch
from pipeline.models.caption import CaptionClassifier
from pipeline.models.decoder import LabelDecoder, label_rank, make_sequences
from pipeline.models.heads import LOSSES, ImageHead, get_loss

PRE = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def test_normalize_batch_reuses_its_constants_and_matches_reference():
    images = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 1, 1, 3).expand(1, 3, 1, 3).contiguous()
    first = normalize_batch(images, PRE)
    calls = transforms._device_affine.cache_info().hits
    second = normalize_batch(images, PRE)
    assert transforms._device_affine.cache_info().hits == calls + 1
    expected = (images.float() / 255 - torch.tensor(PRE["mean"]).view(1, 3, 1, 1)) / torch.tensor(PRE["std"]).view(1, 3, 1, 1)
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(second, expected)
    # Reference value: pixel 255 in the red channel normalises to (1 - 0.485) / 0.229.
    assert abs(first[0, 0, 0, 2].item() - 2.2489) < 1e-3


# ---------------------------------------------------------------- no host sync in a training step
#
# On an accelerator, reading a value back (item, int(t), bool(t), tolist, cpu, numpy), indexing
# by a tensor, or ops whose output size depends on the data (nonzero, masked indexing) make the
# host wait for the device. The CPU tests cannot measure waiting, so the recorder below lists
# every such call the project's own code makes while training steps run; torch's internals
# (the optimizer's CPU step counter) are left to torch.

SYNCING = {"item", "tolist", "cpu", "numpy", "nonzero", "masked_select", "unique", "tensor",
           "__bool__", "__int__", "__float__", "__index__"}
PACKAGE = str(Path(pipeline.__file__).parent)
TORCH = str(Path(torch.__file__).parent)


def _is_masked_index(func, args) -> bool:
    return getattr(func, "__name__", "") == "__getitem__" and len(args) > 1 and any(
        isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if isinstance(args[1], tuple)
                                                                        else (args[1],)))


class SyncRecorder(TorchFunctionMode):
    """Records 'file:line in function: call' for each host-syncing call made by pipeline code."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.on = True

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if self.on and (name in SYNCING or _is_masked_index(func, args)):
            # The direct caller, past an inner recorder (nested recorders see the same call)
            # and torch's own Python wrappers of tensor methods and functions.
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename == __file__:
                frame = frame.f_back
            while frame is not None and frame.f_code.co_filename.startswith(TORCH) and \
                    Path(frame.f_code.co_filename).name in ("_tensor.py", "overrides.py", "functional.py"):
                frame = frame.f_back
            if frame is not None and frame.f_code.co_filename.startswith(PACKAGE):
                where = f"{Path(frame.f_code.co_filename).relative_to(Path(PACKAGE).parent)}:{frame.f_lineno}"
                self.calls.append(f"{where} in {frame.f_code.co_name}: {name}")
        return func(*args, **(kwargs or {}))


def recorded_steps(recorder: SyncRecorder, batches: list[tuple[torch.Tensor, ...]]) -> Iterator:
    """The batches, recording from the first step until the loop asks past the last one: the
    steps are recorded, the epoch's end (its loss check and mean) is not."""
    recorder.on = True
    yield from batches
    recorder.on = False


def run_epoch(step: TrainStep, batches: list, **kwargs) -> tuple[list[str], list[str]]:
    """(syncs inside the steps, syncs of the whole epoch) of train_one_epoch over ``batches``."""
    optimizer = torch.optim.AdamW(step.parameters(), lr=1e-3)
    recorder = SyncRecorder()
    with recorder:
        in_steps = SyncRecorder()
        with in_steps:
            train_one_epoch(step, recorded_steps(in_steps, batches), optimizer, torch.device("cpu"), 1,
                            progress=False, **kwargs)
    return in_steps.calls, recorder.calls


def assert_no_syncs(calls: list[str]) -> None:
    assert not calls, "host syncs inside a training step:\n" + "\n".join(calls)


def feature_batches(count: int, dim: int = 12, labels: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(6, dim, generator=generator), (torch.rand(6, labels, generator=generator) < 0.4).float())
            for _ in range(count)]


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_frozen_image_head_step_has_no_host_sync(loss):
    torch.manual_seed(0)
    loss_fn = get_loss(loss)
    step = TrainStep(ImageHead(12, 5, 16, 0.5), lambda m, b: loss_fn(m(b[0]), b[1]))  # image_fit's head step
    in_steps, _ = run_epoch(step, feature_batches(1))
    assert_no_syncs(in_steps)


def test_label_decoder_step_has_no_host_sync():
    torch.manual_seed(0)
    batches = feature_batches(1)
    rank = label_rank(batches[0][1])
    step = TrainStep(LabelDecoder(12, 5, 8, 16, 0.3), lambda m, b: m.loss(b[0], b[1], rank))  # image_fit's
    in_steps, _ = run_epoch(step, batches)
    assert_no_syncs(in_steps)


def test_recorder_catches_reading_the_longest_label_set():
    # Without a fixed length make_sequences reads the longest row back: the call the decoder's
    # training step made before, which the recorder must name with its line.
    recorder = SyncRecorder()
    with recorder:
        make_sequences(torch.eye(3), torch.arange(3))
    assert len(recorder.calls) == 1
    assert recorder.calls[0].startswith("pipeline/models/decoder.py:")
    assert recorder.calls[0].endswith("in make_sequences: __int__")


def test_caption_step_has_no_host_sync():
    torch.manual_seed(0)
    model = CaptionClassifier(30, 5, embed_dim=8, hidden_size=6, layers=2, dropout=0.2, embed_dropout=0.1)
    ids = torch.tensor([[5, 6, 7, 8, 9], [3, 4, 0, 0, 0], [2, 0, 0, 0, 0], [7, 7, 7, 0, 0]])
    lengths = torch.tensor([5, 2, 1, 3])
    targets = torch.tensor([[1.0, 0, 0, 1, 0], [0, 1, 0, 0, 0], [0, 0, 1, 0, 0], [1, 1, 0, 0, 0]])
    batches = [(batch_ids, batch_lengths, targets[rows])
               for rows, batch_ids, batch_lengths in caption_batches(ids, lengths, [torch.tensor([0, 1, 2, 3])])]
    loss_fn = torch.nn.BCEWithLogitsLoss()
    step = TrainStep(model, lambda m, b: loss_fn(m(b[0], b[1]), b[2]), host_inputs=(1,))  # caption.py's step
    in_steps, _ = run_epoch(step, batches)
    assert_no_syncs(in_steps)


def test_train_one_epoch_syncs_only_at_the_epoch_end():
    torch.manual_seed(0)
    model = ImageHead(12, 5, 16, 0.5)
    step = TrainStep(model, lambda m, b: torch.nn.functional.binary_cross_entropy_with_logits(m(b[0]), b[1]))
    ema = ModelEma(model, 0.99)
    in_steps, whole = run_epoch(step, feature_batches(2), grad_clip=1.0, ema=ema)
    assert_no_syncs(in_steps)
    assert ema.updates == 2  # both steps ran, with the EMA update and gradient clipping
    # The epoch's end reads the loss check and the mean loss back (and builds the count
    # tensor), after the steps: the recorder sees them once the steps are over.
    assert sorted(call.rsplit(" in ", 1)[1] for call in whole) == [
        "_check_finite: item", "mean_across_ranks: item", "mean_across_ranks: tensor"]


def test_joint_image_step_with_device_augmentation_has_no_host_sync():
    # fit_jointly's step: TrivialAugment on the uint8 batch, normalisation, the whole backbone,
    # then head and decoder losses.
    import warnings

    import train_efficientnet
    from pipeline.config import parse_config
    from pipeline.data.augment import BatchAugment
    from pipeline.models.backbones import create_backbone
    from pipeline.models.decoder import LabelOrder
    from pipeline.train.image_config import ImageTrainConfig
    from pipeline.train.image_fit import build_image_model, joint_loss

    torch.manual_seed(0)
    config = parse_config(ImageTrainConfig, train_efficientnet.get_args_parser(),
                          ["--head-hidden", "16", "--decoder-embed", "8", "--decoder-hidden", "16"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights
        backbone = create_backbone("test_efficientnet", resolution=32)
    cpu = torch.device("cpu")
    model = build_image_model(config, backbone.module, backbone.pooled_dim, 5, cpu)
    augment = BatchAugment("trivial", cpu, seed=0)
    targets = (torch.rand(4, 5, generator=torch.Generator().manual_seed(1)) < 0.4).float()
    order = LabelOrder.from_train(targets.numpy(), config.label_order)
    step_loss = joint_loss(config, lambda raw: normalize_batch(augment(raw), PRE), order, cpu)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    in_steps, _ = run_epoch(TrainStep(model, step_loss), [(images, targets)])
    assert_no_syncs(in_steps)


def test_validation_pass_over_resident_batches_has_no_host_sync():
    # fit_jointly's scoring: the EMA model over validation batches kept on the device, the
    # probabilities left there; the caller reads them back once, after the pass.
    import warnings

    from pipeline.engine.loop import validation_batches
    from pipeline.models.backbones import create_backbone
    from pipeline.train.image_config import ImageTrainConfig
    from pipeline.train.image_fit import _head_probabilities, build_image_model
    from pipeline.train.image_inputs import collate_images

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights
        backbone = create_backbone("test_efficientnet", resolution=32)
    cpu = torch.device("cpu")
    config = ImageTrainConfig(head_hidden=16, decoder_embed=8, decoder_hidden=16)
    model = build_image_model(config, backbone.module, backbone.pooled_dim, 5, cpu)
    generator = torch.Generator().manual_seed(2)
    items = [(torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=generator), torch.zeros(5))
             for _ in range(5)]
    batches = validation_batches(items, 2, cpu, collate=collate_images)
    normalize_batch(items[0][0][None], PRE)  # its constants, built once by the training steps before
    recorder = SyncRecorder()
    with recorder:
        probs = _head_probabilities(model, batches, lambda raw: normalize_batch(raw, PRE), cpu, "fp32")
    assert_no_syncs(recorder.calls)
    assert probs.shape == (5, 5) and probs.device == cpu
