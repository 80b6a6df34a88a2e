"""The label decoder that reads the caption (``--decoder-caption``): its initial state from the
image and a caption vector. Shapes, gradients, checkpoint round trip, and that the caption
is what it reads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.models.decoder import LabelDecoder, LabelOrder
from tests.test_decoder import synthetic_problem


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def captioned_decoder(feature_dim: int = 10, num_labels: int = 5, caption_dim: int = 6) -> LabelDecoder:
    torch.manual_seed(0)
    return LabelDecoder(feature_dim, num_labels, embed_dim=8, hidden_dim=12, dropout=0.1, caption_dim=caption_dim)


def test_shapes_and_the_caption_is_required_exactly_when_read():
    model = captioned_decoder().eval()
    features, captions, inputs = torch.randn(3, 10), torch.randn(3, 6), torch.randint(0, 5, (3, 4))
    assert model(features, inputs, captions).shape == (3, 4, 6)
    sets, scores = model.beam_search(features, beam_width=2, captions=captions)
    assert len(sets) == 3 and scores.shape == (3, 5)
    assert model.beam_search(torch.randn(0, 10), captions=torch.randn(0, 6))[0] == []
    with pytest.raises(ValueError, match="reads caption vectors of size 6: pass them"):
        model(features, inputs)
    with pytest.raises(ValueError, match=r"caption vectors must be \(3, 6\), got \(3, 5\)"):
        model.beam_search(features, captions=torch.randn(3, 5))
    with pytest.raises(ValueError, match="reads no captions"):
        LabelDecoder(10, 5, embed_dim=8, hidden_dim=12).beam_search(features, captions=captions)


def test_gradients_reach_the_caption_parameters():
    model = captioned_decoder()
    multi_hot = torch.tensor([[1.0, 0, 1, 0, 0], [0, 1, 0, 0, 1], [0, 0, 0, 1, 0]])
    model.loss(torch.randn(3, 10), multi_hot, LabelOrder.from_train(multi_hot).rank, torch.randn(3, 6)).backward()
    for name in ("caption_norm.weight", "caption_init.weight", "caption_init.bias"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert all(p.grad is not None for p in model.parameters())


def test_without_captions_the_decoder_is_todays():
    """caption_dim 0 builds no new parameter, so a seed gives today's decoder, weights and outputs."""
    torch.manual_seed(0)
    plain = LabelDecoder(10, 5, embed_dim=8, hidden_dim=12)
    assert not any("caption" in name for name in plain.state_dict())
    torch.manual_seed(0)
    again = LabelDecoder(10, 5, embed_dim=8, hidden_dim=12, caption_dim=0)
    features = torch.randn(4, 10)
    for a, b in zip(plain.eval().beam_search(features), again.eval().beam_search(features)):
        assert a == b if isinstance(a, list) else torch.equal(a, b)


def test_a_checkpoint_round_trip_gives_identical_scores(tmp_path):
    model = captioned_decoder().eval()
    torch.save(model.state_dict(), tmp_path / "decoder.pt")
    loaded = LabelDecoder(10, 5, embed_dim=8, hidden_dim=12, dropout=0.1, caption_dim=6).eval()
    loaded.load_state_dict(torch.load(tmp_path / "decoder.pt", weights_only=True))
    features, captions = torch.randn(4, 10), torch.randn(4, 6)
    assert torch.equal(model.beam_search(features, captions=captions)[1],
                       loaded.beam_search(features, captions=captions)[1])


def test_the_decoder_learns_from_the_caption_and_blanking_it_changes_the_output():
    """Image features that carry half of the labels, captions the other half: trained on both,
    the decoder gets the caption's labels right, and with the captions blanked (one vector for
    all, as the encoder gives "") its predictions change and those labels are lost."""
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    image_codes = rng.standard_normal((6, 24)).astype(np.float32)
    caption_codes = rng.standard_normal((6, 16)).astype(np.float32)
    features, y_train = synthetic_problem(rng, image_codes, 300)
    y = y_train.numpy()
    image_half, caption_half = y.copy(), y.copy()
    image_half[:, 3:], caption_half[:, :3] = 0, 0
    features = torch.tensor(image_half @ image_codes + 0.1 * rng.standard_normal((300, 24)), dtype=torch.float32)
    captions = torch.tensor(caption_half @ caption_codes + 0.1 * rng.standard_normal((300, 16)), dtype=torch.float32)
    order = LabelOrder.from_train(y_train)
    model = LabelDecoder(24, 6, embed_dim=32, hidden_dim=64, dropout=0.1, caption_dim=16)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(120):
        optimizer.zero_grad()
        model.loss(features, y_train, order.rank, captions).backward()
        optimizer.step()
    _, scores = model.beam_search(features, beam_width=3, captions=captions)
    blank = torch.zeros(1, 16).expand(300, 16)
    _, blanked = model.beam_search(features, beam_width=3, captions=blank)
    truth = y_train.bool()
    caption_labels = truth[:, 3:]
    assert scores[:, 3:][caption_labels].mean() > 0.7  # read from the caption
    assert blanked[:, 3:][caption_labels].mean() < 0.5  # lost without it
    assert (scores - blanked).abs().max() > 0.3
