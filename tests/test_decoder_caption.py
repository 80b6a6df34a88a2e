"""The label decoder that reads the caption (``--decoder-caption``): its initial state from the
image and a caption vector. Shapes, gradients, checkpoint round trip, and that the caption
is what it reads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import train_efficientnet
from pipeline import Predictor
from pipeline.branches.image import ImageHeads
from pipeline.checkpoint import load_checkpoint, load_probabilities, probabilities_path
from pipeline.config import run_main
from pipeline.data.dataset import DatasetPaths, load_train_val
from pipeline.engine.runtime import seed_everything
from pipeline.prediction import BranchPredictor, Inputs, load_branch_checkpoints
from pipeline.io import CheckpointError
from pipeline.models.decoder import LabelDecoder, LabelOrder
from pipeline.text_features import TextEncoder
from tests.conftest import TINY_IMAGE_ARGS, make_tiny_dataset
from tests.test_decoder import synthetic_problem

CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def captioned_decoder(feature_dim: int = 10, num_labels: int = 5, caption_dim: int = 6) -> LabelDecoder:
    torch.manual_seed(0)
    return LabelDecoder(feature_dim, num_labels, embed_dim=8, hidden_dim=12, dropout=0.1, caption_dim=caption_dim)


def test_shapes_and_the_caption_is_required_exactly_when_read():
    model = captioned_decoder().eval()
    features, captions, inputs = torch.randn(3, 10), torch.randn(3, 6), torch.randint(0, 5, (3, 4))
    assert model(features, inputs, captions).shape == (3, 4, 6)
    sets, scores = model.beam_search(features, beam_width=2, captions=captions)
    assert len(sets) == 3 and scores.shape == (3, 5)
    assert model.beam_search(torch.randn(0, 10), captions=torch.randn(0, 6))[0] == []
    with pytest.raises(ValueError, match="reads caption vectors of size 6: pass them"):
        model(features, inputs)
    with pytest.raises(ValueError, match=r"caption vectors must be \(3, 6\), got \(3, 5\)"):
        model.beam_search(features, captions=torch.randn(3, 5))
    with pytest.raises(ValueError, match="reads no captions"):
        LabelDecoder(10, 5, embed_dim=8, hidden_dim=12).beam_search(features, captions=captions)


def test_gradients_reach_the_caption_parameters():
    model = captioned_decoder()
    multi_hot = torch.tensor([[1.0, 0, 1, 0, 0], [0, 1, 0, 0, 1], [0, 0, 0, 1, 0]])
    model.loss(torch.randn(3, 10), multi_hot, LabelOrder.from_train(multi_hot).rank, torch.randn(3, 6)).backward()
    for name in ("caption_norm.weight", "caption_init.weight", "caption_init.bias"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert all(p.grad is not None for p in model.parameters())


def test_without_captions_the_decoder_is_todays():
    """caption_dim 0 builds no new parameter, so a seed gives today's decoder, weights and outputs."""
    torch.manual_seed(0)
    plain = LabelDecoder(10, 5, embed_dim=8, hidden_dim=12)
    assert not any("caption" in name for name in plain.state_dict())
    torch.manual_seed(0)
    again = LabelDecoder(10, 5, embed_dim=8, hidden_dim=12, caption_dim=0)
    features = torch.randn(4, 10)
    for a, b in zip(plain.eval().beam_search(features), again.eval().beam_search(features)):
        assert a == b if isinstance(a, list) else torch.equal(a, b)


def test_a_checkpoint_round_trip_gives_identical_scores(tmp_path):
    model = captioned_decoder().eval()
    torch.save(model.state_dict(), tmp_path / "decoder.pt")
    loaded = LabelDecoder(10, 5, embed_dim=8, hidden_dim=12, dropout=0.1, caption_dim=6).eval()
    loaded.load_state_dict(torch.load(tmp_path / "decoder.pt", weights_only=True))
    features, captions = torch.randn(4, 10), torch.randn(4, 6)
    assert torch.equal(model.beam_search(features, captions=captions)[1],
                       loaded.beam_search(features, captions=captions)[1])


