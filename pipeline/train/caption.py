"""Training and prediction of the caption branch (an LSTM/GRU over the caption words).

``train_caption_branch`` fits the model on the shared training split and writes, in
``--weights``: ``caption.pt`` (weights, vocabulary, settings, label ids),
``val_probs_caption.csv`` (validation-split probabilities, for fusion tuning) and
``caption_config.json``. ``predict_caption_probs`` rebuilds the model from a loaded
checkpoint for the inference stage.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from pipeline.checkpoint import checkpoint_path, probabilities_path, save_checkpoint, save_probabilities
from pipeline.config import TrainingConfig, option, save_config
from pipeline.data.dataset import (
    CAPTION_COLUMN,
    ID_COLUMN,
    LABELS_COLUMN,
    DataFormatError,
    ImageGroups,
    LabelSet,
    group_by_image,
    load_train_val,
    resolve_dataset,
)
from pipeline.metrics import binarize, samples_f1, tune_global_threshold
from pipeline.models.caption import RNN_TYPES, CaptionClassifier
from pipeline.engine.distributed import DistContext, barrier, distributed_session, mean_across_ranks, wrap_model
from pipeline.engine.loop import NonFiniteLossError
from pipeline.io import file_digest
from pipeline.engine.resume import GeneratorState, ResumeState, finish_run, fingerprint, start_run
from pipeline.engine.runtime import cpu_threads, oom_hint, resolve_device, reuse_freed_memory, seed_everything
from pipeline.data.text import Vocabulary, load_word_vectors

BRANCH = "caption"
# Global thresholds tried when tuning on the validation split.
# The model settings a checkpoint must carry to be rebuilt.
MODEL_FIELDS = ("rnn", "embed_dim", "hidden_size", "layers", "dropout", "embed_dropout", "bidirectional",
                "label_attention")


@dataclass
class CaptionTrainConfig(TrainingConfig):
    """Settings of ``train_caption_rnn.py``."""

    batch_size: int = option(32, "captions per training batch")
    rnn: str = option("lstm", "recurrent layer type", choices=list(RNN_TYPES))
    embed_dim: int = option(64, "word embedding size (must match --word-vectors when given)")
    hidden_size: int = option(64, "hidden units per direction of the recurrent layer")
    layers: int = option(1, "stacked recurrent layers")
    dropout: float = option(0.3, "dropout on the pooled features (and between stacked layers)")
    embed_dropout: float = option(0.1, "probability of dropping a whole word's embedding while training")
    bidirectional: bool = option(True, "read captions both ways")
    label_attention: bool = option(
        True, "give each label its own attention over the words, added to the max+mean pooled head")
    stem: bool = option(True, "reduce words to their Porter stems (nltk, no downloads), so 'dogs' and 'dog' "
                        "share an id")
    min_freq: int = option(2, "a word must appear this often in the training split to get its own id")
    max_len: int = option(40, "caption tokens kept (longer captions are cut)")
    epochs: int = option(12, "maximum training epochs (the learning-rate schedule spans all of them)")
    lr: float = option(3e-3, "AdamW peak learning rate (one-cycle schedule)")
    weight_decay: float = option(1e-4, "AdamW weight decay")
    patience: int = option(4, "stop after this many epochs without a better validation samples-F1")
    tune_threshold: bool = option(
        True, "score epochs by validation samples-F1 at the best global threshold (else at 0.5)")
    ensemble: int = option(5, "models trained with seeds SEED, SEED+1, ...; their probabilities are averaged")
    threads: int = option(1, "CPU threads for torch; 1 is fastest for this small model and stays fast "
                          "when other processes load the cores; 0 keeps torch's default")
    word_vectors: str | None = option(
        None, "optional GloVe-format text file of pretrained word vectors (token then numbers per line)")


def model_settings(config: CaptionTrainConfig | dict) -> dict:
    """The subset of the settings that shapes the model, as a plain dict."""
    values = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    missing = [name for name in MODEL_FIELDS if name not in values]
    if missing:
        raise ValueError(f"caption settings lack {missing}; the checkpoint is from an older version, retrain it")
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


def _batches(ids: torch.Tensor, lengths: torch.Tensor,
             batch_rows: list[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(rows, ids (B, T), lengths (B,)) for each group of rows, cut to the group's longest caption."""
    for rows in batch_rows:
        batch_lengths = lengths[rows]  # (B,)
        yield rows, ids[rows, : int(batch_lengths.max())], batch_lengths


