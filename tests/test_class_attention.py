"""Class-specific residual attention (CSRA, ``--csra-lambda``): the module's arithmetic, its
gradients, its place beside the image head, and its way through checkpoints and inference."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import train_efficientnet
from pipeline.branches.image import ImageHeads
from pipeline.checkpoint import load_checkpoint, load_probabilities, probabilities_path
from pipeline.config import run_main
from pipeline.data.dataset import DatasetPaths, load_train_val
from pipeline.engine.loop import TrainStep
from pipeline.features import ExtractionSettings, cached_features, pooled_output
from pipeline.prediction import BranchPredictor, Inputs, load_branch_checkpoints
from pipeline.models.backbones import create_backbone
from pipeline.models.decoder import LabelOrder
from pipeline.models.heads import ClassAttention
from pipeline.models.image_model import pool_features
from pipeline.train.image_config import ImageTrainConfig
from pipeline.train.image_fit import build_image_model, joint_loss
from tests.conftest import TINY_IMAGE_ARGS, make_tiny_dataset

pytestmark = pytest.mark.filterwarnings("ignore:backbone test_efficientnet:UserWarning")
PARTIAL = ["--mode", "partial", "--train-from-stage", "3", "--finetune-epochs", "2", "--warmup-epochs", "0.5"]
CPU = torch.device("cpu")


def tiny_backbone():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights
        return create_backbone("test_efficientnet", resolution=32)


def test_class_attention_computes_the_papers_logit_by_hand():
    """Per label: mean of its scores over positions + lambda * the softmax(T * scores)-weighted sum."""
    torch.manual_seed(0)
    attention = ClassAttention(channels=3, num_labels=2, lam=0.3, temperature=2.0)
    assert torch.equal(attention(torch.randn(4, 3, 2, 5)), torch.zeros(4, 2))  # zero start: the head alone
    with torch.no_grad():
        attention.weight.copy_(torch.randn(2, 3))
    maps = torch.randn(4, 3, 2, 5)
    logits = attention(maps)
    assert logits.shape == (4, 2)
    w, x = attention.weight.detach().numpy(), maps.flatten(2).numpy()  # (L, C), (B, C, N)
    scores = np.einsum("lc,bcn->bln", w, x)
    soft = np.exp(2.0 * scores) / np.exp(2.0 * scores).sum(axis=2, keepdims=True)
    np.testing.assert_allclose(logits.detach().numpy(), scores.mean(2) + 0.3 * (soft * scores).sum(2), rtol=1e-5)
    # A high temperature attends to the best position alone: the max of the scores.
    sharp = ClassAttention(3, 2, lam=1.0, temperature=1e4)
    sharp.load_state_dict({**attention.state_dict(), "lam": torch.tensor(1.0), "temperature": torch.tensor(1e4)})
    np.testing.assert_allclose(sharp(maps).detach().numpy(), scores.mean(2) + scores.max(2), rtol=1e-4)


def test_the_attention_is_a_residual_that_learns_beside_the_head():
    """With --csra-lambda the model adds the attention's logits to the head's: at the start they
    are zero (the model is exactly the head), and the first step's gradients reach them."""
    backbone = tiny_backbone()
    config = ImageTrainConfig(head_hidden=16, decoder_embed=8, decoder_hidden=16, csra_lambda=0.2,
                              csra_temperature=1.5)
    model = build_image_model(config, backbone.module, backbone.pooled_dim, 4, CPU).eval()
    assert model.attention.weight.shape == (4, backbone.feature_dim)
    assert float(model.attention.lam) == pytest.approx(0.2) and float(model.attention.temperature) == 1.5
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(images), model.head(pool_features(model.trunk(images))))
    targets = torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 0]])
    step = TrainStep(model.train(), joint_loss(config, lambda x: x, LabelOrder.from_train(targets), CPU))
    step(images, targets).backward()
    assert model.attention.weight.grad is not None and model.attention.weight.grad.abs().sum() > 0
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def test_by_default_joint_training_attends_with_lambda_0_2():
    """The default recipe's λ (None: 0.2 where there is a map): partial and finetune build the
    attention, at its zero start."""
    backbone = tiny_backbone()
    config = ImageTrainConfig(head_hidden=16, decoder_embed=8, decoder_hidden=16)
    assert config.csra_lambda is None
    model = build_image_model(config, backbone.module, backbone.pooled_dim, 4, CPU).eval()
    assert float(model.attention.lam) == pytest.approx(0.2) and float(model.attention.temperature) == 1.0
    assert torch.equal(model.attention.weight, torch.zeros(4, backbone.feature_dim))


