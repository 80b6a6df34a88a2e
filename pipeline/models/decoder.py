"""CNN-RNN label-sequence decoder (Wang et al. 2016, "CNN-RNN: A Unified Framework for
Multi-label Image Classification").

A multi-label target is turned into a sequence of label indices in a fixed order
(most frequent label first by default) ended by an END token; an LSTM over label
embeddings, conditioned on pooled image features, learns to emit that sequence, and
beam search decodes a label set plus per-label scores for fusion with other branches.

Token ids, for ``L`` labels (see ``token_ids``):

* ``0 .. L-1``: the labels (column indices of the multi-hot matrix),
* ``L``: END, the only non-label output of the decoder (outputs are ``L + 1`` logits),
* ``L + 1``: START, the first input of every sequence,
* ``L + 2``: PAD, padding of inputs and targets after END (ignored by the loss).

The module knows nothing about files or loaders: it maps a float feature tensor
``(B, F)`` to logits / label sets, so it trains equally on cached features or jointly
with a backbone. With ``caption_dim`` it also reads a caption vector ``(B, D)`` per image
(a sentence encoder's), which sets its initial state together with the image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

Order = Literal["frequent", "rare"]
ArrayLike = Tensor | np.ndarray


class TokenIds(NamedTuple):
    """Special token ids for ``num_labels`` labels; labels are ``0 .. num_labels - 1``."""

    end: int
    start: int
    pad: int


def token_ids(num_labels: int) -> TokenIds:
    """END = L, START = L + 1, PAD = L + 2."""
    return TokenIds(end=num_labels, start=num_labels + 1, pad=num_labels + 2)


def label_rank(train_multi_hot: ArrayLike, order: Order = "frequent") -> Tensor:
    """Position of every label in the emission order, from a (N, L) 0/1 training matrix.

    Returns a long tensor ``rank`` of shape (L,): ``rank[j]`` is the position at which
    label ``j`` is emitted (0 = first). ``"frequent"`` puts the most frequent training
    label first, ``"rare"`` the least frequent; ties go to the lower label index, so the
    order is deterministic.
    """
    if order not in ("frequent", "rare"):
        raise ValueError(f"order must be 'frequent' or 'rare', got {order!r}")
    train = torch.as_tensor(train_multi_hot)
    if train.ndim != 2:
        raise ValueError(f"expected a (N, L) training matrix, got shape {tuple(train.shape)}")
    counts = (train != 0).sum(dim=0)  # (L,)
    key = -counts if order == "frequent" else counts
    labels_in_order = torch.sort(key, stable=True).indices  # (L,) label at each position
    rank = torch.empty_like(labels_in_order)
    rank[labels_in_order] = torch.arange(len(rank))
    return rank


def make_sequences(multi_hot: ArrayLike, rank: Tensor, length: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Teacher-forcing sequences for a (B, L) 0/1 matrix, labels ordered by ``rank``.

    With ``k`` labels in a row and ``T = max k + 1`` over the batch (or ``T = length``,
    which must be at least that; ``L + 1`` always is):

    * ``targets[b] = [l_1, ..., l_k, END, PAD, ...]`` (the labels in rank order),
    * ``inputs[b]  = [START, l_1, ..., l_k, PAD, ...]`` (targets shifted right),
    * ``mask[b]    = [True] * (k + 1) + [False] * (T - k - 1)``.

    Returns ``(inputs, targets, mask)``, long/long/bool tensors of shape (B, T) on the
    device of ``rank``. A row without labels yields the single target END. Without
    ``length`` the longest row is read back to the host, which waits for an accelerator.
    """
    rank = torch.as_tensor(rank)
    present = torch.as_tensor(multi_hot, device=rank.device) != 0  # (B, L)
    if present.ndim != 2 or present.shape[1] != rank.shape[0]:
        raise ValueError(f"multi_hot must be (B, {rank.shape[0]}), got {tuple(present.shape)}")
    batch, num_labels = present.shape
    tok = token_ids(num_labels)

    # Present labels keep their rank, absent ones sort after all of them.
    key = rank.unsqueeze(0) + num_labels * (~present).long()  # (B, L)
    sorted_labels = torch.sort(key, dim=1, stable=True).indices  # (B, L)
    counts = present.sum(dim=1, keepdim=True)  # (B, 1)
    if length is None:
        length = int(counts.max()) + 1 if batch else 1
    pos = torch.arange(length, device=rank.device).unsqueeze(0)  # (1, T)

    labels = F.pad(sorted_labels[:, : length - 1], (0, 1), value=tok.pad)  # (B, T)
    targets = torch.where(pos < counts, labels, torch.where(pos == counts, tok.end, tok.pad))
    inputs = torch.cat(
        [torch.full((batch, 1), tok.start, dtype=torch.long, device=rank.device), targets[:, :-1]],
        dim=1,
    )  # (B, T)
    # END is never an input: what follows END is padding.
    inputs = inputs.masked_fill(inputs == tok.end, tok.pad)
    mask = pos <= counts  # (B, T)
    return inputs, targets, mask


