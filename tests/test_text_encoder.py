"""The pretrained text encoder behind ``--text-encoder``: its registry, its token-state cache, and
the caption branch that reads its states (tiny stand-in BERT, tiny data, CPU)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import train_caption_rnn
from pipeline.branches.caption import predict_caption_probs
from pipeline.checkpoint import load_checkpoint, load_probabilities
from pipeline.io import CheckpointError, OptionError
from pipeline.models.caption import CaptionClassifier, EncoderTop
from pipeline.text_features import TextEncoder, cached_token_states, check_text_encoder, sentence_vectors
from tests.conftest import make_tiny_dataset

CAPTIONS = ["A photo of a dog.", "We can see a horse and a car.", "", "here is a person"]


def test_unknown_encoder_lists_the_valid_names():
    with pytest.raises(OptionError, match=r"--text-encoder 'bert9'.*valid: minilm"):
        check_text_encoder("bert9")


def test_token_states_zero_past_each_length_and_equal_when_encoded_alone(tiny_text_encoder):
    encoder = TextEncoder("minilm")
    states, lengths = encoder.token_states(CAPTIONS, max_tokens=12)
    assert states.shape == (4, 12, 16) and states.dtype == np.float16
    # [CLS] + words + "." + [SEP]; "" is [CLS] [SEP].
    assert lengths.tolist() == [8, 11, 2, 6]
    for i, length in enumerate(lengths):
        assert not states[i, length:].any()
        assert np.abs(states[i, :length]).sum(axis=1).min() > 0
        alone, _ = encoder.token_states([CAPTIONS[i]], max_tokens=12)
        np.testing.assert_allclose(alone[0], states[i], atol=1e-3)


def test_states_below_trained_layers_are_the_full_models_hidden_states_there(tiny_text_encoder):
    """Batches padded to their longest text and the layers above cut off give the states the
    whole encoder, padded to max_tokens, has entering its last layer; the model stays whole."""
    encoder = TextEncoder("minilm")
    tokenizer, model = encoder._load()
    batch = tokenizer(CAPTIONS, padding="max_length", truncation=True, max_length=12, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states
    mask = batch["attention_mask"].bool()[..., None]
    below_last, _ = encoder.token_states(CAPTIONS, max_tokens=12, trained_layers=1)
    np.testing.assert_allclose(below_last, hidden[-2].masked_fill(~mask, 0.0).numpy(), atol=2e-3)
    assert len(model.encoder.layer) == encoder.num_layers
    top, _ = encoder.token_states(CAPTIONS, max_tokens=12)
    np.testing.assert_allclose(top, hidden[-1].masked_fill(~mask, 0.0).numpy(), atol=2e-3)
    assert not np.allclose(top, below_last, atol=2e-3)  # so the checks above tell the layers apart


def test_cache_round_trip_is_keyed_by_the_texts_and_rebuilds_a_damaged_shard(tiny_text_encoder, tmp_path):
    first = cached_token_states("minilm", CAPTIONS, tmp_path, max_tokens=12, progress=False)
    folders = list(tmp_path.glob("text-minilm-*"))
    assert len(folders) == 1
    again = cached_token_states("minilm", CAPTIONS, tmp_path, max_tokens=12, progress=False)
    np.testing.assert_array_equal(again.states, first.states)
    # Other texts are another key, not a wrong hit.
    other = cached_token_states("minilm", CAPTIONS[::-1], tmp_path, max_tokens=12, progress=False)
    np.testing.assert_array_equal(other.states, first.states[::-1])
    assert len(list(tmp_path.glob("text-minilm-*"))) == 2
    # A shard damaged in place is encoded again, not read.
    shard = folders[0] / "states-00000.npy"
    data = bytearray(shard.read_bytes())
    data[-64:] = bytes(64)
    shard.write_bytes(bytes(data))
    repaired = cached_token_states("minilm", CAPTIONS, tmp_path, max_tokens=12, progress=False)
    np.testing.assert_array_equal(repaired.states, first.states)


def test_sentence_vectors_are_the_mean_over_real_tokens(tiny_text_encoder):
    states = cached_token_states("minilm", CAPTIONS, None, max_tokens=12)
    vectors = sentence_vectors(CAPTIONS, "minilm", None, max_tokens=12)
    assert vectors.shape == (4, 16) and vectors.dtype == np.float32
    expected = states.states[1, :11].astype(np.float32).mean(axis=0)
    np.testing.assert_allclose(vectors[1], expected, rtol=1e-5)


@pytest.mark.real_text_encoder
def test_the_real_minilm_loads_offline_and_reads_meaning():
    """The registered all-MiniLM-L6-v2 of the pinned package: 384-d states, and a caption is
    nearer to its paraphrase than to an unrelated one."""
    vectors = sentence_vectors(["a dog runs on the grass", "a puppy running in a field",
                                "a red bus parked at the station"], "minilm", None)
    assert vectors.shape == (3, 384)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    assert unit[0] @ unit[1] > 0.6 > unit[0] @ unit[2]


def test_caption_model_on_token_states_shapes_gradients_and_padding():
    torch.manual_seed(0)
    model = CaptionClassifier(2, 5, embed_dim=8, hidden_size=6, token_dim=16)
    torch.nn.init.normal_(model.label_weights)
    assert model.embedding is None
    states = torch.randn(3, 7, 16).half()
    lengths = torch.tensor([7, 3, 2])
    model.train()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(states, lengths), torch.ones(3, 5))
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    model.eval()
    logits = model(states, lengths)
    assert logits.shape == (3, 5)
    torch.testing.assert_close(model(states[1:2, :3], lengths[1:2]), logits[1:2], rtol=1e-5, atol=1e-6)


def test_train_and_predict_with_the_encoder_round_trips_through_the_checkpoint(tiny_text_encoder, tmp_path):
    data = make_tiny_dataset(tmp_path / "data")
    weights = tmp_path / "weights"
    summary = train_caption_rnn.main(["--data", str(data), "--weights-dir", str(weights), "--text-encoder",
                                      "minilm", "--epochs", "3", "--ensemble", "2", "--hidden-size", "8"])
    assert summary["val_samples_f1"] is not None
    checkpoint = load_checkpoint(weights / "caption.pt", branch="caption")
    assert checkpoint["config"]["text_encoder"] == "minilm"
    assert checkpoint["text_encoder_digest"] == TextEncoder("minilm").digest
    assert not any(key.endswith("embedding.weight") for key in checkpoint["state_dict"])
    assert list((weights / "cache").glob("text-minilm-*"))
    # The checkpoint alone predicts what training recorded for the validation split.
    ids, _, val_probs = load_probabilities(weights / "val_probs_caption.csv")
    frame = __import__("pipeline.data.dataset", fromlist=["read_csv"]).read_csv(data / "train.csv")
    captions = frame.set_index("ImageID").loc[ids, "Caption"].tolist()
    probs = predict_caption_probs(checkpoint, captions, "cpu", cache_dir=weights / "cache")
    np.testing.assert_allclose(probs, val_probs, atol=1e-4)
    assert json.loads((weights / "caption_config.json").read_text())["text_encoder"] == "minilm"


def test_a_different_installed_encoder_is_refused(tiny_text_encoder, tmp_path):
    checkpoint = {"config": {"text_encoder": "minilm", "rnn": "lstm", "embed_dim": 8, "hidden_size": 8, "layers": 1,
                             "dropout": 0.0, "embed_dropout": 0.0, "bidirectional": True, "label_attention": True,
                             "stem": True, "ensemble": 1, "max_len": 12},
                  "label_ids": [1, 3], "vocab": ["<pad>", "<unk>"], "state_dict": {},
                  "text_encoder_digest": "0000"}
    with pytest.raises(CheckpointError, match="trained on text encoder 'minilm' with weights 0000"):
        predict_caption_probs(checkpoint, ["a dog"], "cpu")


def test_word_vectors_with_an_encoder_is_refused(tmp_path):
    with pytest.raises(OptionError, match="--word-vectors .* --text-encoder minilm"):
        train_caption_rnn.main(["--data", str(tmp_path), "--text-encoder", "minilm", "--word-vectors", "v.txt"])


def test_encoder_top_at_its_pretrained_weights_gives_the_whole_encoders_states(tiny_text_encoder):
    """States cached below the last layer, run through that layer's trainable copy, equal the
    frozen encoder's last-layer states: training starts from the pretrained encoder."""
    encoder = TextEncoder("minilm")
    last, lengths = encoder.token_states(CAPTIONS, max_tokens=12)
    below, lengths_below = encoder.token_states(CAPTIONS, max_tokens=12, trained_layers=1)
    np.testing.assert_array_equal(lengths, lengths_below)
    top = EncoderTop(encoder.top_layers(1)).eval()
    real = torch.arange(12)[None, :] < torch.from_numpy(lengths)[:, None]
    with torch.no_grad():
        out = top(torch.from_numpy(below).float(), real)
    np.testing.assert_allclose(out.numpy(), last.astype(np.float32), atol=2e-2)
    with pytest.raises(OptionError, match="--text-encoder-layers 3: text encoder 'minilm' has 2 layers"):
        encoder.top_layers(3)