def test_with_lambda_0_the_model_and_the_cache_are_the_plain_heads():
    backbone = tiny_backbone()
    config = ImageTrainConfig(head_hidden=16, decoder_embed=8, decoder_hidden=16, csra_lambda=0)
    model = build_image_model(config, backbone.module, backbone.pooled_dim, 4, CPU).eval()
    assert model.attention is None and not any("attention" in name for name, _ in model.named_parameters())
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(images), model.head(pool_features(model.trunk(images))))
    module, width, output = pooled_output(backbone)
    assert module is backbone.module and width == backbone.pooled_dim and output == "avg+max"
    features = torch.randn(3, backbone.pooled_dim)
    heads = ImageHeads(head=model.head)
    assert torch.equal(heads.head_probabilities(features), torch.sigmoid(model.head(features)))


def test_heads_without_an_image_head_say_so_instead_of_failing_on_none():
    with pytest.raises(ValueError, match="no image head: only the label decoder predicts"):
        ImageHeads().head_probabilities(torch.zeros(2, 4))


def test_extraction_appends_the_attention_logits_to_the_pooled_features(tmp_path):
    """The cache keeps one row per image: with an attention, the pooled values then its logits,
    under another key than the plain features (its digest), so neither is read for the other."""
    dataset = make_tiny_dataset(tmp_path / "tiny", n_train=6, n_test=0)
    backbone = tiny_backbone()
    attention = ClassAttention(backbone.feature_dim, 4, lam=0.2)
    with torch.no_grad():
        attention.weight.normal_()
    ids = [f"{i}.jpg" for i in range(6)]
    paths = DatasetPaths.resolve(dataset)
    settings = ExtractionSettings(cache_dir=tmp_path / "cache", device=CPU, workers=0, views=("plain",))
    plain, _ = cached_features(backbone, paths, ids, settings)
    with_attention, readable = cached_features(backbone, paths, ids, settings, attention=attention)
    assert readable.all() and with_attention.shape == (6, backbone.pooled_dim + 4)
    assert len(list((tmp_path / "cache").glob("features-*-avgmaxcsra-*"))) == 1
    assert torch.equal(with_attention[np.arange(6)][:, :backbone.pooled_dim], plain[np.arange(6)])
    from pipeline.data.images import ImageDataset
    from pipeline.data.transforms import build_transform

    images = ImageDataset(paths, ids, build_transform(backbone.preprocessing), 32)
    batch = torch.stack([images[i][0] for i in range(6)])
    with torch.no_grad():
        expected = attention(backbone.module.eval()(batch))
    torch.testing.assert_close(with_attention[np.arange(6)][:, backbone.pooled_dim:].float(), expected,
                               atol=2e-2, rtol=2e-2)  # float16 in the cache, batch norm folded


@pytest.fixture(scope="module")
def csra_run(tmp_path_factory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("csra")
    dataset = make_tiny_dataset(root / "tiny")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: False)
        summary = train_efficientnet.main(["--data", str(dataset), "--weights", str(root / "w"), *TINY_IMAGE_ARGS,
                                           *PARTIAL, "--csra-lambda", "0.3", "--csra-temperature", "2"])
    return dataset, root / "w", summary


def test_a_csra_checkpoint_predicts_in_inference_what_training_saved(csra_run, tmp_path):
    """The round trip: image.pt holds the trained attention; inference rebuilds it, extracts the
    attention logits with the features, and gives the validation probabilities training saved."""
    dataset, weights, summary = csra_run
    checkpoint = load_checkpoint(weights / "image.pt", branch="image")
    saved = checkpoint["class_attention"]["state_dict"]
    assert saved["weight"].abs().sum() > 0  # it trained away from its zero start
    assert float(saved["lam"]) == pytest.approx(0.3) and float(saved["temperature"]) == 2.0
    assert "class_attention" not in load_checkpoint(weights / "decoder.pt", branch="decoder")
    weights = Path(shutil.copytree(weights, tmp_path / "w"))
    checkpoints = load_branch_checkpoints(weights, ["image", "decoder"])
    paths = DatasetPaths.resolve(dataset)
    predictor = BranchPredictor(checkpoints, paths, CPU, 16, model_cache=weights / "cache")
    assert torch.equal(predictor.heads.attention.weight, saved["weight"])
    _, _, val = load_train_val(paths, 0.25)
    probs = predictor.probabilities(val, Inputs(paths, weights / "cache")).by_branch
    for branch in ("image", "decoder"):
        ids, _, expected = load_probabilities(probabilities_path(weights, branch))
        assert ids == val.drop_duplicates("ImageID")["ImageID"].tolist()
        np.testing.assert_allclose(probs[branch], expected, atol=1e-6)
    # And through a new extraction, without the cache.
    np.testing.assert_allclose(predictor.probabilities(val, Inputs(paths)).by_branch["image"], probs["image"],
                               atol=1e-6)