def _bucketed_batches(lengths: torch.Tensor, batch_size: int, generator: torch.Generator,
                      pool: int = 32) -> list[torch.Tensor]:
    """Shuffled training batches of captions of similar length.

    Rows are shuffled, cut into pools of ``pool`` batches, sorted by length inside each
    pool, batched, and the batches shuffled. An RNN pays for every time step of a
    batch's longest caption, so similar lengths make an epoch markedly faster while
    batches stay random.
    """
    order = torch.randperm(len(lengths), generator=generator)
    batches: list[torch.Tensor] = []
    for start in range(0, len(order), batch_size * pool):
        chunk = order[start:start + batch_size * pool]
        chunk = chunk[torch.argsort(lengths[chunk], descending=True, stable=True)]
        batches.extend(chunk.split(batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=generator)]


@torch.no_grad()
def _predict(model: CaptionClassifier, ids: torch.Tensor, lengths: torch.Tensor,
             device: torch.device, batch_size: int) -> np.ndarray:
    """Sigmoid probabilities (N, L) of encoded captions."""
    model.eval()
    # Length-sorted batches waste no time on padding; rows go back to their places below.
    order = torch.argsort(lengths, descending=True, stable=True)
    probs = torch.empty(len(lengths), model.head.out_features)  # (N, L)
    for rows, batch_ids, batch_lengths in _batches(ids, lengths, list(order.split(batch_size))):
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
    # Checkpoints from before stemming existed did not stem.
    vocab = Vocabulary.from_list(checkpoint["vocab"], stem=bool(config.get("stem", False)))
    members = build_ensemble(model_settings(config), int(config.get("ensemble", 1)), len(vocab), num_labels)
    members.load_state_dict(checkpoint["state_dict"])
    members.to(device)
    ids, lengths = vocab.encode(list(captions), int(config["max_len"]))
    # torch's own thread count here, not the training setting: prediction runs on its own
    # (after image extraction), and two threads made it 1.5x faster on 2 cores.
    return np.mean([_predict(model, ids, lengths, device, batch_size) for model in members], axis=0)


