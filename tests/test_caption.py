import json

import numpy as np
import pandas as pd
import pytest
import torch

import train_caption_rnn
from pipeline.checkpoint import load_checkpoint, load_probabilities, save_checkpoint
from pipeline.engine.loop import NonFiniteLossError
from pipeline.models.caption import RNN_TYPES, CaptionClassifier, rnn_class
from pipeline.data.text import Vocabulary, stem_token
from pipeline.branches.caption import build_ensemble, model_settings, predict_caption_probs
from pipeline.text_features import TextEncoder
from pipeline.train.caption_config import CaptionTrainConfig, idle_options
from pipeline.metrics import binarize, samples_f1
from pipeline.io import OptionError
from tests.conftest import WORDS, make_tiny_dataset

TINY_LABELS = sorted(WORDS)

NUM_LABELS = 5


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
    config = CaptionTrainConfig(embed_dim=8, hidden_size=6, layers=1, max_len=6, rnn="gru", ensemble=2,
                                text_encoder="words")
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


def test_script_smoke_run_writes_checkpoint_probabilities_and_config(tmp_path):
    """The default caption branch: models over MiniLM's token states (the tests' stand-in)."""
    data = make_tiny_dataset(tmp_path / "data", n_train=60, images=False)
    weights = tmp_path / "weights"
    argv = ["--data", str(data), "--weights", str(weights),
            "--device", "cpu", "--epochs", "3", "--hidden-size", "8",
            "--batch-size", "16", "--val-fraction", "0.3", "--rnn", "gru",
            "--ensemble", "2"]
    summary = train_caption_rnn.main(argv)
    assert summary["options_without_effect"] == []
    assert 1 <= summary["best_epoch"] <= 3 and len(summary["best_epochs"]) == 2
    assert summary["best_epoch"] == summary["best_epochs"][0]

    checkpoint = load_checkpoint(weights / "caption.pt", branch="caption", label_ids=TINY_LABELS)
    assert checkpoint["vocab"][:2] == ["<pad>", "<unk>"] and "hors" in checkpoint["vocab"]  # stemmed
    assert summary["vocab_size"] == len(checkpoint["vocab"])
    assert checkpoint["config"]["rnn"] == "gru" and checkpoint["config"]["hidden_size"] == 8
    assert checkpoint["config"]["text_encoder"] == "minilm"
    assert checkpoint["text_encoder_digest"] == TextEncoder("minilm").digest
    assert "0.embedding.weight" not in checkpoint["state_dict"]  # it reads the encoder's states, no words
    assert {key.split(".")[0] for key in checkpoint["state_dict"]} == {"0", "1"}  # two ensemble members
    image_ids, label_ids, probs = load_probabilities(weights / "val_probs_caption.csv", TINY_LABELS)
    assert label_ids == TINY_LABELS
    assert probs.shape == (len(image_ids), 4) and len(image_ids) > 0
    saved = json.loads((weights / "caption_config.json").read_text())
    assert saved["epochs"] == 3 and saved["data"] == str(data)
    # The saved validation probabilities are what the checkpoint predicts.
    frame = pd.read_csv(data / "train.csv", dtype=str).set_index("ImageID")
    again = predict_caption_probs(checkpoint, frame.loc[image_ids, "Caption"].tolist(), "cpu")
    np.testing.assert_allclose(again, probs, atol=2e-6)
    # The reported scores are those of these probabilities, at the reported threshold and at 0.5.
    truth = np.array([[str(label) in labels.split() for label in TINY_LABELS]
                      for labels in frame.loc[image_ids, "Labels"]], dtype=int)
    tuned = samples_f1(truth, binarize(probs, summary["threshold"]))
    assert summary["val_samples_f1"] == pytest.approx(tuned, abs=1e-4)
    assert summary["val_samples_f1_at_0.5"] == pytest.approx(samples_f1(truth, binarize(probs, 0.5)), abs=1e-4)

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
    data = make_tiny_dataset(tmp_path / "data", n_train=60, images=False)
    # A vector of its own for each word, so a row taken from another word shows.
    file_vectors = {word: [i + 1.0, 0.5, -1.0, 2.0 + i] for i, word in enumerate(WORDS.values())}
    vectors = tmp_path / "vectors.txt"
    vectors.write_text("".join(f"{word} {' '.join(map(str, v))}\n" for word, v in file_vectors.items())
                       + "zebra 9 9 9 9\n", encoding="utf-8")
    # A learning rate too small to move any weight: the checkpoint shows where training started.
    base = ["--data", str(data), "--device", "cpu", "--epochs", "1", "--hidden-size", "4", "--ensemble", "2",
            "--min-freq", "1", "--lr", "1e-12", "--text-encoder", "words"]

    def start_rows(weights) -> dict[str, list[torch.Tensor]]:
        """Each file word's embedding row in each ensemble member of the checkpoint."""
        checkpoint = load_checkpoint(weights / "caption.pt", branch="caption")
        index = {token: i for i, token in enumerate(checkpoint["vocab"])}
        state = checkpoint["state_dict"]
        return {word: [state[f"{member}.embedding.weight"][index[stem_token(word)]] for member in (0, 1)]
                for word in file_vectors}

    with_vectors = ["--word-vectors", str(vectors)]
    train_caption_rnn.main(base + ["--embed-dim", "4", "--weights", str(tmp_path / "w"), *with_vectors])
    for word, rows in start_rows(tmp_path / "w").items():
        for row in rows:
            torch.testing.assert_close(row, torch.tensor(file_vectors[word]), msg=word)

    train_caption_rnn.main(base + ["--embed-dim", "4", "--weights", str(tmp_path / "plain")])
    for word, rows in start_rows(tmp_path / "plain").items():
        assert not any(torch.allclose(row, torch.tensor(file_vectors[word])) for row in rows), word

    with pytest.raises(ValueError, match="--embed-dim 4"):
        train_caption_rnn.main(base + ["--embed-dim", "5", "--weights", str(tmp_path / "w5"), *with_vectors])
    # Word vectors need the branch's own words, which the default encoder replaces.
    with pytest.raises(ValueError, match=r"--word-vectors initialises the branch's own word embeddings, and "
                                         r"--text-encoder minilm \(the default\) reads .*: add --text-encoder words"):
        train_caption_rnn.main(["--data", str(data), "--weights", str(tmp_path / "w6"), *with_vectors])


