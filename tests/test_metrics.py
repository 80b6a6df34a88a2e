import json

import numpy as np
import pytest
from sklearn.metrics import f1_score, jaccard_score

from pipeline.metrics import (
    THRESHOLD_GRID,
    binarize,
    evaluate_probs,
    jaccard,
    macro_f1,
    mean_average_precision,
    micro_f1,
    per_image_f1,
    per_label_average_precision,
    per_label_prf,
    samples_f1,
    tune_global_threshold,
)

# Hand-worked example, 3 images x 4 labels.
#   image 0: T={0,1}   P={0}    tp=1  F1 = 2*1/(2+1) = 2/3   Jaccard = 1/2
#   image 1: T={2}     P={1}    tp=0  F1 = 0                 Jaccard = 0
#   image 2: T={0,2,3} P={0,2}  tp=2  F1 = 2*2/(3+2) = 4/5   Jaccard = 2/3
Y_TRUE = np.array([[1, 1, 0, 0], [0, 0, 1, 0], [1, 0, 1, 1]])
Y_PRED = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [1, 0, 1, 0]])


def test_per_image_and_samples_f1_hand_example():
    np.testing.assert_allclose(per_image_f1(Y_TRUE, Y_PRED), [2 / 3, 0.0, 4 / 5])
    # (2/3 + 0 + 4/5) / 3 = (10/15 + 12/15) / 3 = 22/45
    assert samples_f1(Y_TRUE, Y_PRED) == pytest.approx(22 / 45)


def test_micro_f1_hand_example():
    # Pooled over all cells: tp = 1+0+2 = 3, |P| = 4, |T| = 6 -> 2*3 / (4+6) = 3/5
    assert micro_f1(Y_TRUE, Y_PRED) == pytest.approx(3 / 5)


def test_per_label_prf_and_macro_f1_hand_example():
    # label 0: true [1,0,1] pred [1,0,1] tp=2 fp=0 fn=0 -> P=1 R=1   F=1
    # label 1: true [1,0,0] pred [0,1,0] tp=0 fp=1 fn=1 -> P=0 R=0   F=0
    # label 2: true [0,1,1] pred [0,0,1] tp=1 fp=0 fn=1 -> P=1 R=1/2 F=2/3
    # label 3: true [0,0,1] pred [0,0,0] tp=0 fp=0 fn=1 -> P=0/0->0 R=0 F=0
    prf = per_label_prf(Y_TRUE, Y_PRED)
    np.testing.assert_allclose(prf["precision"], [1, 0, 1, 0])
    np.testing.assert_allclose(prf["recall"], [1, 0, 1 / 2, 0])
    np.testing.assert_allclose(prf["f1"], [1, 0, 2 / 3, 0])
    np.testing.assert_array_equal(prf["support"], [2, 1, 2, 1])
    # macro = (1 + 0 + 2/3 + 0) / 4 = 5/12
    assert macro_f1(Y_TRUE, Y_PRED) == pytest.approx(5 / 12)


def test_jaccard_hand_example():
    # (1/2 + 0 + 2/3) / 3 = 7/18
    assert jaccard(Y_TRUE, Y_PRED) == pytest.approx(7 / 18)


def test_empty_prediction_row_scores_zero():
    y_true = np.array([[1, 0, 1], [0, 1, 0]])
    y_pred = np.array([[0, 0, 0], [0, 1, 0]])
    np.testing.assert_allclose(per_image_f1(y_true, y_pred), [0.0, 1.0])
    assert samples_f1(y_true, y_pred) == pytest.approx(0.5)


def test_empty_truth_rows_score_zero():
    # Empty truth scores 0 whether or not something is predicted (0/0 -> 0, as sklearn
    # with zero_division=0).
    y_true = np.array([[0, 0, 0], [0, 0, 0], [1, 0, 0]])
    y_pred = np.array([[0, 0, 0], [0, 1, 0], [1, 0, 0]])
    np.testing.assert_allclose(per_image_f1(y_true, y_pred), [0.0, 0.0, 1.0])
    assert samples_f1(y_true, y_pred) == pytest.approx(
        f1_score(y_true, y_pred, average="samples", zero_division=0)
    )


def test_perfect_prediction_scores_one():
    y = np.array([[1, 0, 1, 0], [0, 1, 0, 0], [1, 1, 1, 1]])
    assert samples_f1(y, y) == 1.0
    assert micro_f1(y, y) == 1.0
    assert macro_f1(y, y) == 1.0
    assert jaccard(y, y) == 1.0
    assert mean_average_precision(y, y.astype(float)) == 1.0


