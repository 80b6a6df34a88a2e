"""Fine-tuning the image branch: the recipe's pieces, partial and end-to-end modes, inference
from their checkpoints, --resume, and the GPU rules that can be checked on a CPU."""

from __future__ import annotations

import ast
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

import inference
import train_efficientnet
from pipeline.checkpoint import load_checkpoint
from pipeline.data.dataset import DatasetPaths
from pipeline.engine.distributed import DistContext, all_ranks_agree, barrier, gather_shards, mean_across_ranks, wrap_model
from pipeline.engine.loop import ModelEma, TrainStep, parameter_groups, scaled_lr
from pipeline.features import ExtractionSettings, cached_stage_maps
from pipeline.train.image_fit import build_image_model, joint_loss
from pipeline.train.image_inputs import RandomViewSampler
from pipeline.train.image_config import ImageTrainConfig
from pipeline.models.backbones import create_backbone
from pipeline.models.stages import BackboneSplitError, split_backbone
from pipeline.models.decoder import LabelOrder
from tests.conftest import TINY_IMAGE_ARGS, count_extracted_rows, make_tiny_dataset
from tests.test_resume import SimulatedCrash, assert_same_checkpoints, crash_after

ROOT = Path(__file__).resolve().parents[1]
PARTIAL = ["--mode", "partial", "--train-from-stage", "3", "--finetune-epochs", "2", "--warmup-epochs", "0.5"]
FINETUNE = ["--mode", "finetune", "--finetune-epochs", "2", "--warmup-epochs", "0.5"]

pytestmark = pytest.mark.filterwarnings("ignore:backbone test_efficientnet:UserWarning")


def tiny_backbone(name: str = "test_efficientnet", resolution: int = 32):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights
        return create_backbone(name, resolution=resolution)


def v3_decay(update: int, decay: float) -> float:
    """timm ModelEmaV3's warm-up at the ``update``-th update (1-based), gamma 9, power 1, by hand."""
    t = update - 1
    return 0.0 if t <= 0 else min(decay, 1 - (1 + t / 9) ** -1)


def test_ema_decay_follows_the_v3_warm_up_and_reaches_the_decay_late():
    model = torch.nn.Linear(3, 2)
    ema = ModelEma(model, decay=0.999)
    assert ema.current_decay() == 0.0  # the first update copies the model
    for update in (1, 2, 101, 501, 2001, 10_000):
        assert ema.get_decay(update) == pytest.approx(v3_decay(update, 0.999), abs=1e-12)
    assert ema.get_decay(101) == pytest.approx(100 / 109)  # today's (1 + t) / (10 + t) one update later
    assert ema.get_decay(2001) == pytest.approx(2000 / 2009)
    assert ema.get_decay(100_000) == 0.999
    start = ema.module.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)  # decay 0: a copy
    torch.testing.assert_close(ema.module.weight, start + 1.0)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)  # decay 1/10: 90% of the way to the new weights
    assert ema.updates == 2 and ema.current_decay() == pytest.approx(0.1)
    torch.testing.assert_close(ema.module.weight, start + 1.9)
    assert ModelEma(model, decay=0.999, warmup=False).current_decay() == 0.999
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_ema_update_is_one_fused_lerp(monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    ema = ModelEma(model)
    calls = []
    lerp = torch._foreach_lerp_
    monkeypatch.setattr(torch, "_foreach_lerp_", lambda *a, **k: calls.append(len(a[0])) or lerp(*a, **k))
    ema.update(model)
    assert calls == [8]  # every float tensor (weights, biases, running statistics) in one call


def test_ema_state_round_trips_through_resume(tmp_path):
    from pipeline.engine.resume import ResumeState

    model = torch.nn.Linear(3, 2)
    ema = ModelEma(model, decay=0.999)
    state = ResumeState(tmp_path, "loop", "digest", resume=True)
    state.begin({"ema": ema}, None, 2)
    for _ in range(7):
        with torch.no_grad():
            model.weight.add_(0.5)
        ema.update(model)
    state.end_epoch(1, {"epoch": 1})
    restored = ModelEma(torch.nn.Linear(3, 2), decay=0.999)
    epoch, _ = ResumeState(tmp_path, "loop", "digest", resume=True).begin({"ema": restored}, None, 2)
    assert epoch == 2 and restored.updates == 7 and restored.current_decay() == ema.current_decay()
    assert torch.equal(restored.module.weight, ema.module.weight)
    for average in (ema, restored):  # and the next update continues the warm-up identically
        average.update(model)
    assert restored.current_decay() == pytest.approx(7 / 16)
    assert torch.equal(restored.module.weight, ema.module.weight)


def test_ema_copies_integer_buffers_and_averages_batch_norm_statistics():
    model = torch.nn.BatchNorm1d(2)
    ema = ModelEma(model)
    model.train()(torch.randn(8, 2) * 5 + 3)
    ema.update(model)
    assert int(ema.module.num_batches_tracked) == 1
    assert not torch.equal(ema.module.running_mean, torch.zeros(2))


def test_parameter_groups_spare_norms_and_biases_and_speed_up_new_modules():
    model = torch.nn.ModuleDict({"trunk": torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)),
                                 "head": torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3),
                                                             torch.nn.Linear(3, 2))})
    model["trunk"][1].weight.requires_grad_(False)  # frozen: in no group
    groups = parameter_groups(model, lr=1e-3, weight_decay=0.05, new_modules=("head",), new_lr_scale=10.0)
    names = {id(p): n for n, p in model.named_parameters()}
    found = {(g["lr"], g["weight_decay"]): sorted(names[id(p)] for p in g["params"]) for g in groups}
    assert found == {
        (1e-3, 0.05): ["trunk.0.weight"],
        (1e-3, 0.0): ["trunk.0.bias", "trunk.1.bias"],
        (1e-2, 0.05): ["head.0.weight", "head.2.weight"],
        (1e-2, 0.0): ["head.0.bias", "head.1.bias", "head.1.weight", "head.2.bias"],
    }
    assert len(groups) == 4
    assert scaled_lr(4e-4, 64) == pytest.approx(2e-4) and scaled_lr(4e-4, 1024) == pytest.approx(8e-4)


