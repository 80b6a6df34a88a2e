"""DDP hazards under 2 gloo processes: unused backbone parameters, rank 0's stop decisions,
SyncBatchNorm left in a saved model, per-rank random generators on --resume, --sync-bn auto."""

from __future__ import annotations

import copy
import json
import os
import random
import socket
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from timm.layers import BatchNormAct2d, convert_sync_batchnorm
from torch import nn

from pipeline.engine.distributed import (
    DistContext,
    barrier,
    distributed_session,
    resolve_sync_bn,
    revert_sync_batchnorm,
    unused_parameters,
    wrap_model,
)
from pipeline.engine.loop import EpochScore, TrainStep, fit
from pipeline.engine.resume import ResumeState
from pipeline.io import CheckpointError
from pipeline.models.backbones import create_backbone
from pipeline.models.decoder import LabelOrder
from pipeline.models.image_model import pool_features
from pipeline.train.image_config import ImageTrainConfig
from pipeline.train.image_fit import build_image_model, joint_loss

# The test backbones have random weights, and say so.
pytestmark = pytest.mark.filterwarnings("ignore:backbone .*RANDOM initialisation:UserWarning")
CPU = torch.device("cpu")
TINY_HEADS = ImageTrainConfig(head_hidden=8, decoder_embed=4, decoder_hidden=8, head_dropout=0.0, decoder_dropout=0.0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(rank: int, worker, port: int, out: Path, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # the random-weights warning of the test backbones
    with distributed_session(CPU) as (context, _):
        result = worker(context, *args)
    (out / f"rank{rank}.json").write_text(json.dumps(result))


def two_ranks(worker, out: Path, *args, timeout: float = 180.0) -> list:
    """Run ``worker(context, *args)`` in 2 gloo processes; each one's JSON-able result, by rank.

    Ranks that fell out of step would wait in a collective until the group's timeout, so they
    are killed after ``timeout`` seconds and the test fails.
    """
    processes = mp.start_processes(_rank_main, args=(worker, _free_port(), out, args), nprocs=2, join=False,
                                   start_method="spawn")
    deadline = time.monotonic() + timeout
    while not processes.join(timeout=2):
        if time.monotonic() > deadline:
            for process in processes.processes:
                process.kill()
            pytest.fail(f"the 2 ranks of {worker.__name__} did not finish within {timeout} s")
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]


# ---------------------------------------------------------------- unused parameters

def _image_step(name: str) -> tuple[TrainStep, torch.Tensor, torch.Tensor]:
    """The joint training step of a random-weights timm backbone with tiny heads, and a probe batch."""
    torch.manual_seed(0)
    backbone = create_backbone(name)
    model = build_image_model(TINY_HEADS, backbone.module, backbone.pooled_dim, 4, CPU)
    targets = torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 1]])
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    return TrainStep(model, joint_loss(TINY_HEADS, lambda x: x, LabelOrder.from_train(targets), CPU)), images, targets


class _Alternating(nn.Module):
    """A module whose second branch runs every other call: conditionally unused."""

    def __init__(self) -> None:
        super().__init__()
        self.always, self.sometimes, self.never = nn.Linear(3, 1), nn.Linear(3, 1), nn.Linear(3, 1)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = self.always(x)
        return (out + self.sometimes(x) if self.calls % 2 else out).sum()


def _train_iterations(context: DistContext, step: nn.Module, batches) -> None:
    optimizer = torch.optim.SGD([p for p in step.parameters() if p.requires_grad], lr=0.1)
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        step(*batch).backward()
        optimizer.step()


def _ddp_unused_worker(context: DistContext, names: list[str]) -> dict:
    result = {}
    for name in names:
        step, images, targets = _image_step(name)
        plain = copy.deepcopy(step)
        before = {n: p.detach().clone() for n, p in step.named_parameters()}
        wrapped = wrap_model(step, context, probe=lambda m: m(images, targets))
        # This rank's own images, three iterations: DDP refuses a missing gradient from the second on.
        own = torch.randn(3, 2, 3, 64, 64, generator=torch.Generator().manual_seed(10 + context.rank))
        _train_iterations(context, wrapped, [(own[i], targets) for i in range(3)])
        try:  # the hazard itself: the same model wrapped without the probe
            _train_iterations(context, wrap_model(plain, context), [(own[i], targets) for i in range(2)])
            unprobed = "trained"
        except RuntimeError as err:
            unprobed = str(err)
        result[name] = {
            "frozen": sorted(n for n, p in step.named_parameters() if not p.requires_grad),
            "find_unused": wrapped.find_unused_parameters,
            "changed": sorted(n for n, p in step.named_parameters() if not torch.equal(p, before[n])),
            "digest": float(sum(p.double().sum() for p in step.parameters())),
            "unprobed": unprobed,
        }
    torch.manual_seed(0)
    alternating = _Alternating()
    wrapped = wrap_model(alternating, context, probe=lambda m: m(torch.ones(2, 3)))
    _train_iterations(context, wrapped, [(torch.ones(2, 3) * (context.rank + 1),)] * 3)
    result["alternating"] = {"frozen": sorted(n for n, p in alternating.named_parameters() if not p.requires_grad),
                             "find_unused": wrapped.find_unused_parameters}
    return result


