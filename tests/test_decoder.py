import itertools

import numpy as np
import pytest
import torch

from pipeline.models.decoder import (
    LabelDecoder,
    LabelOrder,
    label_rank,
    make_sequences,
    token_ids,
)

# 4 labels, training counts [1, 3, 0, 2]:
#   frequent first: 1 (3), 3 (2), 0 (1), 2 (0) -> rank = [2, 0, 3, 1]
#   rare first:     2 (0), 0 (1), 3 (2), 1 (3) -> rank = [1, 3, 0, 2]
TRAIN = np.array([[1, 1, 0, 1], [0, 1, 0, 1], [0, 1, 0, 0]])
END, START, PAD = 4, 5, 6
BATCH = np.array([[1, 1, 0, 1], [0, 0, 1, 0], [0, 0, 0, 0]])


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """These tensors are tiny: a second thread only adds synchronisation, which gets very
    slow when other processes keep the cores busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_decoder(feature_dim: int = 10, num_labels: int = 5, **kwargs) -> LabelDecoder:
    torch.manual_seed(0)
    kwargs = {"embed_dim": 8, "hidden_dim": 12, "dropout": 0.1, **kwargs}
    return LabelDecoder(feature_dim, num_labels, **kwargs)


def test_token_ids():
    assert token_ids(4) == (END, START, PAD)


def test_label_rank_orders_and_ties():
    assert label_rank(TRAIN).tolist() == [2, 0, 3, 1]
    assert label_rank(TRAIN, "rare").tolist() == [1, 3, 0, 2]
    # Equal counts keep label-index order in both directions.
    assert label_rank(np.ones((2, 3))).tolist() == [0, 1, 2]
    assert label_rank(np.ones((2, 3)), "rare").tolist() == [0, 1, 2]
    with pytest.raises(ValueError):
        label_rank(TRAIN, "random")


def test_make_sequences_frequent_first():
    inputs, targets, mask = make_sequences(BATCH, label_rank(TRAIN))
    # Row 0 holds {0, 1, 3}: frequent order 1, 3, 0.
    assert inputs.tolist() == [[START, 1, 3, 0], [START, 2, PAD, PAD], [START, PAD, PAD, PAD]]
    assert targets.tolist() == [[1, 3, 0, END], [2, END, PAD, PAD], [END, PAD, PAD, PAD]]
    assert mask.tolist() == [[True] * 4, [True, True, False, False], [True, False, False, False]]
    assert inputs.dtype == targets.dtype == torch.long and mask.dtype == torch.bool


def test_make_sequences_rare_first():
    # The order as training builds it: LabelOrder.from_train, its rank given to the loss.
    order = LabelOrder.from_train(TRAIN, "rare")
    inputs, targets, mask = make_sequences(torch.tensor(BATCH[:2]), order.rank)
    # Row 0 holds {0, 1, 3}: rare order 0, 3, 1.
    assert inputs.tolist() == [[START, 0, 3, 1], [START, 2, PAD, PAD]]
    assert targets.tolist() == [[0, 3, 1, END], [2, END, PAD, PAD]]
    assert mask.tolist() == [[True] * 4, [True, True, False, False]]


def test_make_sequences_fixed_length_only_adds_padding():
    # length L + 1 (what the training loss uses, read without a host sync): the trimmed
    # sequences of test_make_sequences_frequent_first plus one PAD step, masked out.
    inputs, targets, mask = make_sequences(BATCH, label_rank(TRAIN), length=5)
    assert inputs.tolist() == [[START, 1, 3, 0, PAD], [START, 2, PAD, PAD, PAD], [START, PAD, PAD, PAD, PAD]]
    assert targets.tolist() == [[1, 3, 0, END, PAD], [2, END, PAD, PAD, PAD], [END, PAD, PAD, PAD, PAD]]
    assert mask.tolist() == [[True] * 4 + [False], [True, True, False, False, False], [True] + [False] * 4]


def test_label_order_records_the_rank_as_a_plain_list():
    # What image checkpoints store as "label_order": rank[j] = position of label j.
    assert LabelOrder.from_train(TRAIN).to_list() == [2, 0, 3, 1]
    assert LabelOrder.from_train(TRAIN, "rare").to_list() == [1, 3, 0, 2]


@pytest.mark.parametrize("tie", [True, False])
def test_forward_shape_loss_and_gradients(tie):
    model = small_decoder(tie_embeddings=tie).eval()  # no dropout: the reference sees the same logits
    features = torch.randn(4, 10)
    multi_hot = torch.tensor([[1, 0, 1, 0, 0], [0, 1, 0, 0, 1], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0]])
    rank = label_rank(multi_hot)
    inputs, targets, mask = make_sequences(multi_hot, rank)
    logits = model(features, inputs)
    assert logits.shape == (4, 4, 6)  # (B, max labels + 1, L + 1)

    # Reference: the log-probability of every target step that is not padding, summed over the
    # steps of each image, averaged over the 4 images.
    log_probs = torch.log_softmax(logits, dim=2).gather(2, targets.clamp(max=5).unsqueeze(2)).squeeze(2)
    expected = -(log_probs * mask).sum() / 4
    loss = model.loss(features, multi_hot, rank)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_beam_search_constraints_and_determinism():
    model = small_decoder().train()
    features = torch.randn(7, 10)
    sets, scores = model.beam_search(features, beam_width=3)
    assert model.training  # the mode is restored
    assert len(sets) == 7
    for labels in sets:
        assert 1 <= len(labels) <= 5
        assert len(set(labels)) == len(labels)
        assert labels == sorted(labels)
    assert scores.shape == (7, 5) and scores.dtype == torch.float32
    assert bool(((scores >= 0) & (scores <= 1)).all())
    sets_again, scores_again = model.beam_search(features, beam_width=3)
    assert sets_again == sets and torch.equal(scores_again, scores)

    short, _ = model.beam_search(features, beam_width=2, max_steps=2)
    assert all(1 <= len(labels) <= 2 for labels in short)
    # More beams than possible first tokens, and an empty batch.
    wide, wide_scores = small_decoder(num_labels=2).beam_search(torch.randn(3, 10), beam_width=6)
    assert all(1 <= len(labels) <= 2 for labels in wide) and wide_scores.isfinite().all()
    assert model.beam_search(torch.randn(0, 10))[0] == []


def greedy_reference(model: LabelDecoder, features: torch.Tensor) -> list[list[int]]:
    """Greedy decoding by re-running the teacher-forced forward on each growing prefix."""
    model.eval()
    num_labels, tok = model.num_labels, model.tokens
    results = []
    for feature in features:
        prefix, labels = [tok.start], []
        for step in range(num_labels + 1):
            with torch.no_grad():
                logits = model(feature[None], torch.tensor([prefix]))[0, -1].clone()
            logits[labels] = float("-inf")
            if step == 0:
                logits[tok.end] = float("-inf")
            token = int(logits.argmax())
            if token == tok.end:
                break
            labels.append(token)
            prefix.append(token)
        results.append(sorted(labels))
    return results


def test_beam_width_one_is_greedy():
    model = small_decoder()
    features = torch.randn(12, 10) * 3
    sets, scores = model.beam_search(features, beam_width=1)
    assert sets == greedy_reference(model, features)
    indicator = torch.zeros(12, 5)
    for row, labels in enumerate(sets):
        indicator[row, labels] = 1.0
    _, mass = model.beam_search(features, beam_width=1, marginal_weight=0.0)
    assert torch.equal(mass, indicator)
    # With the default blend, a 0.5 threshold gives back the greedy set.
    assert torch.equal((scores >= 0.5).float(), indicator)


def sequence_distribution(
    model: LabelDecoder, feature: torch.Tensor
) -> dict[tuple[int, ...], float]:
    """Exact probability of every valid label sequence under the masked decoding rules."""
    num_labels, tok = model.num_labels, model.tokens
    probs = {}
    for length in range(1, num_labels + 1):
        for seq in itertools.permutations(range(num_labels), length):
            inputs = torch.tensor([[tok.start, *seq]])
            with torch.no_grad():
                logits = model(feature[None], inputs)[0]  # (len + 1, L + 1)
            logp = 0.0
            for step, target in enumerate([*seq, tok.end]):
                row = logits[step].clone()
                row[list(seq[:step])] = float("-inf")
                if step == 0:
                    row[tok.end] = float("-inf")
                logp += float(torch.log_softmax(row, 0)[target])
            probs[seq] = float(np.exp(logp))
    return probs


def test_scores_match_exact_marginals_when_beams_cover_everything():
    model = small_decoder(num_labels=3).eval()
    features = torch.randn(3, 10) * 3
    # 3 labels allow 3 + 6 + 6 = 15 sequences: 15 beams keep all of them.
    sets, mass = model.beam_search(features, beam_width=15, marginal_weight=0.0)
    _, bound = model.beam_search(features, beam_width=15, marginal_weight=1.0)
    _, small_bound = model.beam_search(features, beam_width=2, marginal_weight=1.0)
    for row in range(3):
        probs = sequence_distribution(model, features[row])
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
        exact = [sum(p for seq, p in probs.items() if j in seq) for j in range(3)]
        np.testing.assert_allclose(mass[row].numpy(), exact, atol=1e-5)
        # The marginal is a lower bound on P(label in set), whatever the beam width.
        assert bool((bound[row] <= torch.tensor(exact) + 1e-5).all())
        assert bool((small_bound[row] <= torch.tensor(exact) + 1e-5).all())
        assert sets[row] == sorted(max(probs, key=probs.get))


def synthetic_problem(rng: np.random.Generator, codes: np.ndarray, n: int):
    num_labels = codes.shape[0]
    multi_hot = np.zeros((n, num_labels), dtype=np.float32)
    for row in range(n):
        size = rng.integers(1, 4)
        multi_hot[row, rng.choice(num_labels, size=size, replace=False)] = 1.0
    features = multi_hot @ codes + 0.1 * rng.standard_normal((n, codes.shape[1]))
    return torch.tensor(features, dtype=torch.float32), torch.tensor(multi_hot)


def test_decoder_learns_synthetic_label_sets():
    # 6 labels, sets of 1-3 labels: 41 possible sets, so chance exact match is ~2.5%.
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    codes = rng.standard_normal((6, 32)).astype(np.float32)
    x_train, y_train = synthetic_problem(rng, codes, 200)
    x_test, y_test = synthetic_problem(rng, codes, 200)
    order = LabelOrder.from_train(y_train)
    model = LabelDecoder(32, 6, embed_dim=32, hidden_dim=64, dropout=0.1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        optimizer.zero_grad()
        model.loss(x_train, y_train, order.rank).backward()
        optimizer.step()

    sets, scores = model.beam_search(x_test, beam_width=3)
    truth = [np.flatnonzero(row).tolist() for row in y_test.numpy()]
    exact_match = np.mean([pred == true for pred, true in zip(sets, truth)])
    assert exact_match > 0.8
    # The scores rank the true labels above the others.
    true_scores = scores[y_test.bool()]
    other_scores = scores[~y_test.bool()]
    assert true_scores.mean() > 0.7 > 0.2 > other_scores.mean()