def test_trained_encoder_layers_get_gradients_and_round_trip(tiny_text_encoder, tmp_path):
    data = make_tiny_dataset(tmp_path / "data")
    weights = tmp_path / "weights"
    train_caption_rnn.main(["--data", str(data), "--weights-dir", str(weights), "--text-encoder", "minilm",
                            "--text-encoder-layers", "1", "--epochs", "2", "--ensemble", "1", "--hidden-size", "8"])
    checkpoint = load_checkpoint(weights / "caption.pt", branch="caption")
    top_keys = [key for key in checkpoint["state_dict"] if key.startswith("0.encoder_top.layers.0.")]
    assert top_keys
    # Trained: the layer moved away from the pretrained copy.
    pretrained = TextEncoder("minilm").top_layers(1)[0].state_dict()
    moved = [key for key in top_keys if not torch.equal(checkpoint["state_dict"][key],
                                                         pretrained[key.removeprefix("0.encoder_top.layers.0.")])]
    assert moved
    ids, _, val_probs = load_probabilities(weights / "val_probs_caption.csv")
    frame = __import__("pipeline.data.dataset", fromlist=["read_csv"]).read_csv(data / "train.csv")
    captions = frame.set_index("ImageID").loc[ids, "Caption"].tolist()
    probs = predict_caption_probs(checkpoint, captions, "cpu", cache_dir=weights / "cache")
    np.testing.assert_allclose(probs, val_probs, atol=1e-4)


def test_encoder_layers_without_an_encoder_is_refused(tmp_path):
    with pytest.raises(OptionError, match="--text-encoder-layers 2 trains a pretrained encoder's layers"):
        train_caption_rnn.main(["--data", str(tmp_path), "--text-encoder", "words", "--text-encoder-layers", "2"])


def test_the_options_choices_are_the_registry():
    from pipeline.choices import TEXT_ENCODER_NAMES
    from pipeline.text_features import TEXT_ENCODERS

    assert tuple(TEXT_ENCODERS) == TEXT_ENCODER_NAMES


def test_a_new_cache_encodes_each_text_once(tiny_text_encoder, tmp_path, monkeypatch):
    encoded = []
    original = TextEncoder.token_states

    def counting(self, texts, max_tokens, trained_layers=0):
        encoded.extend(texts)
        return original(self, texts, max_tokens, trained_layers)

    monkeypatch.setattr(TextEncoder, "token_states", counting)
    cached_token_states("minilm", CAPTIONS * 3, tmp_path, max_tokens=12, progress=False)
    assert len(encoded) == 12
    cached_token_states("minilm", CAPTIONS * 3, tmp_path, max_tokens=12, progress=False)
    assert len(encoded) == 12