def test_bool_inputs_accepted():
    assert samples_f1(Y_TRUE.astype(bool), Y_PRED.astype(bool)) == pytest.approx(22 / 45)


def test_fast_samples_f1_agrees_with_sklearn_on_random_data():
    rng = np.random.default_rng(0)
    # Sparse enough that some rows are empty in truth and/or prediction.
    y_true = (rng.random((500, 18)) < 0.1).astype(int)
    y_pred = (rng.random((500, 18)) < 0.1).astype(int)
    assert (~y_true.any(axis=1)).any() and (~y_pred.any(axis=1)).any()
    expected = f1_score(y_true, y_pred, average="samples", zero_division=0)
    assert samples_f1(y_true, y_pred) == pytest.approx(expected, abs=1e-12)
    # Jaccard goes through sklearn; check it with the same 0/0 -> 0 convention.
    expected_j = jaccard_score(y_true, y_pred, average="samples", zero_division=0)
    assert jaccard(y_true, y_pred) == pytest.approx(expected_j)


def test_binarize_scalar_threshold_keeps_top_label():
    probs = np.array([[0.2, 0.6, 0.1], [0.3, 0.1, 0.4], [0.9, 0.8, 0.05]])
    # row 1 has nothing >= 0.5, so it keeps its argmax (label 2, p=0.4)
    expected = [[0, 1, 0], [0, 0, 1], [1, 1, 0]]
    np.testing.assert_array_equal(binarize(probs, 0.5), expected)


def test_binarize_per_label_thresholds():
    probs = np.array([[0.2, 0.6, 0.1], [0.3, 0.1, 0.04], [0.9, 0.8, 0.05], [0.5, 0.4, 0.01]])
    thresholds = np.array([0.95, 0.5, 0.05])
    # row 0: 0.6 >= 0.5, 0.1 >= 0.05                   -> {1, 2}
    # row 1: nothing passes                            -> argmax {0}
    # row 2: 0.9 < 0.95 rejected, 0.8 and 0.05 (equal) -> {1, 2}; argmax 0 not forced in
    # row 3: nothing passes                            -> argmax {0}
    expected = [[0, 1, 1], [1, 0, 0], [0, 1, 1], [1, 0, 0]]
    out = binarize(probs, thresholds)
    np.testing.assert_array_equal(out, expected)
    assert out.any(axis=1).all()


def test_binarize_never_returns_empty_rows():
    probs = np.random.default_rng(1).random((200, 18)) * 0.1
    assert binarize(probs, 0.99).sum(axis=1).tolist() == [1] * 200


def test_average_precision_hand_example_skips_labels_without_positives():
    y_true = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0]])
    scores = np.array([[0.9, 0.1, 0.5], [0.8, 0.7, 0.5], [0.3, 0.6, 0.5]])
    # label 0: ranking 0.9(+) 0.8(-) 0.3(+): AP = (1/1 + 2/3) / 2 = 5/6
    # label 1: ranking 0.7(+) 0.6(+) 0.1(-): AP = 1
    # label 2: no positives -> NaN, skipped
    ap = per_label_average_precision(y_true, scores)
    np.testing.assert_allclose(ap[:2], [5 / 6, 1.0])
    assert np.isnan(ap[2])
    # (5/6 + 1) / 2 = 11/12; counting label 2 as 0 would give 11/18
    assert mean_average_precision(y_true, scores) == pytest.approx(11 / 12)


def test_mean_average_precision_without_any_positive_is_nan():
    y_true = np.zeros((3, 2), dtype=int)
    assert np.isnan(mean_average_precision(y_true, np.full((3, 2), 0.5)))


def test_evaluate_probs_is_json_serialisable_and_consistent():
    probs = np.array([[0.9, 0.6, 0.1, 0.2], [0.1, 0.7, 0.3, 0.2], [0.8, 0.1, 0.6, 0.4]])
    # A scalar 0.5 would also predict label 1 for image 0 (p=0.6); raising label 1's
    # threshold to 0.65 makes the prediction exactly Y_PRED, so the hand-worked values apply.
    thresholds = np.array([0.5, 0.65, 0.5, 0.5])
    np.testing.assert_array_equal(binarize(probs, thresholds), Y_PRED)
    res = evaluate_probs(Y_TRUE, probs, thresholds, label_ids=[1, 2, 3, 5])
    json.dumps(res, allow_nan=False)
    assert res["n_images"] == 3
    assert res["samples_f1"] == pytest.approx(22 / 45)
    assert res["micro_f1"] == pytest.approx(3 / 5)
    assert res["macro_f1"] == pytest.approx(5 / 12)
    assert res["jaccard"] == pytest.approx(7 / 18)
    assert res["mAP"] == pytest.approx(mean_average_precision(Y_TRUE, probs))
    assert res["thresholds"] == [0.5, 0.65, 0.5, 0.5]
    assert list(res["per_label"]) == ["1", "2", "3", "5"]
    assert res["per_label"]["3"] == {
        "precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2,
        "ap": pytest.approx(per_label_average_precision(Y_TRUE, probs)[2]),
    }


