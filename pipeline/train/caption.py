"""Training the caption branch (an ensemble of LSTM/GRU models over the caption words).

``train_caption_branch`` fits the models on the shared training split and writes, in
``--weights``: ``caption.pt`` (weights, vocabulary, settings, label ids),
``val_probs_caption.csv`` (validation-split probabilities, for fusion tuning) and
``caption_config.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import multiprocessing
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from pipeline.branches.caption import (
    BRANCH,
    WORDS,
    build_ensemble,
    build_model,
    caption_batches,
    encode_captions,
    model_settings,
    predict_captions,
)
from pipeline.checkpoint import checkpoint_path, probabilities_path, save_checkpoint, save_probabilities
from pipeline.choices import usable_cores
from pipeline.config import save_config
from pipeline.data.dataset import (
    CAPTION_COLUMN,
    ID_COLUMN,
    LABELS_COLUMN,
    DataFormatError,
    DatasetPaths,
    ImageGroups,
    LabelSet,
    group_by_image,
    load_train_val,
)
from pipeline.data.text import Vocabulary, load_word_vectors
from pipeline.engine import timing
from pipeline.engine.distributed import DistContext, barrier, distributed_session, wrap_model
from pipeline.engine.history import EpochHistory, history_path, plot_histories, start_history
from pipeline.engine.loop import EpochScore, TrainStep, fit, train_one_epoch, warmup_cosine
from pipeline.engine.resume import GeneratorState, ResumeState, fingerprint, finish_run, start_run
from pipeline.engine.runtime import cpu_threads, oom_hint, resolve_device, reuse_freed_memory, seed_everything
from pipeline.io import OptionError, file_digest, write_json
from pipeline.metrics import binarize, samples_f1, tune_global_threshold
from pipeline.text_features import TextEncoder
from pipeline.train.caption_config import CaptionTrainConfig, idle_options

# Share of the updates spent warming the learning rate up (OneCycleLR's pct_start before).
WARMUP_SHARE = 0.1


def _bucketed_batches(
    lengths: torch.Tensor, batch_size: int, generator: torch.Generator, pool: int = 32
) -> list[torch.Tensor]:
    """Shuffled training batches of captions of similar length.

    Rows are shuffled, cut into pools of ``pool`` batches, sorted by length inside each
    pool, batched, and the batches shuffled. An RNN pays for every time step of a
    batch's longest caption, so similar lengths make an epoch markedly faster while
    batches stay random.
    """
    order = torch.randperm(len(lengths), generator=generator)
    batches: list[torch.Tensor] = []
    for start in range(0, len(order), batch_size * pool):
        chunk = order[start : start + batch_size * pool]
        chunk = chunk[torch.argsort(lengths[chunk], descending=True, stable=True)]
        batches.extend(chunk.split(batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=generator)]


@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    """Deterministic torch kernels for the duration of a run, restoring the caller's setting."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def train_caption_branch(config: CaptionTrainConfig) -> dict:
    """Train the caption branch, write its checkpoint, validation probabilities and settings.

    Returns a summary: ``best_epoch`` (of the first model) and ``best_epochs`` (one per
    ensemble member), ``val_samples_f1`` (of the averaged probabilities, at the tuned
    ``threshold``), ``val_samples_f1_at_0.5``, ``member_val_samples_f1``, ``seconds``
    and the paths written. Validation figures are None when the validation split is empty.
    """
    config.validate()
    reuse_freed_memory()
    start = time.perf_counter()
    with (
        _deterministic(),
        cpu_threads(config.threads),
        oom_hint(config.batch_size),
        distributed_session(resolve_device(config.device)) as (context, device),
    ):
        timing.reset()
        summary = _train(config, device, context)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    # The whole ensemble's training, per training caption.
    timing.add("caption (training)", time.perf_counter() - start, summary["train_captions"])
    summary["timing"] = timing.summary()
    if context.is_main:
        summary["summary"] = str(Path(config.weights_dir) / f"{BRANCH}_summary.json")
        write_json(summary["summary"], summary)
        tqdm.write(summary_line(summary))
    return summary


def summary_line(summary: dict) -> str:
    """What a person reads at the end of a run: the score, the time, where the files went; the
    full record is ``caption_summary.json``."""
    members = len(summary["best_epochs"])
    score = (
        "no validation split to score on"
        if summary["val_samples_f1"] is None
        else f"validation samples-F1 {summary['val_samples_f1']:.4f} at threshold {summary['threshold']:.2f}"
    )
    return (
        f"caption branch: {score}; {members} model{'s' if members != 1 else ''} (best epochs "
        f"{', '.join(map(str, summary['best_epochs']))}), {summary['seconds'] / 60:.1f} min; "
        f"wrote {summary['checkpoint']}; every figure: {summary['summary']}"
    )


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