@pytest.mark.parametrize("name, stage", [("test_efficientnet", 3), ("efficientnet-b0", 5),
                                         ("mobilenetv3_small_050", 2)])
def test_split_backbone_front_then_tail_is_the_whole_backbone(name, stage):
    backbone = tiny_backbone(name, 64)
    front, tail = split_backbone(backbone, stage)
    images = torch.randn(2, 3, 64, 64)
    backbone.module.eval(), front.eval(), tail.eval()
    with torch.no_grad():
        torch.testing.assert_close(tail(front(images)), backbone.module(images))
    # The tail shares its tensors with the backbone: training it trains the backbone.
    whole = {t.data_ptr() for t in backbone.module.parameters()}
    assert {t.data_ptr() for t in tail.parameters()} <= whole
    assert not {t.data_ptr() for t in tail.parameters()} & {t.data_ptr() for t in front.parameters()}


def test_split_backbone_refuses_what_it_cannot_split():
    with pytest.raises(BackboneSplitError, match="--train-from-stage 9: test_efficientnet has stages 0..4"):
        split_backbone(tiny_backbone(), 9)
    with pytest.raises(BackboneSplitError, match="resnet18 has no stem and stage blocks"):
        split_backbone(tiny_backbone("resnet18"), 2)


@pytest.mark.parametrize("name", ["test_efficientnet", "efficientnet-b0"])
def test_a_fine_tuning_step_reaches_every_parameter(name):
    """DistributedDataParallel runs without find_unused_parameters: every parameter must get
    a gradient (efficientnet-pytorch's unused classifier is dropped for this)."""
    backbone = tiny_backbone(name, 32)
    config = ImageTrainConfig(head_hidden=16, decoder_embed=8, decoder_hidden=16)
    model = build_image_model(config, backbone.module, 2 * backbone.feature_dim, 4, torch.device("cpu"))
    targets = torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 0]])
    step = TrainStep(model, joint_loss(config, lambda x: x, LabelOrder.from_train(targets), torch.device("cpu")))
    loss = step(torch.randn(2, 3, 32, 32), targets)
    assert torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def test_random_view_sampler_draws_the_same_views_on_one_or_two_ranks():
    def indices(rank: int, world: int, epoch: int) -> list[int]:
        rows = DistributedSampler(range(10), num_replicas=world, rank=rank, shuffle=True, seed=3)
        sampler = RandomViewSampler(rows, 10, 2, seed=3)
        sampler.set_epoch(epoch)
        return list(sampler)

    one = indices(0, 1, 1)
    assert sorted(i % 10 for i in one) == list(range(10))  # every row once, as plain (i) or flipped (i + 10)
    assert {i // 10 for i in one} == {0, 1}
    two = indices(0, 2, 1) + indices(1, 2, 1)
    assert sorted(two) == sorted(one)
    assert indices(0, 1, 2) != one  # another epoch, other views and order
    assert indices(0, 1, 1) == one


def test_stage_map_cache_is_reused_and_a_cut_off_shard_is_rebuilt(tiny_dataset, tmp_path, monkeypatch):
    paths = DatasetPaths.resolve(tiny_dataset)
    ids = [f"{i}.jpg" for i in range(6)]
    backbone = tiny_backbone()
    front, _ = split_backbone(backbone, 3)
    settings = ExtractionSettings(cache_dir=tmp_path, device=torch.device("cpu"), batch_size=4, workers=0, shard_rows=4)
    maps = cached_stage_maps(backbone, front, 3, paths, ids, settings)
    assert maps.shape[0] == 6 and maps.views == ("plain", "flip") and maps.readable.all()
    plain, flip = maps.read("plain", range(6)), maps.read("flip", range(6))
    with torch.no_grad():
        one_map = front.eval()(torch.zeros(1, 3, 32, 32))
    assert plain.shape == (6, *one_map.shape[1:]) and np.isfinite(plain).all() and not np.array_equal(plain, flip)
    np.testing.assert_array_equal(maps.read("flip", [5, 0, 4, 3]), flip[[5, 0, 4, 3]])  # across the shard boundary

    extracted = count_extracted_rows(monkeypatch)
    again = cached_stage_maps(backbone, front, 3, paths, ids, settings)
    assert extracted == [] and np.array_equal(again.read("plain", range(6)), plain)
    flip_file = maps.store.path("flip", 1)
    flip_file.write_bytes(flip_file.read_bytes()[:300])  # cut off mid-write
    rebuilt = cached_stage_maps(backbone, front, 3, paths, ids, settings)
    assert extracted == [2] and np.array_equal(rebuilt.read("flip", range(6)), flip)  # only the last shard's 2 rows


def _train(dataset: Path, weights: Path, *extra: str) -> dict:
    return train_efficientnet.main(["--data", str(dataset), "--weights", str(weights),
                                    *TINY_IMAGE_ARGS, *extra])


def _infer(dataset: Path, weights: Path, output: Path) -> dict:
    return inference.main(["--data", str(dataset), "--weights", str(weights), "--output", str(output),
                           "--workers", "0", "--val-fraction", "0.25", "--evaluate", "--device", "cpu"])


def _stage(name: str) -> str:
    """The part of a timm EfficientNet a backbone state_dict key belongs to: "stem", "stage N" or "head"."""
    parts = name.split(".")  # model.conv_stem.weight, model.blocks.3.0.conv_pw.weight, model.bn2.bias ...
    if parts[1] == "blocks":
        return f"stage {parts[2]}"
    return {"conv_stem": "stem", "bn1": "stem", "conv_head": "head", "bn2": "head"}[parts[1]]


@pytest.fixture(scope="module", params=["partial", "finetune"])
def fine_tuned(request, tmp_path_factory) -> tuple[list[str], Path, Path, dict, dict]:
    """(options, dataset, weights, summary, initial backbone state_dict) of one fine-tuning run per mode.

    The backbone starts from a weights file, so the starting point is known exactly.
    """
    mode_args = PARTIAL if request.param == "partial" else FINETUNE
    root = tmp_path_factory.mktemp(request.param)
    dataset = make_tiny_dataset(root / "tiny")
    with torch.random.fork_rng():
        torch.manual_seed(1)
        start = timm.create_model("test_efficientnet", pretrained=False, num_classes=0).state_dict()
    torch.save(start, root / "start.pth")
    summary = _train(dataset, root / "w", *mode_args, "--backbone-weights", str(root / "start.pth"))
    initial = {f"model.{name}": value for name, value in start.items()}  # the checkpoint's names
    return mode_args, dataset, root / "w", summary, initial


def test_fine_tuning_changes_the_trained_stages_and_only_those(fine_tuned):
    mode_args, _, weights, summary, initial = fine_tuned
    assert summary["mode"] == mode_args[1]
    record = load_checkpoint(weights / "image.pt", branch="image")["backbone"]
    assert record["trained_from_stage"] == (3 if mode_args is PARTIAL else 0)
    saved = record["state_dict"]
    assert saved.keys() == initial.keys()
    assert {_stage(name) for name in saved} == {"stem", "head", *(f"stage {i}" for i in range(5))}
    # --train-from-stage 3 freezes the stem and stages 0-2; finetune trains everything. Every
    # tensor of a trained stage moves (batch-norm counters included), none of a frozen one.
    frozen = {"stem", "stage 0", "stage 1", "stage 2"} if mode_args is PARTIAL else set()
    unchanged = sorted(name for name in saved if torch.equal(saved[name], initial[name]))
    assert unchanged == sorted(name for name in saved if _stage(name) in frozen)


def test_every_mode_writes_the_same_summary_keys(fine_tuned, tiny_dataset, tmp_path):
    mode_args, _, weights, summary, _ = fine_tuned
    frozen = _train(tiny_dataset, tmp_path / "frozen")
    assert frozen["mode"] == "frozen" and summary["mode"] == mode_args[1]
    assert sorted(summary) == sorted(frozen)
    assert sorted(json.loads((weights / "image_summary.json").read_text())) == sorted(frozen)


def test_fine_tuned_checkpoints_run_in_inference(fine_tuned, tmp_path):
    mode_args, dataset, weights, summary, _ = fine_tuned
    record = load_checkpoint(weights / "image.pt", branch="image")["backbone"]
    assert record["weights"] == "finetuned" and record["weights_digest"].startswith("finetuned-")
    if mode_args is PARTIAL:
        assert list((weights / "cache").glob("stagemaps-*/plain-00000.npy"))
    weights = Path(shutil.copytree(weights, tmp_path / "w"))  # inference writes fusion.json beside the weights
    result = _infer(dataset, weights, tmp_path / "out")
    test_rows = len(pd.read_csv(dataset / "test.csv"))
    submission = pd.read_csv(tmp_path / "out" / "submission.csv")
    assert len(submission) == test_rows == result["rows"]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    # The evaluation recomputes the training's validation probabilities through the inference path.
    assert metrics["branches"]["image"]["samples_f1"] == pytest.approx(summary["image_val_samples_f1"], abs=1e-6)


@pytest.mark.parametrize("mode_args, loop", [(PARTIAL, "partial"), (FINETUNE, "finetune")],
                         ids=["partial", "finetune"])
def test_resumed_fine_tuning_equals_an_uninterrupted_run(tiny_dataset, tmp_path, monkeypatch, mode_args, loop):
    _train(tiny_dataset, tmp_path / "whole", *mode_args)
    with monkeypatch.context() as patch:
        crash_after(patch, loop, 1)
        with pytest.raises(SimulatedCrash):
            _train(tiny_dataset, tmp_path / "cut", *mode_args)
    assert (tmp_path / "cut" / "resume" / "image" / f"{loop}.pt").is_file()
    _train(tiny_dataset, tmp_path / "cut", *mode_args, "--resume")
    assert_same_checkpoints(tmp_path / "whole", tmp_path / "cut", ("image", "decoder"))


def test_auto_mode_is_partial_on_cpu_and_frozen_for_a_backbone_without_stages(tiny_dataset, tmp_path):
    assert _train(tiny_dataset, tmp_path / "a", "--mode", "auto", "--finetune-epochs", "1")["mode"] == "partial"
    auto = _train(tiny_dataset, tmp_path / "b", "--mode", "auto", "--backbone", "test_resnet")
    assert auto["mode"] == "frozen"
    with pytest.raises(BackboneSplitError, match="test_resnet has no stem"):
        _train(tiny_dataset, tmp_path / "c", "--mode", "partial", "--backbone", "test_resnet")


def test_loss_option_is_honoured_when_fine_tuning(tiny_dataset, tmp_path, monkeypatch):
    import pipeline.train.image_fit as image_branch

    asked = []
    original = image_branch.get_loss
    monkeypatch.setattr(image_branch, "get_loss", lambda name: asked.append(name) or original(name))
    _train(tiny_dataset, tmp_path / "w", *PARTIAL, "--loss", "asl", "--finetune-epochs", "1")
    assert asked == ["asl"]


def test_bad_fine_tuning_options_name_the_option(tiny_dataset, tmp_path):
    with pytest.raises(ValueError, match="--finetune-epochs must be >= 1"):
        _train(tiny_dataset, tmp_path / "w", *PARTIAL, "--finetune-epochs", "0")
    with pytest.raises(ValueError, match="--epochs must be >= 1"):
        _train(tiny_dataset, tmp_path / "w", "--epochs", "0")
    with pytest.raises(ValueError, match="--precision fp16 needs a CUDA device"):
        _train(tiny_dataset, tmp_path / "w", *PARTIAL, "--precision", "fp16")


class _Reached(Exception):
    """A fake collective was called with tensors on the right device."""


def test_every_collective_gets_its_tensors_on_the_contexts_device(monkeypatch):
    """NCCL takes CUDA tensors only, gloo CPU ones: a helper that built its tensor on the CPU
    passes every gloo test and crashes on GPUs. Here the context's device is ``meta``, which
    no helper could hit by accident, and the collectives check where their tensors are."""
    device = torch.device("meta")
    context = DistContext(rank=0, world_size=2, device=device, distributed=True)

    def check(*args, **kwargs):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        tensors += [t for a in args if isinstance(a, list) for t in a]
        assert tensors and all(t.device == device for t in tensors), [t.device for t in tensors]
        raise _Reached

    for name in ("all_reduce", "all_gather", "broadcast", "reduce", "all_gather_into_tensor"):
        monkeypatch.setattr(dist, name, check)
    calls = [lambda: all_ranks_agree(True, context), lambda: mean_across_ranks(2.0, 4, context),
             lambda: mean_across_ranks(torch.tensor(2.0), 4, context),
             lambda: gather_shards(torch.ones(3, 2), context, 5),
             lambda: gather_shards(torch.ones(3, dtype=torch.uint8), context, 5)]
    for call in calls:
        with pytest.raises(_Reached):
            call()
    barrier_devices = []
    monkeypatch.setattr(dist, "barrier", lambda device_ids=None: barrier_devices.append(device_ids))
    barrier(DistContext(world_size=2, device=torch.device("cuda", 1), distributed=True))
    assert barrier_devices == [[1]]


def test_only_the_distributed_module_calls_collectives():
    """Every collective goes through pipeline/distributed.py, where the device rule is kept."""
    offenders = []
    for path in (ROOT / "pipeline").rglob("*.py"):
        if path.name == "distributed.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import) and any(a.name.startswith("torch.distributed") for a in node.names):
                offenders.append(str(path))
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch.distributed"):
                offenders.append(str(path))
    assert offenders == []


def test_sync_bn_is_refused_on_cpu():
    context = DistContext(world_size=2, distributed=True)
    with pytest.raises(ValueError, match="--sync-bn: synchronised batch norm runs on GPUs only"):
        wrap_model(torch.nn.BatchNorm2d(3), context, sync_batch_norm=True)


def test_a_cache_hit_trains_the_same_model_as_a_cache_miss(tiny_dataset, tmp_path):
    """Extraction starts loaders, and each takes a seed from the global generator; training
    must not depend on whether that happened."""
    import shutil

    _train(tiny_dataset, tmp_path / "cold", *PARTIAL)
    shutil.copytree(tmp_path / "cold" / "cache", tmp_path / "warm" / "cache")
    _train(tiny_dataset, tmp_path / "warm", *PARTIAL)
    cold, warm = (load_checkpoint(tmp_path / run / "image.pt", branch="image") for run in ("cold", "warm"))
    assert cold["state_dict"].keys() == warm["state_dict"].keys()
    for name, tensor in cold["state_dict"].items():
        assert torch.equal(tensor, warm["state_dict"][name]), name