def test_by_default_frozen_mode_trains_without_attention_and_without_a_word(tmp_path, capsys, caplog):
    """Frozen mode has no map: the default λ is off there, neither an error nor a warning, and
    the summary's recipe says 0."""
    dataset = make_tiny_dataset(tmp_path / "tiny", n_train=8, n_test=0)
    argv = ["--data", str(dataset), "--weights", str(tmp_path / "w"), *TINY_IMAGE_ARGS, "--decoder-caption", "none"]
    assert run_main(train_efficientnet.main, train_efficientnet.get_args_parser(), argv) == 0
    summary = json.loads((tmp_path / "w" / "image_summary.json").read_text())
    assert summary["mode"] == "frozen" and summary["recipe"]["csra_lambda"] == 0.0
    assert summary["options_without_effect"] == []
    assert "csra" not in capsys.readouterr().err + caplog.text
    assert load_checkpoint(tmp_path / "w" / "image.pt", branch="image")["class_attention"] is None


def test_csra_in_frozen_mode_is_refused_naming_the_option(tmp_path, capsys):
    dataset = make_tiny_dataset(tmp_path / "tiny", n_train=8, n_test=0)
    argv = ["--data", str(dataset), "--weights", str(tmp_path / "w"), *TINY_IMAGE_ARGS, "--csra-lambda", "0.2"]
    assert run_main(train_efficientnet.main, train_efficientnet.get_args_parser(), argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --csra-lambda 0.2: class attention needs the spatial map") and err.count("\n") == 1
    assert not (tmp_path / "w" / "image.pt").exists()
    with pytest.raises(ValueError, match="--csra-lambda must be >= 0"):
        ImageTrainConfig(csra_lambda=-1).validate()
    with pytest.raises(ValueError, match="--csra-temperature must be > 0"):
        ImageTrainConfig(csra_temperature=0).validate()


def test_an_exported_csra_branch_gives_inferences_probabilities(csra_run, tmp_path):
    """The ONNX export carries the attention inside the model (``AttentionPooled``) and gives
    the probabilities inference gives (the same tolerance as tests/test_export.py)."""
    ort = pytest.importorskip("onnxruntime")
    from pipeline.data.images import ImageDataset
    from pipeline.data.transforms import build_transform
    from pipeline.tools.export import ExportConfig, build_exported_branch, export_image_branch

    dataset, weights, _ = csra_run
    weights = Path(shutil.copytree(weights, tmp_path / "w"))
    checkpoint = load_checkpoint(weights / "image.pt", branch="image")
    assert any(name.endswith("attention.weight") for name, _ in build_exported_branch(checkpoint).named_parameters())
    result = export_image_branch(ExportConfig(weights_dir=str(weights), format="onnx", out=str(tmp_path / "onnx"),
                                              data=str(dataset), val_fraction=0.25))
    frame = pd.read_csv(dataset / "test.csv")
    predictor = BranchPredictor({"image": checkpoint}, DatasetPaths.resolve(dataset), CPU, 16, runtime="torch")
    predictor.precision = "fp32"  # the export computes in fp32
    expected = predictor.probabilities(frame, Inputs(DatasetPaths.resolve(dataset))).by_branch["image"]
    preprocessing = checkpoint["preprocessing"]
    images = ImageDataset(DatasetPaths.resolve(dataset), frame["ImageID"].tolist(),
                          build_transform(preprocessing, normalize=False), preprocessing["resolution"])
    pixels = np.ascontiguousarray(torch.stack([images[i][0] for i in range(len(frame))]).numpy())
    session = ort.InferenceSession(result["model"][0], providers=["CPUExecutionProvider"])
    probs = session.run(["probabilities"], {"pixels": pixels})[0]
    assert np.abs(probs - expected).max() <= 1e-4


def test_a_joint_step_with_csra_and_a_caption_reading_decoder_has_no_host_sync():
    from tests.test_host_syncs import assert_no_syncs, run_epoch

    torch.manual_seed(0)
    backbone = tiny_backbone()
    config = ImageTrainConfig(head_hidden=16, decoder_embed=8, decoder_hidden=16, csra_lambda=0.2)
    model = build_image_model(config, backbone.module, backbone.pooled_dim, 5, CPU, caption_dim=6)
    targets = (torch.rand(4, 5, generator=torch.Generator().manual_seed(1)) < 0.4).float()
    step_loss = joint_loss(config, lambda x: x, LabelOrder.from_train(targets.numpy()), CPU)
    in_steps, _ = run_epoch(TrainStep(model, step_loss), [(torch.randn(4, 3, 32, 32), targets, torch.randn(4, 6))])
    assert_no_syncs(in_steps)
    assert model.attention.weight.grad is not None and model.decoder.caption_init.weight.grad is not None
