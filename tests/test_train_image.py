"""train_efficientnet.py end to end on tiny data, and the image head pieces."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

import train_efficientnet
from pipeline.checkpoint import load_checkpoint, load_probabilities
from pipeline.data.dataset import validation_mask
from pipeline.data.images import ImageReadError
from pipeline.engine.history import read_history
from pipeline.engine.loop import NonFiniteLossError, TrainStep, train_one_epoch
from pipeline.metrics import tune_global_threshold
from pipeline.models.backbones import create_backbone
from pipeline.models.heads import FeatureNorm, ImageHead, get_loss
from tests.conftest import TINY_IMAGE_ARGS, count_extracted_rows


def test_image_head_shapes_and_gradients():
    head = ImageHead(12, 5, hidden=8)
    logits = head(torch.randn(4, 12))
    assert logits.shape == (4, 5) and (head.in_dim, head.num_labels) == (12, 5)
    assert ImageHead(12, 5, hidden=0).num_labels == 5
    get_loss("bce")(logits, torch.ones(4, 5)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


def test_asymmetric_loss_equals_the_formula_worked_by_hand():
    logits = np.array([[2.0, -1.0, 0.5], [-3.0, 0.0, 4.0]])
    targets = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    # Ridnik et al. 2021 with gamma_neg 4, gamma_pos 0, clip 0.05: positives -log(p); negatives
    # -p_m^4 log(1 - p_m) with the shifted p_m = max(p - 0.05, 0); summed over labels, mean over rows.
    p = 1 / (1 + np.exp(-logits))
    p_m = np.maximum(p - 0.05, 0)
    per_label = np.where(targets == 1, -np.log(p), -(p_m ** 4) * np.log(1 - p_m))
    expected = per_label.sum(axis=1).mean()
    loss = get_loss("asl")(torch.tensor(logits, dtype=torch.float32), torch.tensor(targets, dtype=torch.float32))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert get_loss("bce")(torch.zeros(2, 3), torch.ones(2, 3)).item() == pytest.approx(np.log(2))
    with pytest.raises(ValueError, match="valid: bce, asl"):
        get_loss("focal")


def test_feature_norm_standardises_with_training_statistics():
    x = torch.randn(100, 3) * torch.tensor([1.0, 10.0, 100.0]) + 5
    z = FeatureNorm(3).fit_chunks(x.split(30))(x)
    torch.testing.assert_close(z.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(0), torch.ones(3), atol=1e-5, rtol=0)


def test_non_finite_loss_names_epoch_and_step():
    model = torch.nn.Linear(2, 1)
    batches = [(torch.ones(1, 2),), (torch.full((1, 2), float("nan")),)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(NonFiniteLossError, match="epoch 3, step 1"):
        train_one_epoch(TrainStep(model, lambda m, b: m(b[0]).sum()), batches, optimizer, torch.device("cpu"),
                        epoch=3, progress=False)


def test_train_efficientnet_main_writes_both_heads(tiny_dataset, tmp_path):
    weights = tmp_path / "weights"
    with pytest.warns(UserWarning, match="RANDOM"):
        summary = train_efficientnet.main(["--data", str(tiny_dataset), "--weights", str(weights),
                                           *TINY_IMAGE_ARGS])
    assert summary["mode"] == "frozen"
    image = load_checkpoint(weights / "image.pt", branch="image", label_ids=[1, 3, 18, 19])
    decoder = load_checkpoint(weights / "decoder.pt", branch="decoder")
    assert image["backbone"]["name"] == "test_efficientnet"
    assert image["preprocessing"]["resolution"] == 32
    assert sorted(decoder["label_order"]) == [0, 1, 2, 3]
    for branch in ("image", "decoder"):
        ids, labels, probs = load_probabilities(weights / f"val_probs_{branch}.csv")
        assert labels == [1, 3, 18, 19] and probs.shape == (len(ids), 4)
        assert np.isfinite(probs).all() and (probs >= 0).all() and (probs <= 1).all()
    # The reported score is the tuned-threshold samples-F1 of the saved validation probabilities.
    ids, _, probs = load_probabilities(weights / "val_probs_image.csv")
    labels = pd.read_csv(tiny_dataset / "train.csv", dtype=str).set_index("ImageID").loc[ids, "Labels"]
    truth = np.array([[str(label) in row.split() for label in (1, 3, 18, 19)] for row in labels], dtype=int)
    assert summary["image_val_samples_f1"] == pytest.approx(tune_global_threshold(truth, probs)[1], abs=1e-4)
    config = json.loads((weights / "image_config.json").read_text())
    assert config["backbone"] == "test_efficientnet" and config["seed"] == 0
    assert len(list((weights / "cache").glob("features-*"))) == 1


def test_same_command_gives_the_same_result(tiny_dataset, tmp_path):
    results = []
    for run in ("a", "b"):
        weights = tmp_path / run
        with pytest.warns(UserWarning):
            train_efficientnet.main(["--data", str(tiny_dataset), "--weights", str(weights), *TINY_IMAGE_ARGS])
        results.append(load_probabilities(weights / "val_probs_image.csv")[2])
    np.testing.assert_array_equal(results[0], results[1])


def test_unreadable_training_images_are_listed(tiny_dataset, tmp_path):
    (tiny_dataset / "data" / "3.jpg").write_bytes(b"not a jpeg")
    (tiny_dataset / "data" / "5.jpg").unlink()
    with pytest.warns(UserWarning), pytest.raises(ImageReadError, match=r"2 image file\(s\)[\s\S]*3\.jpg[\s\S]*5\.jpg"):
        train_efficientnet.main(["--data", str(tiny_dataset), "--weights", str(tmp_path / "w"), *TINY_IMAGE_ARGS])


@pytest.mark.parametrize("mode", ["frozen", "partial", "finetune"])
def test_skip_bad_images_trains_on_the_rest_and_reports_them(tiny_dataset, tmp_path, mode):
    (tiny_dataset / "data" / "3.jpg").write_bytes(b"not a jpeg")
    (tiny_dataset / "data" / "5.jpg").unlink()
    weights = tmp_path / "w"
    args = ["--data", str(tiny_dataset), "--weights", str(weights), *TINY_IMAGE_ARGS, "--mode", mode,
            "--finetune-epochs", "1"]
    with pytest.warns(UserWarning), pytest.raises(ImageReadError, match="--skip-bad-images"):
        train_efficientnet.main(args)
    with pytest.warns(UserWarning):
        train_efficientnet.main([*args, "--skip-bad-images"])
    # Every validation row keeps a row of probabilities; an unreadable one holds NaN.
    val_ids, _, probs = load_probabilities(weights / "val_probs_image.csv")
    train_rows = pd.read_csv(tiny_dataset / "train.csv")
    assert len(val_ids) == len(train_rows) - int((~validation_mask(train_rows.ImageID, 0.25)).sum())
    for image_id, row in zip(val_ids, probs):
        assert np.isnan(row).all() == (image_id in ("3.jpg", "5.jpg"))
    assert (weights / "skipped_images.txt").read_text().count(".jpg") == 2
    assert json.loads((weights / "image_summary.json").read_text())["skipped_unreadable_images"] == 2


def test_finetune_mode_trains_end_to_end_and_saves_the_backbone(tiny_dataset, tmp_path):
    weights = tmp_path / "weights"
    with pytest.warns(UserWarning, match="RANDOM"):
        summary = train_efficientnet.main(["--data", str(tiny_dataset), "--weights", str(weights),
                                           *TINY_IMAGE_ARGS, "--mode", "finetune", "--finetune-epochs", "2",
                                           "--warmup-epochs", "0.5"])
    assert summary["mode"] == "finetune"
    image = load_checkpoint(weights / "image.pt", branch="image")
    assert image["backbone"]["weights"] == "finetuned"
    assert image["backbone"]["weights_digest"].startswith("finetuned-")
    assert "conv_stem.weight" in "".join(image["backbone"]["state_dict"])
    probs = load_probabilities(weights / "val_probs_decoder.csv")[2]
    assert np.isfinite(probs).all()
    history = read_history(weights / "history_image.csv")  # one stage: trunk, head and decoder together
    assert history["stage"].tolist() == ["joint", "joint"] and history["epoch"].tolist() == [1, 2]
    assert history["val_score"].iloc[-1] == pytest.approx(summary["image_val_samples_f1_in_training"])
    # The backbone's rate at each epoch's first update (2 updates an epoch, a one-update warm-up):
    # the peak, then the cosine one third of the way through its 3 updates.
    assert history["lr"].tolist() == pytest.approx([summary["lr"], 0.75 * summary["lr"]])


def test_out_of_memory_during_training_suggests_a_smaller_batch(tiny_dataset, tmp_path, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr("pipeline.train.image.cached_features", out_of_memory)
    with pytest.warns(UserWarning), pytest.raises(torch.cuda.OutOfMemoryError, match="try --batch-size 8"):
        train_efficientnet.main(["--data", str(tiny_dataset), "--weights", str(tmp_path / "w"), *TINY_IMAGE_ARGS])


@pytest.mark.filterwarnings("ignore::UserWarning")  # the random-weights warning of the test backbone
def test_scripts_reuse_the_feature_cache_and_any_change_invalidates_it(tiny_dataset, tmp_path, monkeypatch):
    import inference

    extracted = count_extracted_rows(monkeypatch)
    weights = tmp_path / "w"
    args = ["--data", str(tiny_dataset), "--weights", str(weights), *TINY_IMAGE_ARGS]
    train_efficientnet.main(args)
    assert extracted == [48]  # train + validation images, once
    train_efficientnet.main(args)
    assert extracted == [48]  # second run: read from the cache
    inference.main(["--data", str(tiny_dataset), "--weights", str(weights), "--output", str(tmp_path / "out"),
                    "--workers", "0", "--val-fraction", "0.25", "--evaluate"])
    assert extracted == [48, 10]  # only the 10 test images; validation features come from the cache

    train_efficientnet.main([*args, "--resolution", "48"])  # later options win: another resolution
    assert extracted == [48, 10, 48]
    state = create_backbone("test_efficientnet").module.model.state_dict()
    torch.save({k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}, tmp_path / "other.pt")
    train_efficientnet.main([*args, "--backbone-weights", str(tmp_path / "other.pt")])  # other weights
    assert extracted == [48, 10, 48, 48]
    assert len(list((weights / "cache").glob("features-*"))) == 4