@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    """Deterministic torch kernels for the duration of a run, restoring the caller's setting."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def _validate(config: CaptionTrainConfig) -> None:
    checks = [
        (config.epochs >= 1, f"--epochs must be >= 1, got {config.epochs}"),
        (config.patience >= 1, f"--patience must be >= 1, got {config.patience}"),
        (config.batch_size >= 1, f"--batch-size must be >= 1, got {config.batch_size}"),
        (config.embed_dim >= 1 and config.hidden_size >= 1 and config.layers >= 1,
         "--embed-dim, --hidden-size and --layers must be >= 1"),
        (0.0 <= config.dropout < 1.0, f"--dropout must be in [0, 1), got {config.dropout}"),
        (0.0 <= config.embed_dropout < 1.0, f"--embed-dropout must be in [0, 1), got {config.embed_dropout}"),
        (config.lr > 0, f"--lr must be > 0, got {config.lr}"),
        (config.max_len >= 1, f"--max-len must be >= 1, got {config.max_len}"),
        (config.min_freq >= 1, f"--min-freq must be >= 1, got {config.min_freq}"),
        (config.ensemble >= 1, f"--ensemble must be >= 1, got {config.ensemble}"),
        (config.threads >= 0, f"--threads must be >= 0, got {config.threads}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    if config.rnn not in RNN_TYPES:
        raise ValueError(f"--rnn {config.rnn!r}: valid: {', '.join(RNN_TYPES)}")


def train_caption_branch(config: CaptionTrainConfig) -> dict:
    """Train the caption branch, write its checkpoint, validation probabilities and settings.

    Returns a summary: ``best_epoch`` (of the first model) and ``best_epochs`` (one per
    ensemble member), ``val_samples_f1`` (of the averaged probabilities, at the tuned
    ``threshold``), ``val_samples_f1_at_0.5``, ``member_val_samples_f1``, ``seconds``
    and the paths written. Validation figures are None when the validation split is empty.
    """
    _validate(config)
    reuse_freed_memory()
    start = time.perf_counter()
    with (_deterministic(), cpu_threads(config.threads), oom_hint(config.batch_size),
          distributed_session(resolve_device(config.device)) as (context, device)):
        summary = _train(config, device, context)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    if context.is_main:
        tqdm.write(
            f"caption: best epoch(s) {summary['best_epochs']}, val samples-F1 {summary['val_samples_f1']} "
            f"@{summary['threshold']:.2f} ({summary['val_samples_f1_at_0.5']} @0.5), {summary['seconds']} s, "
            f"wrote {summary['checkpoint']}"
        )
    return summary


@dataclass
class _Encoded:
    """One split's token ids (N, T), lengths (N,) and multi-hot labels (N, L) of its rows.

    A split may hold several rows (captions) of one image: training uses every row, while
    validation scores the per-image mean of its rows' probabilities against ``image_labels``.
    """

    ids: torch.Tensor
    lengths: torch.Tensor
    labels: np.ndarray
    groups: ImageGroups
    image_labels: np.ndarray  # (N_images, L)


@dataclass
class _Member:
    """The best epoch of one trained model."""

    state: dict
    epoch: int
    score: float | None
    probs: np.ndarray | None


def _score(config: CaptionTrainConfig, y_true: np.ndarray, probs: np.ndarray) -> tuple[float, float, float]:
    """(early-stopping score, its threshold, samples-F1 at 0.5) of validation probabilities."""
    f1_half = samples_f1(y_true, binarize(probs, 0.5))
    if not config.tune_threshold:
        return f1_half, 0.5, f1_half
    threshold, f1_tuned = tune_global_threshold(y_true, probs)
    return f1_tuned, threshold, f1_half


def _fit_member(config: CaptionTrainConfig, seed: int, tag: str, train: _Encoded, val: _Encoded,
                vocab_size: int, embeddings: torch.Tensor | None, device: torch.device,
                context: DistContext = DistContext(), state: ResumeState | None = None) -> _Member:
    """Train one model from ``seed``; keep its epoch with the best validation score.

    Under torchrun every rank draws the same global batches and trains on every N-th row
    of each (DistributedDataParallel averages the gradients); every rank scores the whole
    validation split, so all keep the same epoch.
    """
    seed_everything(seed)
    num_labels = train.labels.shape[1]
    model = build_model(model_settings(config), vocab_size, num_labels, embeddings).to(device)
    trained = wrap_model(model, context)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(train.lengths) / config.batch_size)
    # One-cycle: a short warm-up, then cosine decay over the whole budget of epochs, so
    # the last epochs fine-tune at a small rate.
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch, pct_start=0.1)
    loss_fn = nn.BCEWithLogitsLoss()
    shuffle = torch.Generator().manual_seed(seed)
    targets = torch.from_numpy(train.labels)  # (N, L)
    has_val = len(val.lengths) > 0

    state = state or ResumeState.off()
    first, saved = state.begin({"model": model, "optimizer": optimizer, "scheduler": scheduler,
                                "shuffle": GeneratorState(shuffle)}, None, config.epochs)
    best = _Member(**saved) if saved else None
    for epoch in range(first, config.epochs + 1):
        trained.train()
        batch_rows = [rows[context.rank::context.world_size]
                      for rows in _bucketed_batches(train.lengths, config.batch_size, shuffle)
                      if len(rows) >= context.world_size]  # every rank needs rows in every step
        total, seen = 0.0, 0
        bar = tqdm(_batches(train.ids, train.lengths, batch_rows), total=len(batch_rows),
                   desc=f"{tag} epoch {epoch}/{config.epochs}", leave=False, disable=not context.is_main)
        for step, (rows, batch_ids, batch_lengths) in enumerate(bar):
            logits = trained(batch_ids.to(device), batch_lengths.to(device))  # (B, L)
            loss = loss_fn(logits, targets[rows].to(device))
            if not math.isfinite(loss.item()):
                raise NonFiniteLossError(
                    f"{tag}: loss is {loss.item()} at epoch {epoch}, step {step}: lower --lr or check the data")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(rows)
            seen += len(rows)
            bar.set_postfix(loss=f"{total / seen:.4f}", refresh=False)

        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        mean_loss = mean_across_ranks(total, seen, context)
        say = tqdm.write if context.is_main else (lambda _: None)
        if not has_val:
            say(f"{tag} epoch {epoch}: loss {mean_loss:.4f}")
            best = _Member(state=weights, epoch=epoch, score=None, probs=None)
            state.end_epoch(epoch, dataclasses.asdict(best))
            continue
        probs = val.groups.mean(_predict(model, val.ids, val.lengths, device, 256))
        score, threshold, f1_half = _score(config, val.image_labels, probs)
        improved = best is None or score > best.score
        say(
            f"{tag} epoch {epoch}: loss {mean_loss:.4f}, val samples-F1 {f1_half:.4f} @0.5, "
            f"{score:.4f} @{threshold:.2f}" + (" (best)" if improved else "")
        )
        if improved:
            best = _Member(state=weights, epoch=epoch, score=score, probs=probs)
        stop = epoch - best.epoch >= config.patience
        state.end_epoch(epoch, dataclasses.asdict(best), finished=stop)
        if stop:
            say(f"{tag}: no better validation samples-F1 for {config.patience} epochs; stopping")
            break
    return best


def _encode(vocab: Vocabulary, frame: pd.DataFrame, label_set: LabelSet, max_len: int) -> _Encoded:
    ids, lengths = vocab.encode(frame[CAPTION_COLUMN].tolist(), max_len)
    groups = group_by_image(frame)
    return _Encoded(ids=ids, lengths=lengths, labels=label_set.encode(frame[LABELS_COLUMN]), groups=groups,
                    image_labels=label_set.encode(groups.images[LABELS_COLUMN]))


def _train(config: CaptionTrainConfig, device: torch.device, context: DistContext) -> dict:
    paths = resolve_dataset(config.data, config.images)
    label_set, train_df, val_df = load_train_val(paths, config.val_fraction)
    if CAPTION_COLUMN not in train_df:
        raise DataFormatError(
            f"{paths.train_csv}:1: no {CAPTION_COLUMN} column, so there is nothing for the caption branch to "
            "learn from; train the image branches alone with train_efficientnet.py")
    vocab = Vocabulary.build(train_df[CAPTION_COLUMN], min_freq=config.min_freq, stem=config.stem)
    train = _encode(vocab, train_df, label_set, config.max_len)
    val = _encode(vocab, val_df, label_set, config.max_len)
    has_val = len(val_df) > 0
    if not has_val and context.is_main:
        tqdm.write("caption: the validation split is empty; keeping each model's last epoch")

    embeddings = None
    if config.word_vectors:
        # Read once: every ensemble member starts from the same pretrained vectors.
        embeddings, covered = load_word_vectors(
            config.word_vectors, vocab, config.embed_dim, torch.Generator().manual_seed(config.seed))
        if context.is_main:
            tqdm.write(f"caption: {covered}/{len(vocab)} vocabulary words found in {config.word_vectors}")

    resume_dir = start_run(config.weights, "caption", config.resume, context)
    digest = fingerprint(dataclasses.asdict(config), train_csv=file_digest(paths.train_csv))
    members = []
    for i in range(config.ensemble):
        tag = "caption" if config.ensemble == 1 else f"caption model {i + 1}/{config.ensemble}"
        state = ResumeState(resume_dir, f"member{i}", digest, config.resume, context)
        members.append(_fit_member(config, config.seed + i, tag, train, val, len(vocab), embeddings, device,
                                   context, state))

    ensemble = build_ensemble(model_settings(config), config.ensemble, len(vocab), len(label_set))
    for model, member in zip(ensemble, members):
        model.load_state_dict(member.state)
    if has_val:
        val_probs = np.mean([member.probs for member in members], axis=0)  # (images, L)
        score, threshold, f1_half = _score(config, val.image_labels, val_probs)
    else:
        val_probs = np.zeros((0, len(label_set)))
        score, threshold, f1_half = None, 0.5, None

    weights_dir = Path(config.weights)
    ckpt = checkpoint_path(weights_dir, BRANCH)
    probs_file = probabilities_path(weights_dir, BRANCH)
    config_file = weights_dir / f"{BRANCH}_config.json"
    if context.is_main:
        save_checkpoint(
            ckpt, branch=BRANCH, state_dict=ensemble.state_dict(), config=dataclasses.asdict(config),
            label_ids=label_set.ids, vocab=vocab.to_list(), epochs=[m.epoch for m in members],
            threshold=threshold,
        )
        save_probabilities(probs_file, val.groups.images[ID_COLUMN].tolist(), label_set.ids, val_probs)
        save_config(config, config_file)
    barrier(context)
    finish_run(resume_dir, context)
    return {
        "processes": context.world_size,
        "best_epoch": members[0].epoch,
        "best_epochs": [m.epoch for m in members],
        "member_val_samples_f1": [None if m.score is None else round(m.score, 4) for m in members],
        "val_samples_f1": None if score is None else round(score, 4),
        "val_samples_f1_at_0.5": None if f1_half is None else round(f1_half, 4),
        "threshold": threshold,
        "vocab_size": len(vocab),
        "checkpoint": str(ckpt),
        "val_probs": str(probs_file),
        "config": str(config_file),
    }