@dataclass(frozen=True)
class LabelOrder:
    """A fixed label emission order; checkpoints store ``to_list()`` to record it."""

    rank: Tensor  # (L,) long; rank[j] = emission position of label j

    @classmethod
    def from_train(cls, train_multi_hot: ArrayLike, order: Order = "frequent") -> LabelOrder:
        """Order labels by their frequency in a (N, L) training matrix (see ``label_rank``)."""
        return cls(label_rank(train_multi_hot, order))

    def to_list(self) -> list[int]:
        return self.rank.tolist()


class LabelDecoder(nn.Module):
    """LSTM over label embeddings, conditioned on pooled image features.

    Architecture (one step, ``I`` = projected image features):

    * ``I = Dropout(ReLU(Linear(LayerNorm(features))))``, computed once per image;
    * initial state ``h0 = tanh(W_h I)``, ``c0 = W_c I``; with ``caption_dim`` (the
      caption read too) ``h0 = tanh(W_h I + V_h S)``, ``c0 = W_c I + V_c S`` for the caption
      vector ``S = Dropout(LayerNorm(caption))``, so the label sequence starts from both
      modalities and the LSTM carries the caption's evidence through every step;
    * LSTM input at every step: ``[embed(token); I]``, so the image stays visible even
      after the recurrent state has drifted over a long sequence;
    * the paper's projection layer merges the recurrent output and the image,
      ``o = Dropout(ReLU(U_r h + U_I I))`` (size ``embed_dim``);
    * logits over ``L + 1`` tokens (labels + END): with ``tie_embeddings`` (the paper's
      choice) ``o`` is scored against the label/END embeddings, else a Linear layer.

    The input LayerNorm keeps the conditioning well scaled whatever the backbone's
    feature statistics, which matters when the backbone is fine-tuned jointly.
    """

    def __init__(
        self,
        feature_dim: int,
        num_labels: int,
        embed_dim: int = 256,
        hidden_dim: int = 512,
        dropout: float = 0.3,
        image_dim: int | None = None,
        tie_embeddings: bool = True,
        caption_dim: int = 0,
    ) -> None:
        super().__init__()
        if num_labels < 1:
            raise ValueError("num_labels must be positive")
        self.feature_dim = feature_dim
        self.num_labels = num_labels
        self.embed_dim = embed_dim
        self.hidden_dim = hidden_dim
        self.image_dim = image_dim or embed_dim
        self.tie_embeddings = tie_embeddings
        self.caption_dim = caption_dim
        self.tokens = token_ids(num_labels)

        self.feature_norm = nn.LayerNorm(feature_dim)
        self.image_proj = nn.Linear(feature_dim, self.image_dim)
        self.init_h = nn.Linear(self.image_dim, hidden_dim)
        self.init_c = nn.Linear(self.image_dim, hidden_dim)
        if caption_dim:
            self.caption_norm = nn.LayerNorm(caption_dim)
            self.caption_init = nn.Linear(caption_dim, 2 * hidden_dim)  # (V_h; V_c)
        self.embed = nn.Embedding(num_labels + 3, embed_dim, padding_idx=self.tokens.pad)
        self.lstm = nn.LSTM(embed_dim + self.image_dim, hidden_dim, batch_first=True)
        self.merge_h = nn.Linear(hidden_dim, embed_dim)
        self.merge_img = nn.Linear(self.image_dim, embed_dim, bias=False)
        self.dropout = nn.Dropout(dropout)
        if tie_embeddings:
            self.out_bias = nn.Parameter(torch.zeros(num_labels + 1))
        else:
            self.out = nn.Linear(embed_dim, num_labels + 1)

        # The default N(0, 1) embedding would make tied logits huge at initialisation.
        nn.init.normal_(self.embed.weight, std=embed_dim**-0.5)
        with torch.no_grad():
            self.embed.weight[self.tokens.pad].zero_()
            # Forget-gate bias 1 (a common LSTM initialisation): keeps earlier labels in
            # memory from the start of training.
            self.lstm.get_parameter("bias_ih_l0")[hidden_dim : 2 * hidden_dim].fill_(1.0)

    @property
    def num_outputs(self) -> int:
        """L + 1: the labels and END."""
        return self.num_labels + 1

    def _image(self, features: Tensor) -> Tensor:
        features = features.to(self.image_proj.weight.dtype)
        return self.dropout(F.relu(self.image_proj(self.feature_norm(features))))  # (B, D)

    def _initial_state(self, image: Tensor, captions: Tensor | None) -> tuple[Tensor, Tensor]:
        """(h0, c0), each (B, H), of the projected image (B, D) and, for a decoder that reads
        captions, the caption vectors (B, caption_dim); a mismatch is an error."""
        if (captions is not None) != bool(self.caption_dim):
            raise ValueError(
                f"this decoder reads caption vectors of size {self.caption_dim}: pass them"
                if self.caption_dim
                else "this decoder reads no captions (caption_dim 0)"
            )
        h, c = self.init_h(image), self.init_c(image)
        if captions is not None:
            if captions.shape != (len(image), self.caption_dim):
                raise ValueError(
                    f"caption vectors must be ({len(image)}, {self.caption_dim}), got {tuple(captions.shape)}"
                )
            captions = captions.to(device=image.device, dtype=self.caption_init.weight.dtype)
            from_caption = self.caption_init(self.dropout(self.caption_norm(captions)))  # (B, 2H)
            h, c = h + from_caption[:, : self.hidden_dim], c + from_caption[:, self.hidden_dim :]
        return torch.tanh(h), c

    def _output_weight_bias(self) -> tuple[Tensor, Tensor]:
        if self.tie_embeddings:
            return self.embed.weight[: self.num_outputs], self.out_bias  # (L+1, E), (L+1,)
        return self.out.weight, self.out.bias

    def forward(self, features: Tensor, inputs: Tensor, captions: Tensor | None = None) -> Tensor:
        """Teacher-forced logits: features (B, F), inputs (B, T) token ids (and caption vectors
        (B, caption_dim) for a decoder that reads them) -> (B, T, L + 1)."""
        image = self._image(features)  # (B, D)
        h0, c0 = self._initial_state(image, captions)
        h0, c0 = h0.unsqueeze(0), c0.unsqueeze(0)  # (1, B, H) each
        emb = self.dropout(self.embed(inputs))  # (B, T, E)
        steps = inputs.shape[1]
        lstm_in = torch.cat([emb, image.unsqueeze(1).expand(-1, steps, -1)], dim=2)  # (B, T, E+D)
        out, _ = self.lstm(lstm_in, (h0, c0))  # (B, T, H)
        merged = F.relu(self.merge_h(out) + self.merge_img(image).unsqueeze(1))  # (B, T, E)
        weight, bias = self._output_weight_bias()
        return F.linear(self.dropout(merged), weight, bias)  # (B, T, L+1)

    def loss(self, features: Tensor, multi_hot: ArrayLike, rank: Tensor, captions: Tensor | None = None) -> Tensor:
        """Cross-entropy of the ordered label sequences: summed over each sequence's steps
        (padding excluded), averaged over the images.

        Averaging per image rather than per step keeps the loss of a batch split across
        DistributedDataParallel processes equal to the loss of the whole batch.
        ``multi_hot`` is the (B, L) 0/1 target; ``rank`` fixes the order (``label_rank``);
        ``captions`` the (B, caption_dim) caption vectors of a decoder that reads them.

        The sequences always take ``L + 1`` steps: the batch's longest label set would have
        to be read back to the host, a wait for the device in every training step. The
        steps past a row's END are PAD targets, which the loss ignores, and the LSTM only
        looks back, so the loss equals that of sequences cut to the longest row.
        """
        inputs, targets, _ = make_sequences(multi_hot, rank.to(features.device), self.num_labels + 1)  # (B, L+1)
        logits = self(features, inputs, captions)  # (B, T, L+1)
        summed = F.cross_entropy(
            logits.reshape(-1, self.num_outputs),
            targets.reshape(-1),
            ignore_index=self.tokens.pad,  # PAD targets are exactly the masked-out steps
            reduction="sum",
        )
        return summed / max(len(features), 1)

    @torch.no_grad()
    def beam_search(
        self,
        features: Tensor,
        beam_width: int = 3,
        max_steps: int | None = None,
        marginal_weight: float = 0.5,
        captions: Tensor | None = None,
    ) -> tuple[list[list[int]], Tensor]:
        """Decode label sets, batched over images and beams (a Python loop only over steps).

        Every beam emits labels until END or ``max_steps`` labels (default L, then END is
        forced). A label already in the beam is masked out, and END is masked at step 0,
        so sequences hold 1..max_steps distinct labels; step distributions are
        renormalised over the allowed tokens. Beam scores are plain sequence log-probs
        (no length normalisation). ``beam_width=1`` is greedy decoding. Runs in eval
        mode (dropout off) without gradients; the training mode is restored afterwards.

        Returns ``(label_sets, scores)``: the best beam's labels per image (ascending
        label indices) and a (B, L) float tensor in [0, 1],
        ``scores = (1 - marginal_weight) * mass + marginal_weight * marginal``:

        * ``mass[j]``: probability mass of the final (finished) beams containing label j,
          divided by the mass of all final beams -- the requested beam posterior, but it
          only takes a handful of distinct values (0/1 with beam_width=1);
        * ``marginal[j]``: a lower bound on the model's probability that label j is in
          the set. Along a beam ``y_1..y_n``, the events "follow the beam for t steps,
          then emit j" (for each step t before j is emitted, if ever) are disjoint and
          all contain j, so ``q(j) = sum_t P(y_<t) * p(j | y_<t)`` is a lower bound on
          ``P(j in set)``; ``marginal`` takes the max over the final beams. It grades
          every label, including those the beams never emitted, which ranking metrics
          (mAP) and fusion need.

        With the default ``marginal_weight = 0.5`` and ``beam_width=1``, labels of the
        greedy set score >= 0.5 and other labels < 0.5 (up to rounding), so a 0.5
        threshold reproduces the greedy set. ``marginal_weight = 0`` gives the pure beam
        mass, ``1`` the pure lower-bound marginal. Scores are on the model's device.
        ``captions``: the (B, caption_dim) caption vectors of a decoder that reads them.
        """
        if beam_width < 1:
            raise ValueError("beam_width must be >= 1")
        if not 0.0 <= marginal_weight <= 1.0:
            raise ValueError("marginal_weight must be in [0, 1]")
        num_labels = self.num_labels
        max_steps = num_labels if max_steps is None else min(max_steps, num_labels)
        if max_steps < 1:
            raise ValueError("max_steps must be >= 1")
        was_training = self.training
        self.eval()
        try:
            return self._beam_search(features, beam_width, max_steps, marginal_weight, captions)
        finally:
            self.train(was_training)

    def _beam_search(
        self, features: Tensor, beam_width: int, max_steps: int, marginal_weight: float, captions: Tensor | None
    ) -> tuple[list[list[int]], Tensor]:
        num_labels, end, num_out = self.num_labels, self.tokens.end, self.num_outputs
        batch, k = features.shape[0], beam_width
        rows = batch * k
        device = self.embed.weight.device
        features = features.to(device)
        if batch == 0:
            return [], torch.zeros(0, num_labels, device=device)
        image = self._image(features)  # (B, D)
        h0, c0 = self._initial_state(image, captions)  # (B, H) each

        # Image-dependent terms are constant over steps: compute them once per image
        # (not per beam) and gather them by image index. The embedding part of the LSTM
        # input projection becomes a (V, 4H) table, applied as a one-hot block appended
        # to h, so one matmul does the recurrence and the token input. The gates are
        # permuted from nn.LSTM's (i, f, g, o) to (i, f, o, g) so that one sigmoid call
        # covers three of them.
        hid, vocab = self.hidden_dim, self.embed.num_embeddings
        perm = torch.cat([torch.arange(2 * hid), torch.arange(3 * hid, 4 * hid), torch.arange(2 * hid, 3 * hid)]).to(
            device
        )  # (4H,)
        # get_parameter: the LSTM's weights typed as tensors (attribute access gives Tensor | Module).
        lstm = self.lstm.get_parameter
        w_ih = lstm("weight_ih_l0")[perm]  # (4H, E+D)
        w_emb, w_img = w_ih[:, : self.embed_dim], w_ih[:, self.embed_dim :]
        bias = (lstm("bias_ih_l0") + lstm("bias_hh_l0"))[perm]  # (4H,)
        img_gates = image @ w_img.T + bias  # (B, 4H)
        token_gates = self.embed.weight @ w_emb.T  # (V, 4H)
        w_rec = torch.cat([lstm("weight_hh_l0")[perm].T, token_gates])  # (H+V, 4H)
        img_merge = self.merge_img(image) + self.merge_h.bias  # (B, E)
        out_w, out_b = self._output_weight_bias()  # (L+1, E), (L+1,)

        # Recurrent states live in a compact store holding one row per beam that was
        # active at the last step; ptr[r] is the store row of beam r. Finished beams need
        # no state, and re-pointing replaces copying states when beams are reordered.
        dtype = image.dtype
        store_h = torch.zeros(batch, hid + vocab, dtype=dtype, device=device)  # (S, H+V)
        store_h[:, :hid] = h0
        store_c = c0  # (S, H)
        row_image = torch.arange(batch, device=device).repeat_interleave(k)  # (B*K,)
        ptr = row_image.clone()  # (B*K,)
        tokens = torch.full((rows,), self.tokens.start, dtype=torch.long, device=device)
        # Only beam 0 is alive at first, so the K beams do not start as K copies.
        beam_logp = torch.full((batch, k), float("-inf"), device=device)  # (B, K)
        beam_logp[:, 0] = 0.0
        used = torch.zeros(rows, num_labels, dtype=torch.bool, device=device)  # (B*K, L)
        finished = torch.zeros(rows, dtype=torch.bool, device=device)  # (B*K,)
        marginal = torch.zeros(rows, num_labels, device=device)  # (B*K, L) q(j) per beam
        # A finished beam has a single continuation: END again, at no cost.
        finished_logp = torch.full((num_out,), float("-inf"), device=device)  # (L+1,)
        finished_logp[end] = 0.0
        base = (torch.arange(batch, device=device) * k).unsqueeze(1)  # (B, 1)

        for step in range(max_steps + 1):
            # Beams with -inf score (the K-1 placeholders at step 0, or when fewer than K
            # sequences exist) cannot affect the result: skip them like finished ones.
            alive = ~finished & beam_logp.view(-1).isfinite()  # (B*K,)
            active = alive.nonzero().squeeze(1)  # (A,)
            n_act = active.numel()
            if n_act == 0:
                break
            act_image, act_ptr = row_image[active], ptr[active]  # (A,), (A,)
            x = store_h.index_select(0, act_ptr)  # (A, H+V)
            x[torch.arange(n_act, device=device), hid + tokens[active]] = 1.0
            # In-place addmm accumulates into the gathered image term without another copy.
            gates = img_gates.index_select(0, act_image).addmm_(x, w_rec)  # (A, 4H)
            sig = gates[:, : 3 * hid].sigmoid_()  # (A, 3H): i, f, o
            cell = gates[:, 3 * hid :].tanh_()  # (A, H)
            store_c = torch.addcmul(
                sig[:, hid : 2 * hid] * store_c.index_select(0, act_ptr), sig[:, :hid], cell
            )  # (A, H)
            store_h = torch.empty(n_act, hid + vocab, dtype=dtype, device=device)  # (A, H+V)
            store_h[:, hid:] = 0.0
            h_act = store_h[:, :hid]  # (A, H) view
            torch.mul(sig[:, 2 * hid :], torch.tanh(store_c), out=h_act)
            merged = img_merge.index_select(0, act_image).addmm_(h_act, self.merge_h.weight.T)
            logits = F.linear(merged.relu_(), out_w, out_b).float()  # (A, L+1)

            # Constraints: no repeated label, no END at step 0, only END after max_steps.
            blocked = F.pad(used[active], (0, 1))  # (A, L+1)
            if step == 0:
                blocked[:, end] = True
            if step == max_steps:
                blocked[:, :num_labels] = True
                blocked[:, end] = False
            logp_act = torch.log_softmax(logits.masked_fill(blocked, float("-inf")), dim=1)

            # (B*K, L+1); finished and skipped beams get the END-only row.
            logp = finished_logp.expand(rows, num_out).index_copy(0, active, logp_act)
            # q(j) += P(prefix) * p(j | prefix) for labels still allowed on the beam; rows of
            # inactive beams put no probability on labels, so they add nothing.
            marginal += beam_logp.view(rows, 1).exp() * logp[:, :num_labels].exp()
            cand = (beam_logp.view(rows, 1) + logp).view(batch, k * num_out)  # (B, K*(L+1))
            beam_logp, flat = cand.topk(k, dim=1)  # (B, K) each, best first
            src = (base + flat // num_out).view(-1)  # (B*K,) source row of each new beam
            tokens = (flat % num_out).view(-1)  # (B*K,)

            # Store row of each source beam; -1 (never read) for beams inactive this step.
            store_row = torch.full((rows,), -1, dtype=torch.long, device=device)
            store_row[active] = torch.arange(n_act, device=device)
            ptr = store_row[src]
            marginal = marginal[src]
            was_finished = finished[src]
            used = used[src]
            new_label = (~was_finished) & (tokens < num_labels)  # (B*K,)
            used[new_label, tokens[new_label]] = True
            finished = was_finished | (tokens == end)

        weight = torch.softmax(beam_logp, dim=1).unsqueeze(2)  # (B, K, 1) normalised beam mass
        used = used.view(batch, k, num_labels)  # (B, K, L)
        mass = (weight * used).sum(dim=1)  # (B, L)
        bound = marginal.view(batch, k, num_labels).max(dim=1).values  # (B, L)
        scores = ((1.0 - marginal_weight) * mass + marginal_weight * bound).clamp_(0.0, 1.0)

        best = beam_logp.argmax(dim=1)  # (B,)
        best_used = used[torch.arange(batch, device=device), best].cpu().numpy()  # (B, L)
        label_sets = [np.flatnonzero(row).tolist() for row in best_used]
        return label_sets, scores