def test_word_options_with_the_encoder_are_named_not_ignored(tmp_path, capsys):
    """--embed-dim, --min-freq and --stem shape the branch's own words: with the encoder's token
    states (the default) they do nothing, and the run says so by name."""
    data = make_tiny_dataset(tmp_path / "data", n_train=24, images=False)
    summary = train_caption_rnn.main(["--data", str(data), "--weights", str(tmp_path / "w"), "--device", "cpu",
                                      "--epochs", "1", "--ensemble", "1", "--hidden-size", "4", "--embed-dim", "8",
                                      "--min-freq", "1", "--no-stem"])
    expected = [f"{flag} has no effect: it shapes the branch's own word embeddings, and --text-encoder minilm "
                "reads the encoder's token states instead (--text-encoder words reads words)"
                for flag in ("--embed-dim 8", "--min-freq 1", "--no-stem")]
    assert summary["options_without_effect"] == expected
    err = capsys.readouterr().err
    assert all(f"warning: {message}\n" in err for message in expected)
    assert idle_options(CaptionTrainConfig(text_encoder="words", embed_dim=8, min_freq=1, stem=False)) == []


def test_non_finite_caption_loss_names_model_epoch_and_step(tmp_path, monkeypatch):
    data = make_tiny_dataset(tmp_path / "data", n_train=60, images=False)

    def nan_loss():
        return lambda logits, targets: logits.sum() * float("nan")

    monkeypatch.setattr(torch.nn, "BCEWithLogitsLoss", nan_loss)
    with pytest.raises(NonFiniteLossError, match=r"caption: loss is nan at epoch 1, step 0"):
        train_caption_rnn.main(["--data", str(data), "--weights", str(tmp_path / "w"), "--ensemble", "1",
                                "--epochs", "1"])


def test_members_trained_in_forked_processes_equal_those_trained_in_turn(tmp_path):
    """--member-processes 2 trains two members at once, one per process; each seeds itself, so
    the checkpoint and the validation probabilities are those of training them one by one."""
    data = make_tiny_dataset(tmp_path / "data", n_train=60, images=False)
    argv = ["--data", str(data), "--device", "cpu", "--epochs", "2", "--hidden-size", "8",
            "--batch-size", "16", "--val-fraction", "0.3", "--ensemble", "3", "--threads", "1"]
    in_turn = train_caption_rnn.main([*argv, "--weights", str(tmp_path / "turn"), "--member-processes", "1"])
    at_once = train_caption_rnn.main([*argv, "--weights", str(tmp_path / "once"), "--member-processes", "2"])
    assert at_once["best_epochs"] == in_turn["best_epochs"]
    assert at_once["member_val_samples_f1"] == in_turn["member_val_samples_f1"]
    _, _, turn_probs = load_probabilities(tmp_path / "turn" / "val_probs_caption.csv")
    _, _, once_probs = load_probabilities(tmp_path / "once" / "val_probs_caption.csv")
    np.testing.assert_array_equal(once_probs, turn_probs)
    turn_state = load_checkpoint(tmp_path / "turn" / "caption.pt")["state_dict"]
    once_state = load_checkpoint(tmp_path / "once" / "caption.pt")["state_dict"]
    assert turn_state.keys() == once_state.keys()
    for key in turn_state:
        torch.testing.assert_close(once_state[key], turn_state[key], rtol=0, atol=0)
    # Both runs wrote every member's epochs to the history.
    for folder in ("turn", "once"):
        rows = pd.read_csv(tmp_path / folder / "history_caption.csv")
        assert sorted(rows["member"].unique().tolist()) == [0, 1, 2]


@pytest.mark.parametrize("blocker", [["--log", "tensorboard"], ["--threads", "0"]])
def test_member_processes_that_cannot_act_are_refused_by_name(tmp_path, blocker):
    data = make_tiny_dataset(tmp_path / "data", n_train=30, images=False)
    argv = ["--data", str(data), "--weights", str(tmp_path / "w"), "--device", "cpu", "--member-processes", "2",
            *blocker]
    with pytest.raises(OptionError, match=rf"--member-processes 2 cannot act with {blocker[0]} "):
        train_caption_rnn.main(argv)