def test_evaluate_probs_default_keys_and_missing_positives():
    y_true = np.array([[1, 0], [1, 0]])
    res = evaluate_probs(y_true, np.array([[0.9, 0.2], [0.6, 0.3]]), 0.5)
    json.dumps(res, allow_nan=False)
    assert list(res["per_label"]) == ["0", "1"]
    assert res["per_label"]["1"]["ap"] is None
    assert res["mAP"] == 1.0
    assert res["thresholds"] == [0.5, 0.5]


@pytest.mark.parametrize(
    "fn", [samples_f1, per_image_f1, micro_f1, macro_f1, per_label_prf, jaccard]
)
def test_shape_mismatch_raises(fn):
    msg = r"shape mismatch: y_true has shape \(3, 4\) but y_pred has shape \(3, 5\)"
    with pytest.raises(ValueError, match=msg):
        fn(np.zeros((3, 4), dtype=int), np.zeros((3, 5), dtype=int))


def test_other_shape_errors():
    with pytest.raises(ValueError, match="shape mismatch"):
        mean_average_precision(np.zeros((3, 4), dtype=int), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="shape mismatch"):
        evaluate_probs(np.zeros((3, 4), dtype=int), np.zeros((3, 3)), 0.5)
    with pytest.raises(ValueError, match="2-D"):
        samples_f1(np.zeros(4, dtype=int), np.zeros(4, dtype=int))
    with pytest.raises(ValueError, match="thresholds must be a scalar or shape \\(4,\\)"):
        binarize(np.zeros((3, 4)), np.array([0.5, 0.5]))
    with pytest.raises(ValueError, match="label_ids has 3 entries"):
        evaluate_probs(np.zeros((3, 4), dtype=int), np.zeros((3, 4)), 0.5, label_ids=[1, 2, 3])


def test_non_binary_labels_raise():
    with pytest.raises(ValueError, match="y_pred must contain only 0/1"):
        samples_f1(Y_TRUE, Y_PRED * 2)


# Two images, two labels; image 0 holds both labels, image 1 label 0 only. Label 0 scores 0.9 on
# both, so it is always predicted; what the threshold t decides is label 1:
#   image 0 (label 1 at p):    predicted when t <= p: F1 1, else 2/3
#   image 1 (label 1 at 0.62): predicted when t <= 0.62: F1 2/3, else 1
# so samples-F1 is (1 + 2/3) / 2 for t <= p and for t > 0.62, and 2/3 in between: two tied plateaus.
TIE_TRUTH = np.array([[1, 1], [1, 0]])
PLATEAU = (1 + 2 / 3) / 2  # 5/6 as the mean over the two images rounds it


@pytest.mark.parametrize("p, expected", [
    (0.41, 0.41),  # plateaus 0.02..0.41 and 0.63..0.95: 0.41 is 0.09 from 0.5, 0.63 is 0.13
    (0.35, 0.63),  # plateaus 0.02..0.35 and 0.63..0.95: 0.63 is the closer, though above 0.5
])
def test_tied_thresholds_go_to_the_one_closest_to_half(p, expected):
    probs = np.array([[0.9, p], [0.9, 0.62]])
    assert tune_global_threshold(TIE_TRUTH, probs) == (expected, PLATEAU)
    # The ties are real: every threshold of both plateaus, and no other, reaches the optimum.
    tied = [t for t in THRESHOLD_GRID if samples_f1(TIE_TRUTH, binarize(probs, t)) == PLATEAU]
    assert tied == [t for t in THRESHOLD_GRID if t <= p or t >= 0.63]


def test_a_plateau_holding_half_gives_half():
    # Perfect for every t in (0.2, 0.8]: 0.5 lies inside the optimum, away from both its ends.
    assert tune_global_threshold(np.array([[1, 0], [0, 1]]), np.array([[0.9, 0.2], [0.1, 0.8]])) == (0.5, 1.0)
