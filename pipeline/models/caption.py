"""Caption classifier: embedding -> (bi)LSTM/GRU over packed sequences -> masked pooling -> logits.

The module takes token ids (or a pretrained text encoder's token states) and lengths and
returns one logit per label; vocabulary, encoders, files and loaders live elsewhere
(``pipeline.data.text``, ``pipeline.text_features``, ``pipeline.train.caption``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

# The recurrent layers a caption model can use (``--rnn``).
RNN_TYPES: dict[str, type[nn.LSTM | nn.GRU]] = {"lstm": nn.LSTM, "gru": nn.GRU}


def rnn_class(name: str) -> type[nn.LSTM | nn.GRU]:
    """The recurrent layer class registered under ``name``."""
    try:
        return RNN_TYPES[name]
    except KeyError:
        raise ValueError(f"--rnn {name!r}: unknown recurrent layer; valid: {', '.join(RNN_TYPES)}") from None


class EncoderTop(nn.Module):
    """The last layers of a pretrained transformer text encoder, trained with a caption model.

    The frozen layers below run once and their states are cached; these read them with
    padding masked out of the attention, as the whole encoder would.
    """

    def __init__(self, layers: nn.ModuleList) -> None:
        super().__init__()
        self.layers = layers

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """States (B, T, D) and the real-token mask (B, T) -> states (B, T, D), zero at padding."""
        additive = torch.zeros(mask.shape, dtype=states.dtype, device=states.device)
        additive = additive.masked_fill(~mask, torch.finfo(states.dtype).min)[:, None, None, :]  # (B, 1, 1, T)
        for layer in self.layers:
            out = layer(states, attention_mask=additive)
            states = out[0] if isinstance(out, tuple) else out
        return states * mask[..., None]


class CaptionClassifier(nn.Module):
    """Multi-label classifier over a tokenised caption.

    Max and mean pooling are taken over the real tokens only, so a caption's logits do
    not depend on how much padding its batch needed. Max pooling picks up a single
    decisive word ("horse"), mean pooling the overall gist; the head sees both.
    Below, H is the RNN's output size: ``hidden_size`` times the number of directions.

    With ``label_attention`` each label also gets its own attention over the words (a
    learnt query per label) and a logit from what it attends to, added to the pooled
    head's logit: "bus" can look at "bus" and "station" while "person" looks at "man".

    With ``token_dim`` the model has no embedding of its own: it reads a frozen pretrained
    encoder's token states (B, T, token_dim) in place of ids, so a word it never saw in
    training still arrives with its meaning; with ``encoder_top`` too, the encoder's last
    layers (:class:`EncoderTop`) turn those states into the ones the RNN reads, and train with it.
    """

    def __init__(
        self,
        vocab_size: int,
        num_labels: int,
        *,
        rnn_type: str = "lstm",
        embed_dim: int = 64,
        hidden_size: int = 64,
        layers: int = 1,
        dropout: float = 0.3,
        embed_dropout: float = 0.1,
        bidirectional: bool = True,
        label_attention: bool = True,
        pad_id: int = 0,
        embeddings: torch.Tensor | None = None,
        token_dim: int | None = None,
        encoder_top: EncoderTop | None = None,
    ) -> None:
        super().__init__()
        if token_dim is not None and embeddings is not None:
            raise ValueError("a model reading encoder token states (token_dim) has no word embedding to initialise")
        if encoder_top is not None and token_dim is None:
            raise ValueError("encoder_top reads encoder token states: give token_dim too")
        self.encoder_top = encoder_top
        if embeddings is not None and tuple(embeddings.shape) != (vocab_size, embed_dim):
            raise ValueError(
                f"pretrained embeddings have shape {tuple(embeddings.shape)}, expected ({vocab_size}, {embed_dim})"
            )
        self.pad_id = pad_id
        embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id) if token_dim is None else None
        if embedding is not None and embeddings is not None:  # (embeddings come without token_dim: checked above)
            with torch.no_grad():
                embedding.weight.copy_(embeddings)
                embedding.weight[pad_id].zero_()
        self.embedding = embedding
        self.embed_dropout = embed_dropout
        self.rnn = rnn_class(rnn_type)(
            embed_dim if token_dim is None else token_dim,
            hidden_size,
            num_layers=layers,
            batch_first=True,
            bidirectional=bidirectional,
            # nn.LSTM/GRU apply dropout only between stacked layers (and warn otherwise).
            dropout=dropout if layers > 1 else 0.0,
        )
        features = hidden_size * (2 if bidirectional else 1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(2 * features, num_labels)
        self.label_attention = label_attention
        if label_attention:
            self.label_queries = nn.Parameter(torch.randn(num_labels, features) * 0.05)  # (L, H)
            # Zero start: training begins from the pooled head alone and adds attention as it helps.
            self.label_weights = nn.Parameter(torch.zeros(num_labels, features))  # (L, H)

    def _drop_words(self, embedded: torch.Tensor) -> torch.Tensor:
        """Zero whole token vectors at random while training (word dropout).

        Dropping entire words, rather than single coordinates, makes the model use
        every label cue in a caption instead of leaning on one keyword.
        """
        if not self.training or self.embed_dropout == 0.0:
            return embedded
        keep = torch.full(embedded.shape[:2], 1.0 - self.embed_dropout, device=embedded.device)  # (B, T)
        mask = torch.bernoulli(keep).unsqueeze(-1) / (1.0 - self.embed_dropout)  # (B, T, 1)
        return embedded * mask

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Logits (B, L) for padded token ids (B, T), or token states (B, T, token_dim) of any
        float dtype, and lengths (B,), all lengths >= 1.

        ``lengths`` stay on the CPU whatever the model's device: pack_padded_sequence reads
        them there, and copying them back from an accelerator would wait for it.
        """
        width = ids.shape[1]
        real = torch.arange(width, device=ids.device)[None, :] < lengths.to(ids.device, non_blocking=True)[:, None]
        tokens = self.embedding(ids) if self.embedding is not None else ids.to(self.head.weight.dtype)
        if self.encoder_top is not None:
            tokens = self.encoder_top(tokens, real)
        embedded = self._drop_words(tokens)  # (B, T, E)
        packed = pack_padded_sequence(embedded, lengths, batch_first=True, enforce_sorted=False)
        outputs, _ = self.rnn(packed)
        states, _ = pad_packed_sequence(outputs, batch_first=True, total_length=width)  # (B, T, H)
        mask = real.unsqueeze(-1)  # (B, T, 1)
        max_pool = states.masked_fill(~mask, float("-inf")).amax(dim=1)  # (B, H)
        mean_pool = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)  # (B, H)
        pooled = torch.cat([max_pool, mean_pool], dim=1)  # (B, 2H)
        logits = self.head(self.dropout(pooled))  # (B, L)
        if self.label_attention:
            scores = torch.einsum("bth,lh->blt", states, self.label_queries)  # (B, L, T)
            scores = scores.masked_fill(~mask.transpose(1, 2), float("-inf"))  # padding gets weight 0
            context = torch.einsum("blt,bth->blh", scores.softmax(dim=-1), self.dropout(states))  # (B, L, H)
            logits = logits + (context * self.label_weights).sum(dim=-1)  # (B, L)
        return logits
