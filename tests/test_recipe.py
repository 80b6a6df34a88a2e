"""The training recipe each mode resolves to: per-mode defaults, explicit options over them, the
EMA decay from the run's length, layer-wise learning-rate decay, drop path, fused AdamW, and a
tiny end-to-end run that records what it trained with."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import train_efficientnet
from pipeline.config import parse_config
from pipeline.io import OptionError
from pipeline.engine.loop import scaled_lr
from pipeline.models.backbones import create_backbone
from pipeline.train.image_config import FINETUNE, FROZEN, PARTIAL, ImageTrainConfig, Recipe, ema_decay, resolve_recipe
from pipeline.train.image_fit import build_image_model, build_optimizer, fused_adamw
from tests.conftest import TINY_IMAGE_ARGS

pytestmark = pytest.mark.filterwarnings("ignore:backbone test_efficientnet:UserWarning")


def _config(*argv: str) -> ImageTrainConfig:
    """The settings train_efficientnet.py runs with for ``argv``, checked as it checks them."""
    return parse_config(ImageTrainConfig, train_efficientnet.get_args_parser(), list(argv))


def test_each_mode_resolves_to_its_defaults():
    config = _config()
    assert resolve_recipe(config, FINETUNE) == Recipe(epochs=25, weight_decay=0.05, layer_decay=0.8, drop_path=0.1,
                                                        augment="trivial", scale_jitter=0.7, loss="bce", csra_lambda=0.2)
    # Partial mode trains one or two top stages on cached maps: one rate, no drop path, and the
    # cached mirror image its only augmentation.
    assert resolve_recipe(config, PARTIAL) == Recipe(epochs=6, weight_decay=1e-4, layer_decay=1.0, drop_path=0.0,
                                                       augment="none", scale_jitter=1.0, loss="bce", csra_lambda=0.2)
    # Frozen mode has no spatial map for class attention: its default is off there.
    assert resolve_recipe(config, FROZEN) == Recipe(epochs=12, weight_decay=1e-4, layer_decay=1.0, drop_path=0.0,
                                                      augment="none", scale_jitter=1.0, loss="bce", csra_lambda=0.0)


def test_explicit_options_override_the_mode_defaults():
    config = _config("--finetune-epochs", "3", "--weight-decay", "0.01", "--layer-decay", "0.5", "--drop-path", "0.2",
                     "--augment", "light", "--scale-jitter", "0.9", "--loss", "asl", "--epochs", "4")
    assert resolve_recipe(config, FINETUNE) == Recipe(epochs=3, weight_decay=0.01, layer_decay=0.5, drop_path=0.2,
                                                        augment="light", scale_jitter=0.9, loss="asl", csra_lambda=0.2)
    assert resolve_recipe(config, PARTIAL) == Recipe(epochs=3, weight_decay=0.01, layer_decay=0.5, drop_path=0.2,
                                                       augment="none", scale_jitter=1.0, loss="asl", csra_lambda=0.2)
    # Frozen mode has no backbone to decay or drop: only the weight decay and --epochs apply.
    assert resolve_recipe(config, FROZEN) == Recipe(epochs=4, weight_decay=0.01, layer_decay=1.0, drop_path=0.0,
                                                      augment="none", scale_jitter=1.0, loss="asl", csra_lambda=0.0)
    # An explicit 0 is an option given, not "use the default".
    zero = _config("--weight-decay", "0", "--drop-path", "0", "--csra-lambda", "0")
    assert resolve_recipe(zero, FINETUNE).weight_decay == 0.0 and resolve_recipe(zero, FINETUNE).drop_path == 0.0
    assert resolve_recipe(zero, PARTIAL).csra_lambda == 0.0
    assert resolve_recipe(_config("--csra-lambda", "0.1"), FINETUNE).csra_lambda == 0.1


@pytest.mark.parametrize("option, value", [("--layer-decay", "0"), ("--layer-decay", "1.5"), ("--drop-path", "1"),
                                           ("--weight-decay", "-0.1"), ("--scale-jitter", "0"),
                                           ("--ema-decay", "1")])
def test_out_of_range_recipe_options_name_the_option(option, value):
    with pytest.raises(OptionError, match=f"{option} must be"):
        _config(option, value)


def test_ema_decay_follows_the_run_length_unless_given():
    config = _config()
    assert ema_decay(config, 1_000) == pytest.approx(0.99, abs=1e-12)
    assert ema_decay(config, 100_000) == pytest.approx(0.9999, abs=1e-12)
    assert ema_decay(config, 10_000_000) == 0.9999  # capped
    for updates in (0, 1, 10):
        assert ema_decay(config, updates) == 0.0  # so short a run keeps its last weights
    assert ema_decay(_config("--ema-decay", "0.9998"), 1_000) == 0.9998


def _stage_of(name: str) -> int:
    """The layer-decay stage of a test_efficientnet trunk parameter: the stem 0, blocks.i i + 1,
    the head convolution with the last block stage (5)."""
    part = name.split(".")[2]  # trunk.model.<part>...
    if part == "blocks":
        return int(name.split(".")[3]) + 1
    return {"conv_stem": 0, "bn1": 0, "conv_head": 5, "bn2": 5}[part]


def test_layer_decay_gives_each_stage_its_exact_learning_rate():
    config = _config("--layer-decay", "0.5", "--batch-size", "64", "--head-hidden", "16", "--decoder-embed", "8",
                     "--decoder-hidden", "16")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights
        backbone = create_backbone("test_efficientnet", resolution=32)
    cpu = torch.device("cpu")
    model = build_image_model(config, backbone.module, backbone.pooled_dim, 4, cpu)
    optimizer, lr = build_optimizer(config, model, cpu, resolve_recipe(config, FINETUNE))
    assert lr == scaled_lr(4e-4, 64)
    found = {id(p): (group["lr"], group["weight_decay"]) for group in optimizer.param_groups for p in group["params"]}
    named = dict(model.named_parameters())
    assert set(found) == {id(p) for p in named.values()}  # every parameter in exactly one group
    assert len(found) == sum(len(g["params"]) for g in optimizer.param_groups)
    for name, param in named.items():
        decay = 0.0 if param.ndim <= 1 else 0.05
        if name.startswith(("head.", "decoder.", "attention.")):  # the new modules (class attention by default)
            assert found[id(param)] == (lr * 5.0, decay), name
        else:
            # Six stages (stem, blocks 0-4 with the head convolution): 0.5 ** (5 - stage), exact
            # in binary floating point.
            assert found[id(param)] == (lr * 0.5 ** (5 - _stage_of(name)), decay), name
    assert min(g["lr"] for g in optimizer.param_groups) == lr / 32  # the stem


def test_drop_path_reaches_the_model():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        timm_blocks = create_backbone("test_efficientnet", resolution=32, drop_path=0.1).module.model.blocks
        plain = create_backbone("test_efficientnet", resolution=32).module.model.blocks
        pytorch = create_backbone("efficientnet-b0", drop_path=0.1).module.model
    # timm spreads the rate linearly over its 5 blocks: block i drops a path with 0.1 * i / 5.
    rates = [getattr(stage[0].drop_path, "drop_prob", 0.0) for stage in timm_blocks]
    assert rates == pytest.approx([0.0, 0.02, 0.04, 0.06, 0.08], abs=1e-12)
    assert all(not hasattr(stage[0].drop_path, "drop_prob") for stage in plain)
    assert pytorch._global_params.drop_connect_rate == 0.1


def test_fused_adamw_on_cuda_only():
    assert fused_adamw(torch.device("cuda")) is True
    assert fused_adamw(torch.device("cuda", 1)) is True
    assert fused_adamw(torch.device("cpu")) is False
    assert fused_adamw(torch.device("meta")) is False


def test_a_tiny_end_to_end_run_records_its_resolved_recipe(tiny_dataset, tmp_path, monkeypatch):
    import pipeline.train.image as image_module
    import pipeline.train.image_fit as image_fit

    asked, losses = [], []
    create, train_one_epoch = image_module.create_backbone, image_fit.train_one_epoch

    def recording_create(*args, **kwargs):
        asked.append(args[4] if len(args) > 4 else kwargs.get("drop_path"))
        return create(*args, **kwargs)

    def recording_epoch(*args, **kwargs):
        losses.append(train_one_epoch(*args, **kwargs))
        return losses[-1]

    monkeypatch.setattr(image_module, "create_backbone", recording_create)
    monkeypatch.setattr(image_fit, "train_one_epoch", recording_epoch)
    summary = train_efficientnet.main(["--data", str(tiny_dataset), "--weights", str(tmp_path / "w"),
                                       *TINY_IMAGE_ARGS, "--mode", "finetune", "--augment", "trivial",
                                       "--finetune-epochs", "2", "--warmup-epochs", "0.5"])
    assert summary["mode"] == "finetune"
    assert asked == [0.1]  # the end-to-end default, handed to the backbone that trains
    assert len(losses) == 2 and all(math.isfinite(loss) and loss > 0 for loss in losses)
    assert 0.0 <= summary["image_val_samples_f1"] <= 1.0
    # 36 training images in batches of 16 for 2 epochs: so few updates that the EMA keeps the
    # last weights (1 - 10 / updates < 0).
    assert summary["recipe"] == {"epochs": 2, "weight_decay": 0.05, "layer_decay": 0.8, "drop_path": 0.1,
                                 "augment": "trivial", "scale_jitter": 0.7, "loss": "bce", "csra_lambda": 0.2,
                                 "ema_decay": 0.0}
