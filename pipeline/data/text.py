"""Caption tokenisation and the vocabulary of the caption branch.

Tokenisation uses nltk's ``wordpunct_tokenize`` (a regular expression) and, optionally,
its Porter stemmer (rules in code): neither needs downloaded nltk data, so both behave
the same on every machine. The vocabulary travels inside the checkpoint as a plain list
of tokens (plus the stemming switch in the settings), so inference tokenises and
indexes exactly as training did.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from nltk.stem import PorterStemmer
from nltk.tokenize import wordpunct_tokenize

PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
PAD_ID = 0
UNK_ID = 1
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN)


_STEMMER = PorterStemmer()


@functools.lru_cache(maxsize=1 << 16)
def stem_token(token: str) -> str:
    """Porter stem of a lower-cased token ("giraffes" -> "giraff"); cached, captions repeat words."""
    return _STEMMER.stem(token)


def tokenize(text: str | None, stem: bool = False) -> list[str]:
    """Lower-cased word and punctuation tokens of a caption, stemmed if asked; ``None``/NaN gives ``[]``."""
    if not isinstance(text, str):
        # pandas gives NaN (a float) for an empty caption field.
        return []
    tokens = wordpunct_tokenize(text.lower())
    return [stem_token(token) for token in tokens] if stem else tokens


class Vocabulary:
    """Token <-> id mapping with ``<pad>`` = 0 and ``<unk>`` = 1.

    ``stem`` says whether the tokens are Porter stems; :meth:`encode` tokenises the same way.
    """

    def __init__(self, tokens: Sequence[str], stem: bool = False) -> None:
        tokens = list(tokens)
        if tokens[:2] != list(SPECIAL_TOKENS):
            raise ValueError(f"a vocabulary list must start with {list(SPECIAL_TOKENS)}, got {tokens[:2]}")
        if len(set(tokens)) != len(tokens):
            raise ValueError("a vocabulary list must not repeat a token")
        self.tokens: list[str] = tokens
        self.stem = stem
        self.index: dict[str, int] = {token: i for i, token in enumerate(tokens)}

    @classmethod
    def build(cls, texts: Iterable[str], min_freq: int = 2, stem: bool = False) -> Vocabulary:
        """Vocabulary of the tokens seen at least ``min_freq`` times in ``texts``.

        Tokens are ordered by decreasing count, ties alphabetically, so the same texts
        always give the same ids.
        """
        if min_freq < 1:
            raise ValueError(f"--min-freq must be >= 1, got {min_freq}")
        counts = Counter(token for text in texts for token in tokenize(text, stem))
        kept = sorted(
            (t for t, n in counts.items() if n >= min_freq and t not in SPECIAL_TOKENS),
            key=lambda t: (-counts[t], t),
        )
        return cls([*SPECIAL_TOKENS, *kept], stem)

    def to_list(self) -> list[str]:
        """The plain list of tokens (id = position) stored in the checkpoint; ``Vocabulary(tokens,
        stem)`` rebuilds the vocabulary from it."""
        return list(self.tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.tokens == other.tokens and self.stem == other.stem

    def lookup(self, tokens: Iterable[str]) -> list[int]:
        """Ids of tokens, ``<unk>`` for unseen ones."""
        return [self.index.get(token, UNK_ID) for token in tokens]

    def encode(self, texts: Sequence[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded ids (N, T) int64 and lengths (N,) int64 of captions, cut at ``max_len``.

        T is the longest encoded caption (at most ``max_len``). An empty caption becomes a
        single ``<unk>`` so every row has length >= 1 (packed sequences refuse length 0)
        and still gets a prediction.
        """
        if max_len < 1:
            raise ValueError(f"--max-len must be >= 1, got {max_len}")
        rows = [self.lookup(tokenize(text, self.stem))[:max_len] or [UNK_ID] for text in texts]
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)  # (N,)
        width = int(lengths.max()) if rows else 1
        ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)  # (N, T)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return ids, lengths


def load_word_vectors(
    path: str | Path, vocab: Vocabulary, embed_dim: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, int]:
    """Embedding matrix (V, E) from a GloVe-format text file, and how many tokens it covered.

    Each line of the file is a token and its ``embed_dim`` numbers, separated by spaces.
    Tokens the file lacks get random vectors of the file's own scale, so they start on
    an equal footing; ``<pad>`` is all zeros. File words are lower-cased (and stemmed
    when the vocabulary is) before matching, like :func:`tokenize`; for a stem, the
    file's first word with that stem wins (GloVe lists frequent words first).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--word-vectors {path}: no such file")
    found: dict[int, list[float]] = {}
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            parts = line.rstrip("\n").rstrip().split(" ")
            if len(parts) == 2 and number == 1:
                continue  # a word2vec-style "count dim" header line
            if len(parts) < 2:
                continue
            if len(parts) - 1 != embed_dim:
                raise ValueError(
                    f"--word-vectors {path}:{number}: vectors of {len(parts) - 1} numbers, "
                    f"but --embed-dim is {embed_dim}; pass --embed-dim {len(parts) - 1}"
                )
            word = parts[0].lower()
            token_id = vocab.index.get(stem_token(word) if vocab.stem else word)
            # The first vector of a token wins: GloVe files list frequent words and casings first.
            if token_id is None or token_id in found:
                continue
            try:
                found[token_id] = [float(x) for x in parts[1:]]
            except ValueError:
                raise ValueError(f"--word-vectors {path}:{number}: a value is not a number") from None
    if found:
        known = torch.tensor(list(found.values()), dtype=torch.float32)  # (K, E)
        scale = float(known.std())
    else:
        scale = 1.0
    weights = torch.randn(len(vocab), embed_dim, generator=generator) * scale  # (V, E)
    for token_id, vector in found.items():
        weights[token_id] = torch.tensor(vector)
    weights[PAD_ID] = 0.0
    return weights, len(found)
