import pytest
import torch

from pipeline.data.text import PAD_ID, UNK_ID, Vocabulary, load_word_vectors, stem_token, tokenize

CAPTIONS = [
    "A dog runs on the grass.",
    "A man rides a horse, and a dog follows!",
    "Two dogs and a cat.",
    "A DOG sleeps.",
]


def test_tokenize_lowercases_and_splits_punctuation_without_nltk_data():
    assert tokenize("A Man's horse, running!") == ["a", "man", "'", "s", "horse", ",", "running", "!"]
    assert tokenize("") == []
    assert tokenize(None) == []
    assert tokenize(float("nan")) == []  # pandas' empty field


def test_stemming_merges_word_forms():
    assert tokenize("Two Dogs riding horses.", stem=True) == ["two", "dog", "ride", "hors", "."]
    assert stem_token("giraffes") == stem_token("giraffe")
    vocab = Vocabulary.build(CAPTIONS, min_freq=2, stem=True)
    assert "dog" in vocab.index and "dogs" not in vocab.index
    ids, _ = vocab.encode(["dogs"], max_len=3)
    assert ids[0, 0].item() == vocab.index["dog"]
    # The stemming switch travels beside the plain list and must match for equality.
    assert Vocabulary(vocab.to_list(), stem=True) == vocab
    assert Vocabulary(vocab.to_list(), stem=False) != vocab


def test_vocabulary_min_freq_specials_and_order():
    vocab = Vocabulary.build(CAPTIONS, min_freq=2)
    assert vocab.tokens[PAD_ID] == "<pad>" and vocab.tokens[UNK_ID] == "<unk>"
    # "a" x6, "." x3, "dog" x3 (ties alphabetical), "and" x2; the rest appear once.
    assert vocab.tokens[2:] == ["a", ".", "dog", "and"]
    assert vocab.lookup(["dog", "zebra"]) == [vocab.index["dog"], UNK_ID]
    assert len(Vocabulary.build(CAPTIONS, min_freq=1)) > len(vocab)
    with pytest.raises(ValueError, match="min-freq"):
        Vocabulary.build(CAPTIONS, min_freq=0)


def test_vocabulary_round_trips_through_a_plain_list():
    vocab = Vocabulary.build(CAPTIONS, min_freq=1)
    tokens = vocab.to_list()
    assert isinstance(tokens, list) and all(isinstance(t, str) for t in tokens)
    again = Vocabulary(list(tokens))
    assert again == vocab
    ids, lengths = vocab.encode(CAPTIONS, max_len=20)
    ids2, lengths2 = again.encode(CAPTIONS, max_len=20)
    assert torch.equal(ids, ids2) and torch.equal(lengths, lengths2)
    with pytest.raises(ValueError, match="must start with"):
        Vocabulary(["a", "b"])


def test_encode_pads_truncates_and_keeps_empty_captions():
    vocab = Vocabulary.build(CAPTIONS, min_freq=2)
    ids, lengths = vocab.encode(["a dog", "a dog and a dog and a dog", "", "zebra"], max_len=5)
    assert ids.dtype == torch.long and lengths.dtype == torch.long
    assert ids.shape == (4, 5)
    assert lengths.tolist() == [2, 5, 1, 1]
    assert ids[0].tolist() == [vocab.index["a"], vocab.index["dog"], PAD_ID, PAD_ID, PAD_ID]
    # An empty caption becomes one <unk>, so it still gets a prediction.
    assert ids[2].tolist() == [UNK_ID, PAD_ID, PAD_ID, PAD_ID, PAD_ID]
    assert ids[3, 0].item() == UNK_ID
    assert (ids[torch.arange(5)[None, :] >= lengths[:, None]] == PAD_ID).all()


def test_load_word_vectors_glove_format(tmp_path):
    vocab = Vocabulary.build(CAPTIONS, min_freq=2)
    path = tmp_path / "vectors.txt"
    path.write_text("dog 1 2 3\nDog 9 9 9\nzebra 4 5 6\na 0.5 0.5 0.5\n", encoding="utf-8")
    weights, found = load_word_vectors(path, vocab, 3, torch.Generator().manual_seed(0))
    assert weights.shape == (len(vocab), 3)
    assert found == 2  # dog and a; zebra is not in the vocabulary
    assert weights[vocab.index["dog"]].tolist() == [1.0, 2.0, 3.0]  # first casing wins
    assert weights[vocab.index["a"]].tolist() == [0.5, 0.5, 0.5]
    assert weights[PAD_ID].tolist() == [0.0, 0.0, 0.0]
    # Words the file lacks start from random vectors, the same ones for the same generator.
    missing = [vocab.index[token] for token in ("<unk>", ".", "and")]
    assert (weights[missing] != 0).all() and len({tuple(row) for row in weights[missing].tolist()}) == 3
    again, _ = load_word_vectors(path, vocab, 3, torch.Generator().manual_seed(0))
    assert torch.equal(again, weights)
    stemmed = Vocabulary.build(CAPTIONS, min_freq=2, stem=True)
    path.write_text("dogs 7 7 7\ndog 1 2 3\n", encoding="utf-8")
    weights, found = load_word_vectors(path, stemmed, 3)
    assert found == 1 and weights[stemmed.index["dog"]].tolist() == [7.0, 7.0, 7.0]  # first word of the stem
    with pytest.raises(ValueError, match="embed-dim 3"):
        load_word_vectors(path, vocab, 4)
    with pytest.raises(FileNotFoundError, match="word-vectors"):
        load_word_vectors(tmp_path / "missing.txt", vocab, 3)