def _score(config: CaptionTrainConfig, y_true: np.ndarray, probs: np.ndarray) -> tuple[float, float, float]:
    """(early-stopping score, its threshold, samples-F1 at 0.5) of validation probabilities."""
    f1_half = samples_f1(y_true, binarize(probs, 0.5))
    if not config.tune_threshold:
        return f1_half, 0.5, f1_half
    threshold, f1_tuned = tune_global_threshold(y_true, probs)
    return f1_tuned, threshold, f1_half


class _CaptionBatches:
    """An epoch's training batches (ids (B, T), lengths (B,), targets (B, L)) of this rank.

    Each iteration draws new length-bucketed batches from ``shuffle`` (a saved generator,
    so a resumed run draws the same ones); under torchrun every rank draws the same global
    batches and takes every N-th row of each.
    """

    def __init__(self, data: _Encoded, batch_size: int, shuffle: torch.Generator, context: DistContext) -> None:
        self.data, self.batch_size, self.shuffle, self.context = data, batch_size, shuffle, context
        self.targets = torch.from_numpy(data.labels)  # (N, L)

    def __len__(self) -> int:
        return math.ceil(len(self.data.lengths) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        world, rank = self.context.world_size, self.context.rank
        batch_rows = [
            rows[rank::world]
            for rows in _bucketed_batches(self.data.lengths, self.batch_size, self.shuffle)
            if len(rows) >= world
        ]  # every rank needs rows in every step
        for rows, batch_ids, batch_lengths in caption_batches(self.data.ids, self.data.lengths, batch_rows):
            yield batch_ids, batch_lengths, self.targets[rows]


def _fit_member(
    config: CaptionTrainConfig,
    seed: int,
    tag: str,
    train: _Encoded,
    val: _Encoded,
    vocab_size: int,
    embeddings: torch.Tensor | None,
    encoder: TextEncoder | None,
    device: torch.device,
    context: DistContext = DistContext(),
    state: ResumeState | None = None,
    history: EpochHistory | None = None,
    progress: bool = True,
) -> dict:
    """Train one model from ``seed``; keep its epoch with the best validation score.

    Under torchrun DistributedDataParallel averages the ranks' gradients; every rank scores
    the whole validation split, so all keep the same epoch. Returns the kept model's
    ``{"epoch", "score", "probs", "state"}``.
    """
    seed_everything(seed)
    model = build_model(model_settings(config), vocab_size, train.labels.shape[1], embeddings, encoder).to(device)
    loss_fn = nn.BCEWithLogitsLoss()
    # (B, L) logits; the lengths (b[1]) stay on the CPU.
    step = wrap_model(TrainStep(model, lambda m, b: loss_fn(m(b[0], b[1]), b[2]), host_inputs=(1,)), context)
    # The pretrained encoder layers only adapt: a rate fit for the new RNN would wreck them.
    top = [] if model.encoder_top is None else list(model.encoder_top.parameters())
    rest = [p for p in model.parameters() if all(p is not q for q in top)]
    groups = [{"params": rest}] + ([{"params": top, "lr": config.text_encoder_lr}] if top else [])
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    shuffle = torch.Generator().manual_seed(seed)
    loader = _CaptionBatches(train, config.batch_size, shuffle, context)
    # The image branch's schedule: a warm-up over the first 10% of the updates, then cosine
    # decay over the whole budget of epochs, so the last epochs fine-tune at a small rate.
    total_steps = config.epochs * len(loader)
    scheduler = warmup_cosine(optimizer, total_steps, round(WARMUP_SHARE * total_steps))

    def train_epoch(epoch: int) -> float:
        return train_one_epoch(
            step, loader, optimizer, device, epoch, scheduler=scheduler, context=context, name=tag, progress=progress
        )

    def score(epoch: int) -> EpochScore:
        if len(val.lengths) == 0:
            return EpochScore(None, {"probs": None})
        probs = val.groups.mean(predict_captions(model, val.ids, val.lengths, device, 256))
        value, threshold, f1_half = _score(config, val.image_labels, probs)
        return EpochScore(value, {"probs": probs}, f"val samples-F1 {f1_half:.4f} @0.5, {value:.4f} @{threshold:.2f}")

    best = fit(
        tag,
        config.epochs,
        train_epoch,
        score,
        model,
        state or ResumeState.off(),
        {"model": model, "optimizer": optimizer, "scheduler": scheduler, "shuffle": GeneratorState(shuffle)},
        patience=config.patience,
        context=context,
        history=history,
    )
    best["state"] = model.state_dict()
    return best


def member_processes(config: CaptionTrainConfig, device: torch.device, context: DistContext) -> int:
    """How many ensemble members train at once: ``--member-processes``, or for 0 the cores over
    ``--threads`` (one small model on one thread leaves the other cores idle), at most the
    ensemble; 1 where members cannot train apart, which an explicit count above 1 refuses."""
    cannot = [
        reason
        for reason, applies in (
            (f"--device {device.type} (forked members compute on the CPU)", device.type != "cpu"),
            ("torchrun (its processes already share the cores)", context.world_size > 1),
            ("--resume (members would rewrite one history file at once)", bool(config.resume)),
            ("--log tensorboard (its writer cannot be shared by processes)", config.log == "tensorboard"),
            ("--threads 0 (each member takes every core)", config.threads == 0),
        )
        if applies
    ]
    if config.member_processes > 1 and cannot:
        raise OptionError(f"--member-processes {config.member_processes} cannot act with {cannot[0]}; give 1 or 0")
    if config.member_processes:
        return min(config.member_processes, config.ensemble)
    return 1 if cannot else max(1, min(config.ensemble, usable_cores() // config.threads))


# The member-training function of the run in progress, set for the forked processes to inherit
# (the training data, hundreds of MB of token states, is shared by the fork rather than pickled).
_FORKED_FIT: Callable[[int], dict] | None = None


def _fit_forked(index: int) -> dict:
    """In a forked process: train member ``index``; the weights travel back as torch.save bytes."""
    assert _FORKED_FIT is not None
    member = _FORKED_FIT(index)
    buffer = io.BytesIO()
    torch.save(member.pop("state"), buffer)
    return {**member, "state_bytes": buffer.getvalue()}


def _fit_in_processes(fit_member: Callable[[int], dict], count: int, processes: int, threads: int) -> list[dict]:
    """Members 0..count-1 trained by ``processes`` forked processes of ``threads`` threads each.

    Each member seeds itself, so the models equal those trained one after another."""
    global _FORKED_FIT
    _FORKED_FIT = fit_member
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)  # what the forked processes start with
    try:
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            members = pool.map(_fit_forked, range(count), chunksize=1)
    finally:
        _FORKED_FIT = None
        torch.set_num_threads(previous)
    for member in members:
        member["state"] = torch.load(io.BytesIO(member.pop("state_bytes")), weights_only=True)
    return members


def _encode(
    config: CaptionTrainConfig, vocab: Vocabulary, frame: pd.DataFrame, label_set: LabelSet, encoder: TextEncoder | None
) -> _Encoded:
    # Every core: the small models train on --threads threads, and the encoder's matrix
    # products are what the cores are for.
    with cpu_threads(usable_cores()):
        ids, lengths = encode_captions(
            model_settings(config),
            vocab,
            frame[CAPTION_COLUMN].tolist(),
            config.max_len,
            Path(config.weights_dir) / "cache",
            encoder,
        )
    groups = group_by_image(frame)
    return _Encoded(
        ids=ids,
        lengths=lengths,
        labels=label_set.encode(frame[LABELS_COLUMN]),
        groups=groups,
        image_labels=label_set.encode(groups.images[LABELS_COLUMN]),
    )


def _train(config: CaptionTrainConfig, device: torch.device, context: DistContext) -> dict:
    idle = idle_options(config)
    processes = member_processes(config, device, context)  # refused before any work
    if context.is_main:
        for message in idle:
            tqdm.write(f"warning: {message}", file=sys.stderr)
    paths = DatasetPaths.resolve(config.data, config.images)
    label_set, train_df, val_df = load_train_val(paths, config.val_fraction)
    if CAPTION_COLUMN not in train_df:
        raise DataFormatError(
            f"{paths.train_csv}:1: no {CAPTION_COLUMN} column, so there is nothing for the caption branch to "
            "learn from; train the image branches alone with train_efficientnet.py"
        )
    vocab = Vocabulary.build(train_df[CAPTION_COLUMN], min_freq=config.min_freq, stem=config.stem)
    encoder = None if config.text_encoder == WORDS else TextEncoder(config.text_encoder)
    # A --weights-dir that cannot be a folder is refused by its own name, before the encoding
    # writes its cache inside it.
    Path(config.weights_dir).mkdir(parents=True, exist_ok=True)
    # Only rank 0 encodes into the cache; the other ranks then read it.
    if context.is_main:
        train = _encode(config, vocab, train_df, label_set, encoder)
    barrier(context)
    if not context.is_main:
        train = _encode(config, vocab, train_df, label_set, encoder)
    val = _encode(config, vocab, val_df, label_set, encoder)
    has_val = len(val_df) > 0
    if not has_val and context.is_main:
        tqdm.write("caption: the validation split is empty; keeping each model's last epoch")

    embeddings = None
    if config.word_vectors:
        # Read once: every ensemble member starts from the same pretrained vectors.
        embeddings, covered = load_word_vectors(
            config.word_vectors, vocab, config.embed_dim, torch.Generator().manual_seed(config.seed)
        )
        if context.is_main:
            tqdm.write(f"caption: {covered}/{len(vocab)} vocabulary words found in {config.word_vectors}")

    resume_dir = start_run(config.weights_dir, "caption", config.resume, context)
    digest = fingerprint(dataclasses.asdict(config), train_csv=file_digest(paths.train_csv))
    history = start_history(
        history_path(config.weights_dir, BRANCH), config.resume, context, config.log, config.keep_best
    )

    def fit_member(i: int) -> dict:
        tag = "caption" if config.ensemble == 1 else f"caption model {i + 1}/{config.ensemble}"
        state = ResumeState(resume_dir, f"member{i}", digest, config.resume, context)
        return _fit_member(
            config,
            config.seed + i,
            tag,
            train,
            val,
            len(vocab),
            embeddings,
            encoder,
            device,
            context,
            state,
            history.for_stage(BRANCH, i),
            progress=processes == 1,
        )

    if processes == 1:
        members = [fit_member(i) for i in range(config.ensemble)]
    else:
        if context.is_main:
            tqdm.write(f"caption: training {config.ensemble} models, {processes} at a time (--member-processes)")
        members = _fit_in_processes(fit_member, config.ensemble, processes, config.threads)
    history.group_members()

    ensemble = build_ensemble(model_settings(config), config.ensemble, len(vocab), len(label_set), encoder)
    for model, member in zip(ensemble, members, strict=True):
        model.load_state_dict(member["state"])
    if has_val:
        val_probs = np.mean([member["probs"] for member in members], axis=0)  # (images, L)
        score, threshold, f1_half = _score(config, val.image_labels, val_probs)
    else:
        val_probs = np.zeros((0, len(label_set)))
        score, threshold, f1_half = None, 0.5, None

    weights_dir = Path(config.weights_dir)
    ckpt = checkpoint_path(weights_dir, BRANCH)
    probs_file = probabilities_path(weights_dir, BRANCH)
    config_file = weights_dir / f"{BRANCH}_config.json"
    if context.is_main:
        save_checkpoint(
            ckpt,
            branch=BRANCH,
            state_dict=ensemble.state_dict(),
            config=dataclasses.asdict(config),
            label_ids=label_set.ids,
            vocab=vocab.to_list(),
            epochs=[m["epoch"] for m in members],
            threshold=threshold,
            text_encoder_digest=None if encoder is None else encoder.digest,
        )
        save_probabilities(probs_file, val.groups.images[ID_COLUMN].tolist(), label_set.ids, val_probs)
        # The device as resolved, so --config of the file runs where this run ran.
        save_config(dataclasses.replace(config, device=device.type), config_file, {"device": config.device})
        plot_histories(weights_dir)
    barrier(context)
    finish_run(resume_dir, context)
    return {
        "train_captions": len(train_df),
        "processes": context.world_size,
        "best_epoch": members[0]["epoch"],
        "best_epochs": [m["epoch"] for m in members],
        "member_val_samples_f1": [None if m["score"] is None else round(m["score"], 4) for m in members],
        "val_samples_f1": None if score is None else round(score, 4),
        "val_samples_f1_at_0.5": None if f1_half is None else round(f1_half, 4),
        "threshold": threshold,
        "vocab_size": len(vocab),
        "checkpoint": str(ckpt),
        "val_probs": str(probs_file),
        "config": str(config_file),
        "options_without_effect": idle,
    }