def test_the_decoder_learns_from_the_caption_and_blanking_it_changes_the_output():
    """Image features that carry half of the labels, captions the other half: trained on both,
    the decoder gets the caption's labels right, and with the captions blanked (one vector for
    all, as the encoder gives "") its predictions change and those labels are lost."""
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    image_codes = rng.standard_normal((6, 24)).astype(np.float32)
    caption_codes = rng.standard_normal((6, 16)).astype(np.float32)
    features, y_train = synthetic_problem(rng, image_codes, 300)
    y = y_train.numpy()
    image_half, caption_half = y.copy(), y.copy()
    image_half[:, 3:], caption_half[:, :3] = 0, 0
    features = torch.tensor(image_half @ image_codes + 0.1 * rng.standard_normal((300, 24)), dtype=torch.float32)
    captions = torch.tensor(caption_half @ caption_codes + 0.1 * rng.standard_normal((300, 16)), dtype=torch.float32)
    order = LabelOrder.from_train(y_train)
    model = LabelDecoder(24, 6, embed_dim=32, hidden_dim=64, dropout=0.1, caption_dim=16)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(120):
        optimizer.zero_grad()
        model.loss(features, y_train, order.rank, captions).backward()
        optimizer.step()
    _, scores = model.beam_search(features, beam_width=3, captions=captions)
    blank = torch.zeros(1, 16).expand(300, 16)
    _, blanked = model.beam_search(features, beam_width=3, captions=blank)
    truth = y_train.bool()
    caption_labels = truth[:, 3:]
    assert scores[:, 3:][caption_labels].mean() > 0.7  # read from the caption
    assert blanked[:, 3:][caption_labels].mean() < 0.5  # lost without it
    assert (scores - blanked).abs().max() > 0.3


# ---------------------------------------------------------------- through training, inference and the API

MODES = {
    "frozen": [],
    "partial": ["--mode", "partial", "--train-from-stage", "3", "--finetune-epochs", "2", "--warmup-epochs", "0.5"],
    "finetune": ["--mode", "finetune", "--finetune-epochs", "1", "--warmup-epochs", "0.5", "--augment", "none"],
}


def _train(dataset: Path, weights: Path, *extra: str) -> dict:
    return train_efficientnet.main(["--data", str(dataset), "--weights", str(weights), *TINY_IMAGE_ARGS, *extra])


@pytest.fixture(scope="module")
def captioned_dataset(tmp_path_factory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("captioned") / "tiny")


@pytest.mark.filterwarnings("ignore:backbone test_efficientnet:UserWarning")
@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_trains_a_caption_reading_decoder_that_inference_rebuilds(mode, captioned_dataset,
                                                                                tiny_text_encoder, tmp_path):
    """--decoder-caption minilm in each mode: decoder.pt records the caption encoder; inference
    reads each image's caption and gives the validation scores training saved (the round trip);
    blanking the captions changes them."""
    weights = tmp_path / "w"
    _train(captioned_dataset, weights, *MODES[mode], "--decoder-caption", "minilm")
    spec = load_checkpoint(weights / "decoder.pt", branch="decoder")["decoder"]
    assert spec["caption_dim"] == 16 and spec["caption_encoder"] == "minilm"  # the stand-in encoder's width
    assert spec["caption_encoder_digest"] == TextEncoder("minilm").digest
    assert list((weights / "cache").glob("text-minilm-*"))
    checkpoints = load_branch_checkpoints(weights, ["image", "decoder"])
    paths = DatasetPaths.resolve(captioned_dataset)
    seed_everything(0)  # frozen mode's test backbone has random weights, drawn from the seed as inference draws them
    predictor = BranchPredictor(checkpoints, paths, CPU, 16, model_cache=weights / "cache")
    inputs = Inputs(paths, weights / "cache")
    assert predictor.heads.decoder.caption_dim == 16 and predictor.heads.caption_encoder == "minilm"
    _, _, val = load_train_val(paths, 0.25)
    probs = predictor.probabilities(val, inputs).by_branch
    ids, _, expected = load_probabilities(probabilities_path(weights, "decoder"))
    assert ids == val["ImageID"].tolist()
    np.testing.assert_allclose(probs["decoder"], expected, atol=1e-6)
    blanked = predictor.probabilities(val.assign(Caption=""), inputs).by_branch
    np.testing.assert_array_equal(blanked["image"], probs["image"])  # the image head reads no caption
    assert np.abs(blanked["decoder"] - probs["decoder"]).max() > 1e-3
    # A frame without a Caption column reads as blank captions.
    np.testing.assert_allclose(predictor.probabilities(val.drop(columns="Caption"), inputs).by_branch["decoder"],
                               blanked["decoder"], atol=1e-6)