def test_the_probe_step_freezes_the_unused_timm_heads_and_ddp_trains_past_iteration_two(tmp_path):
    ranks = two_ranks(_ddp_unused_worker, tmp_path, ["mobilenetv3_small_050", "convnext_atto"])
    expected_frozen = {"mobilenetv3_small_050": ["model.trunk.model.conv_head.bias", "model.trunk.model.conv_head.weight"],
                       "convnext_atto": ["model.trunk.model.head.norm.bias", "model.trunk.model.head.norm.weight"]}
    for name, frozen in expected_frozen.items():
        zero, one = ranks[0][name], ranks[1][name]
        assert zero["frozen"] == one["frozen"] == frozen
        assert zero["find_unused"] is one["find_unused"] is False
        # Every trainable parameter moved, and identically on both ranks (the gradients were averaged).
        assert len(zero["changed"]) > 10 and not set(zero["changed"]) & set(frozen)
        assert zero["digest"] == pytest.approx(one["digest"], rel=1e-6, abs=1e-6)
        assert "Expected to have finished reduction" in zero["unprobed"], zero["unprobed"]
    # A parameter the probe reaches only sometimes stays trainable and turns the search on.
    assert ranks[0]["alternating"] == {"frozen": ["never.bias", "never.weight"], "find_unused": True}


def test_unused_parameters_leaves_the_module_and_the_random_stream_untouched():
    step, images, targets = _image_step("mobilenetv3_small_050")
    state = {k: v.clone() for k, v in step.state_dict().items()}
    torch.manual_seed(5)
    never, sometimes = unused_parameters(step, lambda m: m(images, targets))
    after_probe = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after_probe, torch.rand(3))
    assert never == ["model.trunk.model.conv_head.weight", "model.trunk.model.conv_head.bias"] and sometimes == []
    assert all(torch.equal(v, state[k]) for k, v in step.state_dict().items())  # batch-norm statistics included
    assert all(p.grad is None and p.requires_grad for p in step.parameters())


def test_token_and_channels_last_backbones_give_channel_first_maps():
    vit = create_backbone("test_vit")  # (B, 1 + 100, 64) tokens at 160 px
    images = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(0))
    tokens = vit.module.model.forward_features(images)
    maps = vit.module(images)
    assert tokens.shape == (2, 101, 64) and maps.shape == (2, 64, 100, 1)
    patches = tokens[:, 1:]
    torch.testing.assert_close(pool_features(maps), torch.cat([patches.mean(1), patches.amax(1)], dim=1))
    assert pool_features(maps).shape == (2, vit.pooled_dim)

    mambaout = create_backbone("test_mambaout")  # NHWC
    nhwc = mambaout.module.model.forward_features(images[:, :, :64, :64])
    maps = mambaout.module(images[:, :, :64, :64])
    assert nhwc.shape[-1] == mambaout.feature_dim and maps.shape[1] == mambaout.feature_dim
    torch.testing.assert_close(maps, nhwc.permute(0, 3, 1, 2))


# ---------------------------------------------------------------- the stop decision

def _stop_worker(context: DistContext) -> dict:
    # Rank 0's scores never improve on epoch 1; rank 1's rise by one unit in the last place each epoch,
    # so rank 1 alone would keep improving, never stop and keep epoch 6.
    flat, rising = [0.5] * 6, [0.5]
    for _ in range(5):
        rising.append(float(np.nextafter(rising[-1], 1.0)))
    scores = flat if context.rank == 0 else rising
    trained = []
    module = nn.Linear(1, 1)

    def train_epoch(epoch: int) -> float:
        trained.append(epoch)
        return 0.0

    best = fit("stop", 6, train_epoch, lambda epoch: EpochScore(scores[epoch - 1]), module, ResumeState.off(), {},
               patience=2, context=context)
    return {"epochs": trained, "best": best["epoch"], "score": best["score"]}


def test_ranks_whose_scores_differ_in_the_last_bit_stop_together_at_rank_0s_decision(tmp_path):
    zero, one = two_ranks(_stop_worker, tmp_path)
    assert zero["epochs"] == one["epochs"] == [1, 2, 3]
    assert zero["best"] == one["best"] == 1
    assert zero["score"] == one["score"] == 0.5


