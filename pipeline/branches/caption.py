"""The caption branch: an LSTM/GRU ensemble over the caption words, its settings, how it is
rebuilt from a checkpoint and how it predicts.

Training lives in ``pipeline.train.caption``; inference uses :func:`predict_caption_probs`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pipeline.config import TrainingConfig, option
from pipeline.data.text import Vocabulary
from pipeline.models.caption import RNN_TYPES, CaptionClassifier

BRANCH = "caption"
# The model settings a checkpoint must carry to be rebuilt.
MODEL_FIELDS = ("rnn", "embed_dim", "hidden_size", "layers", "dropout", "embed_dropout", "bidirectional",
                "label_attention")


@dataclass
class CaptionTrainConfig(TrainingConfig):
    """Settings of ``train_caption_rnn.py``."""

    batch_size: int = option(32, "captions per training batch", group="training")
    rnn: str = option("lstm", "recurrent layer type", choices=list(RNN_TYPES), group="model")
    embed_dim: int = option(64, "word embedding size (must match --word-vectors when given)", group="model")
    hidden_size: int = option(64, "hidden units per direction of the recurrent layer", group="model")
    layers: int = option(1, "stacked recurrent layers", group="model")
    dropout: float = option(0.3, "dropout on the pooled features (and between stacked layers)", group="model")
    embed_dropout: float = option(0.1, "probability of dropping a whole word's embedding while training", group="training")
    bidirectional: bool = option(True, "read captions both ways", group="model")
    label_attention: bool = option(
        True, "give each label its own attention over the words, added to the max+mean pooled head", group="model")
    stem: bool = option(True, "reduce words to their Porter stems (nltk, no downloads), so 'dogs' and 'dog' "
                        "share an id", group="model")
    min_freq: int = option(2, "a word must appear this often in the training split to get its own id", group="model")
    max_len: int = option(40, "caption tokens kept (longer captions are cut)", group="model")
    epochs: int = option(12, "maximum training epochs (the learning-rate schedule spans all of them)", group="training")
    lr: float = option(3e-3, "AdamW peak learning rate (one-cycle schedule)", group="training")
    weight_decay: float = option(1e-4, "AdamW weight decay", group="training")
    patience: int = option(4, "stop after this many epochs without a better validation samples-F1", group="training")
    tune_threshold: bool = option(
        True, "score epochs by validation samples-F1 at the best global threshold (else at 0.5)", group="training")
    ensemble: int = option(5, "models trained with seeds SEED, SEED+1, ...; their probabilities are averaged", group="model")
    threads: int = option(1, "CPU threads for torch; 1 is fastest for this small model and stays fast "
                          "when other processes load the cores; 0 keeps torch's default", group="run")
    word_vectors: str | None = option(
        None, "optional GloVe-format text file of pretrained word vectors (token then numbers per line)", group="model")

    def validate(self) -> None:
        """Refuse settings that cannot work, naming the option."""
        checks = [
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.patience >= 1, f"--patience must be >= 1, got {self.patience}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.embed_dim >= 1 and self.hidden_size >= 1 and self.layers >= 1,
             "--embed-dim, --hidden-size and --layers must be >= 1"),
            (0.0 <= self.dropout < 1.0, f"--dropout must be in [0, 1), got {self.dropout}"),
            (0.0 <= self.embed_dropout < 1.0, f"--embed-dropout must be in [0, 1), got {self.embed_dropout}"),
            (self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (self.max_len >= 1, f"--max-len must be >= 1, got {self.max_len}"),
            (self.min_freq >= 1, f"--min-freq must be >= 1, got {self.min_freq}"),
            (self.ensemble >= 1, f"--ensemble must be >= 1, got {self.ensemble}"),
            (self.threads >= 0, f"--threads must be >= 0, got {self.threads}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.rnn not in RNN_TYPES:
            raise ValueError(f"--rnn {self.rnn!r}: valid: {', '.join(RNN_TYPES)}")


def model_settings(config: CaptionTrainConfig | dict) -> dict:
    """The subset of the settings that shapes the model, as a plain dict."""
    values = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    return {name: values[name] for name in MODEL_FIELDS}


def build_model(settings: dict, vocab_size: int, num_labels: int,
                embeddings: torch.Tensor | None = None) -> CaptionClassifier:
    """A caption model from :func:`model_settings`."""
    return CaptionClassifier(
        vocab_size,
        num_labels,
        rnn_type=settings["rnn"],
        embed_dim=settings["embed_dim"],
        hidden_size=settings["hidden_size"],
        layers=settings["layers"],
        dropout=settings["dropout"],
        embed_dropout=settings["embed_dropout"],
        bidirectional=settings["bidirectional"],
        label_attention=settings["label_attention"],
        embeddings=embeddings,
    )


def caption_batches(ids: torch.Tensor, lengths: torch.Tensor,
             batch_rows: list[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(rows, ids (B, T), lengths (B,)) for each group of rows, cut to the group's longest caption."""
    for rows in batch_rows:
        batch_lengths = lengths[rows]  # (B,)
        yield rows, ids[rows, : int(batch_lengths.max())], batch_lengths


@torch.no_grad()
def predict_captions(model: CaptionClassifier, ids: torch.Tensor, lengths: torch.Tensor,
             device: torch.device, batch_size: int) -> np.ndarray:
    """Sigmoid probabilities (N, L) of encoded captions."""
    model.eval()
    # Length-sorted batches waste no time on padding; rows go back to their places below.
    order = torch.argsort(lengths, descending=True, stable=True)
    probs = torch.empty(len(lengths), model.head.out_features)  # (N, L)
    for rows, batch_ids, batch_lengths in caption_batches(ids, lengths, list(order.split(batch_size))):
        probs[rows] = torch.sigmoid(model(batch_ids.to(device), batch_lengths.to(device))).float().cpu()
    return probs.numpy()


def build_ensemble(settings: dict, size: int, vocab_size: int, num_labels: int) -> nn.ModuleList:
    """``size`` caption models; a checkpoint's ``state_dict`` is this list's (keys ``0.…``, ``1.…``)."""
    return nn.ModuleList(build_model(settings, vocab_size, num_labels) for _ in range(size))


def predict_caption_probs(checkpoint: dict, captions: list[str], device: torch.device | str,
                          batch_size: int = 1024) -> np.ndarray:
    """Probabilities (N, L) of captions from a loaded caption checkpoint (columns = its label ids).

    The probabilities of the checkpoint's ensemble members are averaged. An empty or
    missing caption still gets a row (it is read as a single unknown word).
    """
    device = torch.device(device)
    config = checkpoint["config"]
    num_labels = len(checkpoint["label_ids"])
    if len(captions) == 0:
        return np.zeros((0, num_labels), dtype=np.float32)
    vocab = Vocabulary(checkpoint["vocab"], stem=bool(config["stem"]))
    members = build_ensemble(model_settings(config), int(config["ensemble"]), len(vocab), num_labels)
    members.load_state_dict(checkpoint["state_dict"])
    members.to(device)
    ids, lengths = vocab.encode(list(captions), int(config["max_len"]))
    # The caller's torch thread count here, not the training setting: at inference this runs
    # beside image extraction, and on every core when alone.
    return np.mean([predict_captions(model, ids, lengths, device, batch_size) for model in members], axis=0)