@pytest.mark.filterwarnings("ignore:backbone test_efficientnet:UserWarning")
def test_the_python_api_gives_the_decoder_each_images_caption(captioned_dataset, tiny_text_encoder, tmp_path):
    weights = tmp_path / "w"
    # Long enough for the decoder to learn what the stand-in encoder's caption vectors say.
    _train(captioned_dataset, weights, "--decoder-caption", "minilm", "--decoder-epochs", "20")
    predictor = Predictor.from_weights(weights, device="cpu", data=str(captioned_dataset), workers=0,
                                       val_fraction=0.25)
    image = captioned_dataset / "data" / "50.jpg"
    # The same image, told it shows different things: the decoder listens, the image head does not.
    dog, car = (predictor.predict([image], captions=[text])[0]["branches"]
                for text in ("We can see a dog and a horse.", "A photo of a car."))
    assert dog["image"] == car["image"] and dog["decoder"] != car["decoder"]
    blank = predictor.predict([image])[0]["branches"]  # no caption: the decoder reads ""
    assert "caption" not in blank and blank["decoder"] != dog["decoder"]
    assert blank["decoder"] == predictor.predict([image], captions=[""])[0]["branches"]["decoder"]


@pytest.mark.filterwarnings("ignore:backbone test_efficientnet:UserWarning")
@pytest.mark.filterwarnings("ignore:backbone test_efficientnet:UserWarning")
def test_another_text_encoder_than_the_trained_one_is_refused(captioned_dataset, tiny_text_encoder, tmp_path):
    """The decoder learned from one encoder's sentence vectors; another's would be read as noise."""
    _train(captioned_dataset, tmp_path / "w", "--decoder-caption", "minilm", "--decoder-epochs", "1")
    checkpoint = load_checkpoint(tmp_path / "w" / "decoder.pt")
    checkpoint["decoder"]["caption_encoder_digest"] = "0" * 16
    with pytest.raises(CheckpointError, match="decoder.pt reads captions through text encoder 'minilm' with weights "
                                              "0000000000000000, and the installed one has"):
        ImageHeads.from_checkpoints({"decoder": checkpoint})


@pytest.mark.filterwarnings("ignore:backbone test_efficientnet:UserWarning")
def test_without_captions_the_option_is_refused_naming_it(tmp_path, capsys, tiny_text_encoder):
    dataset = make_tiny_dataset(tmp_path / "tiny", n_train=12, n_test=0)
    frame = pd.read_csv(dataset / "train.csv")
    frame.drop(columns="Caption").to_csv(dataset / "train.csv", index=False)
    argv = ["--data", str(dataset), "--weights", str(tmp_path / "w"), *TINY_IMAGE_ARGS, "--decoder-caption", "minilm"]
    assert run_main(train_efficientnet.main, train_efficientnet.get_args_parser(), argv) == 2
    err = capsys.readouterr().err
    assert err == (f"error: --decoder-caption minilm: {dataset / 'train.csv'} has no Caption column, so the decoder "
                   "has no captions to read; use --decoder-caption none\n")


@pytest.mark.filterwarnings("ignore:backbone test_efficientnet:UserWarning")
def test_the_default_decoder_reads_the_caption_where_train_csv_has_one(trained_branches, tmp_path):
    """The default recipe's decoder.pt (trained_branches: no --decoder-caption) reads MiniLM's
    sentence vectors, here the 16-wide stand-in's; on a dataset without captions the default
    decoder reads the image alone, where an explicit --decoder-caption minilm is refused (below)."""
    _, weights = trained_branches
    spec = load_checkpoint(weights / "decoder.pt", branch="decoder")["decoder"]
    assert (spec["caption_dim"], spec["caption_encoder"]) == (16, "minilm")
    assert spec["caption_encoder_digest"] == TextEncoder("minilm").digest
    assert json.loads((weights / "image_config.json").read_text())["decoder_caption"] == "minilm"

    dataset = make_tiny_dataset(tmp_path / "tiny", n_train=12, n_test=0)
    frame = pd.read_csv(dataset / "train.csv")
    frame.drop(columns=["Caption"]).to_csv(dataset / "train.csv", index=False)
    _train(dataset, tmp_path / "w", "--decoder-epochs", "1")
    spec = load_checkpoint(tmp_path / "w" / "decoder.pt", branch="decoder")["decoder"]
    assert spec["caption_dim"] == 0 and spec["caption_encoder"] is None and spec["caption_encoder_digest"] is None
    assert ImageHeads.from_checkpoints({"decoder": load_checkpoint(tmp_path / "w" / "decoder.pt")}).caption_encoder is None
    assert json.loads((tmp_path / "w" / "image_config.json").read_text())["decoder_caption"] == "none"