# ---------------------------------------------------------------- SyncBatchNorm reverted

def test_revert_sync_batchnorm_restores_the_plain_layers_with_their_trained_state():
    torch.manual_seed(0)
    model = create_backbone("test_efficientnet").module  # BatchNormAct2d throughout
    model.add_module("extra", nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))
    images = torch.randn(4, 3, 64, 64)
    model.train()
    model(images)  # running statistics away from their initial values
    original_types = [type(m) for m in model.modules()]
    synced = convert_sync_batchnorm(copy.deepcopy(model))
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in synced.modules()) > 10
    with torch.no_grad():  # what training under --sync-bn would change
        for layer in synced.modules():
            if isinstance(layer, nn.SyncBatchNorm):
                layer.running_mean.add_(0.25)
                layer.weight.mul_(1.5)
    synced.eval()
    expected_state = {k: v.clone() for k, v in synced.state_dict().items()}
    expected = synced(images)
    reverted = revert_sync_batchnorm(synced)
    assert reverted is synced
    assert [type(m) for m in reverted.modules()] == original_types
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in reverted.modules())
    assert all(isinstance(m.act, nn.Module) for m in reverted.modules() if isinstance(m, BatchNormAct2d))
    state = reverted.state_dict()
    assert state.keys() == expected_state.keys()
    assert all(torch.equal(state[k], v) for k, v in expected_state.items())
    assert not reverted.training
    torch.testing.assert_close(reverted(images), expected, rtol=0, atol=0)


# ---------------------------------------------------------------- per-rank generators on --resume

class _Crash(RuntimeError):
    pass


def _rng_run(context: DistContext, directory: Path, resume: bool, crash_at: int | None, seed: int) -> list:
    """Four epochs, each drawing from torch's, NumPy's and Python's generators; the draws, by epoch."""
    torch.manual_seed(seed + context.rank)
    np.random.seed(seed + context.rank)
    random.seed(seed + context.rank)
    module = nn.Linear(1, 1)
    draws = []

    def train_epoch(epoch: int) -> float:
        if epoch == crash_at:
            raise _Crash(f"epoch {epoch}")
        draws.append([epoch, torch.rand(()).item(), float(np.random.rand()), random.random()])
        return 0.0

    state = ResumeState(directory, "loop", "digest", resume, context)
    try:
        fit("rng", 4, train_epoch, lambda epoch: EpochScore(None), module, state, {"model": module}, context=context)
    except _Crash:
        pass
    return draws


def _rng_worker(context: DistContext, directory: str) -> dict:
    whole = _rng_run(context, Path(directory, "whole"), False, None, 0)
    cut = _rng_run(context, Path(directory, "cut"), False, 3, 0)
    # A relaunch starts once rank 0 has written; in one process the other rank must wait for that.
    barrier(context)
    # Resumed with other seeds: the saved generators of each rank must take over.
    return {"whole": whole, "cut": cut, "resumed": _rng_run(context, Path(directory, "cut"), True, None, 1000)}


def test_a_resumed_two_process_run_draws_what_the_uninterrupted_one_drew(tmp_path):
    ranks = two_ranks(_rng_worker, tmp_path, str(tmp_path))
    assert ranks[0]["whole"] != ranks[1]["whole"]  # each rank draws its own numbers
    for rank, runs in enumerate(ranks):
        assert [row[0] for row in runs["cut"]] == [1, 2]
        assert runs["cut"] == runs["whole"][:2]
        assert runs["resumed"] == runs["whole"][2:], f"rank {rank}"

    single = ResumeState(tmp_path / "cut", "loop", "digest", resume=True, context=DistContext())
    with pytest.raises(CheckpointError, match=r"loop\.pt: saved by a run of 2 processes, this one has 1"):
        single.begin({"model": nn.Linear(1, 1)}, None, 4)


# ---------------------------------------------------------------- --sync-bn auto

@pytest.mark.parametrize("option, device, global_batch, world, expected", [
    (None, "cuda", 64, 4, True),     # 16 images per process
    (None, "cuda", 128, 4, False),   # 32 per process: its own statistics are steady enough
    (None, "cuda", 16, 1, False),    # one process: nothing to synchronise
    (None, "cpu", 8, 2, False),      # gloo has no synchronised batch norm
    (False, "cuda", 8, 4, False),    # --no-sync-bn
    (True, "cuda", 512, 4, True),    # --sync-bn
])
def test_sync_bn_auto_is_on_for_small_per_process_batches_on_gpus(option, device, global_batch, world, expected):
    assert resolve_sync_bn(option, torch.device(device), global_batch, world) is expected
    assert ImageTrainConfig().sync_bn is None
