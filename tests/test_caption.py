import json

import numpy as np
import pandas as pd
import pytest
import torch

import train_caption_rnn
from pipeline.checkpoint import load_checkpoint, load_probabilities, save_checkpoint
from pipeline.engine.loop import NonFiniteLossError
from pipeline.models.caption import RNN_TYPES, CaptionClassifier, rnn_class
from pipeline.data.text import Vocabulary
from pipeline.branches.caption import CaptionTrainConfig, build_ensemble, model_settings, predict_caption_probs

NUM_LABELS = 5
# Label id -> the word that names it in the generated captions.
WORDS = {1: "man", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane"}
FILLERS = ["a photo of", "there is", "we can see", "look at", "in this picture"]


def _model(rnn: str = "lstm", bidirectional: bool = True, label_attention: bool = True) -> CaptionClassifier:
    torch.manual_seed(0)
    model = CaptionClassifier(30, NUM_LABELS, rnn_type=rnn, embed_dim=8, hidden_size=6, layers=2,
                              dropout=0.2, embed_dropout=0.1, bidirectional=bidirectional,
                              label_attention=label_attention)
    if label_attention:
        # Zero at initialisation by design, which would hide the attention's gradients.
        torch.nn.init.normal_(model.label_weights)
    return model


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([[5, 6, 7, 8, 9], [3, 4, 0, 0, 0], [2, 0, 0, 0, 0]])  # (B, T)
    return ids, torch.tensor([5, 2, 1])


@pytest.mark.parametrize("rnn", sorted(RNN_TYPES))
@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("label_attention", [True, False])
def test_output_shape_no_nans_and_padding_invariance(rnn, bidirectional, label_attention):
    model = _model(rnn, bidirectional, label_attention).eval()
    ids, lengths = _batch()
    logits = model(ids, lengths)
    assert logits.shape == (3, NUM_LABELS)
    assert torch.isfinite(logits).all()
    # Each caption alone (no padding at all) gives the same logits as inside the padded batch,
    # so pooling only ever sees real tokens.
    for i in range(3):
        alone = model(ids[i:i + 1, : lengths[i]], lengths[i:i + 1])
        torch.testing.assert_close(alone, logits[i:i + 1], rtol=1e-5, atol=1e-6)
    # Extra padding columns change nothing either.
    wider = torch.cat([ids, torch.zeros(3, 4, dtype=torch.long)], dim=1)
    torch.testing.assert_close(model(wider, lengths), logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rnn", sorted(RNN_TYPES))
@pytest.mark.parametrize("bidirectional", [True, False])
def test_gradients_reach_every_parameter(rnn, bidirectional):
    model = _model(rnn, bidirectional).train()
    ids, lengths = _batch()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(
        model(ids, lengths), torch.ones(3, NUM_LABELS))
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


def test_unknown_rnn_name_lists_valid_names():
    with pytest.raises(ValueError, match="lstm, gru"):
        rnn_class("transformer")
    with pytest.raises(ValueError, match="'rnn9'"):
        CaptionClassifier(10, 2, rnn_type="rnn9")


def test_pretrained_embeddings_are_loaded_and_shape_checked():
    vectors = torch.randn(10, 4)
    model = CaptionClassifier(10, 2, embed_dim=4, hidden_size=3, embeddings=vectors)
    torch.testing.assert_close(model.embedding.weight[1:].detach(), vectors[1:])
    assert model.embedding.weight[0].abs().sum() == 0  # <pad>
    with pytest.raises(ValueError, match="expected"):
        CaptionClassifier(10, 2, embed_dim=5, embeddings=vectors)


def test_checkpoint_round_trip_gives_identical_probabilities(tmp_path):
    captions = ["a man and a car", "a bicycle", "", "zebra crossing at night with a man"]
    config = CaptionTrainConfig(embed_dim=8, hidden_size=6, layers=1, max_len=6, rnn="gru", ensemble=2)
    vocab = Vocabulary.build(captions, min_freq=1, stem=config.stem)
    torch.manual_seed(1)
    members = build_ensemble(model_settings(config), 2, len(vocab), NUM_LABELS)
    label_ids = [1, 2, 3, 4, 5]
    checkpoint = {"config": vars(config), "vocab": vocab.to_list(), "label_ids": label_ids,
                  "state_dict": members.state_dict()}
    before = predict_caption_probs(checkpoint, captions, "cpu", batch_size=3)
    assert before.shape == (4, NUM_LABELS)
    assert np.isfinite(before).all() and ((before > 0) & (before < 1)).all()
    # The ensemble's probabilities are its members' average.
    ids, lengths = vocab.encode(captions, 6)
    with torch.no_grad():
        expected = torch.stack([torch.sigmoid(m.eval()(ids, lengths)) for m in members]).mean(0)
    np.testing.assert_allclose(before, expected.numpy(), atol=1e-6)

    path = tmp_path / "caption.pt"
    save_checkpoint(path, branch="caption", state_dict=members.state_dict(), config=vars(config),
                    label_ids=label_ids, vocab=vocab.to_list())
    loaded = load_checkpoint(path, branch="caption", label_ids=label_ids)
    after = predict_caption_probs(loaded, captions, torch.device("cpu"), batch_size=3)
    np.testing.assert_array_equal(before, after)
    assert predict_caption_probs(loaded, [], "cpu").shape == (0, NUM_LABELS)


def _write_tiny_dataset(root, rows: int = 60) -> None:
    rng = np.random.default_rng(0)
    train = []
    for i in range(rows):
        labels = sorted(rng.choice(list(WORDS), size=rng.integers(1, 3), replace=False).tolist())
        words = " and a ".join(WORDS[label] for label in labels)
        train.append({"ImageID": f"{i}.jpg", "Labels": " ".join(map(str, labels)),
                      "Caption": f"{FILLERS[i % len(FILLERS)]} a {words}."})
    root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(train).to_csv(root / "train.csv", index=False)
    test = [{"ImageID": f"{rows + i}.jpg", "Caption": f"a {WORDS[1 + i % 5]}"} for i in range(10)]
    pd.DataFrame(test).to_csv(root / "test.csv", index=False)


def test_script_smoke_run_writes_checkpoint_probabilities_and_config(tmp_path):
    data = tmp_path / "data"
    _write_tiny_dataset(data)
    weights = tmp_path / "weights"
    argv = ["--data", str(data), "--weights", str(weights),
            "--device", "cpu", "--epochs", "3", "--embed-dim", "12", "--hidden-size", "8",
            "--batch-size", "16", "--val-fraction", "0.3", "--min-freq", "1", "--rnn", "gru",
            "--ensemble", "2"]
    summary = train_caption_rnn.main(argv)
    assert 1 <= summary["best_epoch"] <= 3 and len(summary["best_epochs"]) == 2
    assert 0.0 <= summary["val_samples_f1"] <= 1.0
    assert summary["seconds"] >= 0

    checkpoint = load_checkpoint(weights / "caption.pt", branch="caption", label_ids=[1, 2, 3, 4, 5])
    assert checkpoint["vocab"][:2] == ["<pad>", "<unk>"] and "bicycl" in checkpoint["vocab"]  # stemmed
    assert checkpoint["config"]["rnn"] == "gru" and checkpoint["config"]["hidden_size"] == 8
    assert {key.split(".")[0] for key in checkpoint["state_dict"]} == {"0", "1"}  # two ensemble members
    image_ids, label_ids, probs = load_probabilities(weights / "val_probs_caption.csv", [1, 2, 3, 4, 5])
    assert label_ids == [1, 2, 3, 4, 5]
    assert probs.shape == (len(image_ids), 5) and len(image_ids) > 0
    saved = json.loads((weights / "caption_config.json").read_text())
    assert saved["epochs"] == 3 and saved["data"] == str(data)
    # The saved validation probabilities are what the checkpoint predicts.
    frame = pd.read_csv(data / "train.csv").set_index("ImageID")
    again = predict_caption_probs(checkpoint, frame.loc[image_ids, "Caption"].tolist(), "cpu")
    np.testing.assert_allclose(again, probs, atol=2e-6)

    # Same command, same result.
    summary2 = train_caption_rnn.main(argv[:3] + [str(tmp_path / "weights2")] + argv[4:])
    assert summary2["val_samples_f1"] == summary["val_samples_f1"]
    _, _, probs2 = load_probabilities(tmp_path / "weights2" / "val_probs_caption.csv")
    np.testing.assert_array_equal(probs2, probs)


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        train_caption_rnn.main(["--help"])
    text = capsys.readouterr().out
    for flag in ["--rnn", "--embed-dim", "--hidden-size", "--layers", "--dropout", "--embed-dropout",
                 "--bidirectional", "--min-freq", "--max-len", "--epochs", "--lr", "--weight-decay",
                 "--patience", "--word-vectors", "--ensemble", "--threads", "--data", "--weights", "--seed"]:
        assert flag in text


def test_training_starts_from_word_vectors_file(tmp_path):
    data = tmp_path / "data"
    _write_tiny_dataset(data)
    vectors = tmp_path / "vectors.txt"
    vectors.write_text("".join(f"{word} {i} 0.5 -1 2\n" for i, word in enumerate(WORDS.values())), encoding="utf-8")
    base = ["--data", str(data), "--weights", str(tmp_path / "w"), "--device", "cpu", "--epochs", "1",
            "--hidden-size", "4", "--ensemble", "1", "--min-freq", "1", "--word-vectors", str(vectors)]
    summary = train_caption_rnn.main(base + ["--embed-dim", "4"])
    assert summary["best_epoch"] == 1
    with pytest.raises(ValueError, match="--embed-dim 4"):
        train_caption_rnn.main(base + ["--embed-dim", "5"])


def test_non_finite_caption_loss_names_model_epoch_and_step(tmp_path, monkeypatch):
    data = tmp_path / "data"
    _write_tiny_dataset(data)

    def nan_loss():
        return lambda logits, targets: logits.sum() * float("nan")

    monkeypatch.setattr(torch.nn, "BCEWithLogitsLoss", nan_loss)
    with pytest.raises(NonFiniteLossError, match=r"caption: loss is nan at epoch 1, step 0"):
        train_caption_rnn.main(["--data", str(data), "--weights", str(tmp_path / "w"), "--ensemble", "1",
                                "--epochs", "1"])
