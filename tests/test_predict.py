"""inference.py end to end on tiny data: fusion, submission, evaluation, subsets and failures."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import torch

import inference
import train_caption_rnn
import train_efficientnet
from pipeline.io import CheckpointError
from pipeline.data.dataset import DataFormatError
from pipeline.fusion import load_fusion
from tests.conftest import TINY_CAPTION_ARGS, TINY_IMAGE_ARGS, TRAINED_N_TEST, make_tiny_dataset

# The tiny test backbone has no pretrained weights; its warning is tested elsewhere.
pytestmark = pytest.mark.filterwarnings("ignore:backbone test_efficientnet:UserWarning")


def run(data, weights, output, *extra):
    return inference.main(["--data", str(data), "--weights", str(weights), "--output", str(output),
                           "--workers", "0", "--val-fraction", "0.25", *extra])


def copy_weights(weights, tmp_path):
    target = tmp_path / "weights"
    shutil.copytree(weights, target)
    return target


def test_submission_has_one_row_per_test_row_with_original_ids(trained_branches, tmp_path):
    data, weights = trained_branches
    weights = copy_weights(weights, tmp_path)
    summary = run(data, weights, tmp_path / "out", "--evaluate")
    submission = pd.read_csv(tmp_path / "out" / "submission.csv", dtype=str, keep_default_na=False)
    test = pd.read_csv(data / "test.csv")
    assert list(submission.columns) == ["ImageID", "Labels"]
    assert submission["ImageID"].tolist() == test["ImageID"].tolist()
    for labels in submission["Labels"]:
        assert labels and set(map(int, labels.split())) <= {1, 3, 18, 19}
    assert summary["branches"] == ["image", "decoder", "caption"]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert set(metrics["branches"]) == {"image", "decoder", "caption", "fused"}
    assert (tmp_path / "out" / "per_label_f1.png").stat().st_size > 1000
    assert (tmp_path / "out" / "f1_vs_threshold.png").stat().st_size > 1000
    fusion = load_fusion(weights / "fusion.json")
    assert sorted(fusion.branches) == ["caption", "decoder", "image"]


def test_branch_subset_retunes_instead_of_mixing(trained_branches, tmp_path):
    data, weights = trained_branches
    weights = copy_weights(weights, tmp_path)
    run(data, weights, tmp_path / "all")
    summary = run(data, weights, tmp_path / "caption", "--branches", "caption")
    assert summary["branches"] == ["caption"]
    # The subset's tune goes beside fusion.json, which keeps the full run's settings.
    assert load_fusion(weights / "fusion-caption.json").branches == ["caption"]
    assert sorted(load_fusion(weights / "fusion.json").branches) == ["caption", "decoder", "image"]


def test_hand_overrides_apply(trained_branches, tmp_path):
    data, weights = trained_branches
    weights = copy_weights(weights, tmp_path)
    run(data, weights, tmp_path / "a", "--fusion-weights", "image=1,caption=0,decoder=0", "--threshold", "0.99")
    submission = pd.read_csv(tmp_path / "a" / "submission.csv", dtype=str)
    # With a threshold no probability reaches, every image keeps exactly its top label.
    assert all(len(labels.split()) == 1 for labels in submission["Labels"])
    with pytest.raises(ValueError, match="--fusion-weights"):
        run(data, weights, tmp_path / "b", "--fusion-weights", "imag=1")


def test_unreadable_test_images_still_get_a_row(trained_branches, tmp_path):
    data, weights = trained_branches
    weights = copy_weights(weights, tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(data, broken)
    test = pd.read_csv(broken / "test.csv")
    (broken / "data" / test["ImageID"][0]).unlink()
    (broken / "data" / test["ImageID"][1]).write_bytes(b"\xff\xd8 truncated")
    summary = run(broken, weights, tmp_path / "out")
    submission = pd.read_csv(tmp_path / "out" / "submission.csv", dtype=str)
    assert len(submission) == len(test) and submission["Labels"].notna().all()
    assert summary["unreadable_images"] == 2
    listed = (tmp_path / "out" / "unreadable_images.txt").read_text().split()
    assert listed == test["ImageID"][:2].tolist()


def test_missing_weights_and_unknown_branch_are_clear_errors(trained_branches, tmp_path):
    data, _ = trained_branches
    with pytest.raises(CheckpointError, match="no branch checkpoints"):
        inference.main(["--data", str(data), "--weights", str(tmp_path / "empty")])
    with pytest.raises(ValueError, match="valid branch names are image, decoder, caption"):
        inference.main(["--data", str(data), "--weights", str(tmp_path), "--branches", "audio"])


def test_evaluation_csv_with_an_unknown_label_names_it(trained_branches, tmp_path):
    data, weights = trained_branches
    weights = copy_weights(weights, tmp_path)
    frame = pd.read_csv(data / "train.csv").head(5)
    frame.loc[0, "Labels"] = "1 7"
    frame.to_csv(tmp_path / "eval.csv", index=False)
    with pytest.raises(ValueError, match="label id 7"):
        run(data, weights, tmp_path / "out", "--evaluate", "--eval-csv", str(tmp_path / "eval.csv"))


def test_caption_rows_train_on_every_caption_and_predict_one_row_per_image(tmp_path):
    """A dataset with two caption rows per image, declared in dataset.json."""
    data = make_tiny_dataset(tmp_path / "rows", captions_per_image=2)
    weights = tmp_path / "weights"
    train_efficientnet.main(["--data", str(data), "--weights", str(weights), *TINY_IMAGE_ARGS])
    train_caption_rnn.main(["--data", str(data), "--weights", str(weights),
                            "--ensemble", "1", *TINY_CAPTION_ARGS])
    caption_ids = pd.read_csv(weights / "val_probs_caption.csv", dtype=str)["ImageID"].tolist()
    image_ids = pd.read_csv(weights / "val_probs_image.csv", dtype=str)["ImageID"].tolist()
    assert caption_ids == image_ids and len(set(caption_ids)) == len(caption_ids) > 0
    # "here" is only in the second rows: the caption branch learnt from every row.
    assert "here" in torch.load(weights / "caption.pt", weights_only=True)["vocab"]

    summary = run(data, weights, tmp_path / "out", "--evaluate")
    submission = pd.read_csv(tmp_path / "out" / "submission.csv", dtype=str)
    test_ids = pd.read_csv(data / "test.csv", dtype=str)["ImageID"]
    assert submission["ImageID"].tolist() == test_ids.drop_duplicates().tolist()
    assert summary["rows"] == len(submission) == len(test_ids) // 2
    assert set(summary["metrics"]) == {"image", "decoder", "caption", "fused"}


def test_a_dataset_without_captions_uses_the_image_branches_alone(trained_branches, tmp_path):
    data, weights = trained_branches
    weights = copy_weights(weights, tmp_path)
    images_only = tmp_path / "images_only"
    shutil.copytree(data, images_only)
    for name in ("train.csv", "test.csv"):
        pd.read_csv(data / name).drop(columns="Caption").to_csv(images_only / name, index=False)
    # caption.pt is in --weights, but there are no captions to give it.
    summary = run(images_only, weights, tmp_path / "out", "--evaluate")
    assert summary["branches"] == ["image", "decoder"]
    assert set(summary["metrics"]) == {"image", "decoder", "fused"}
    submission = pd.read_csv(tmp_path / "out" / "submission.csv", dtype=str)
    assert submission["ImageID"].tolist() == pd.read_csv(data / "test.csv")["ImageID"].tolist()
    assert submission["Labels"].notna().all()
    with pytest.raises(ValueError, match=r"caption branch cannot run: no Caption column in .*train\.csv, .*test\.csv"):
        run(images_only, weights, tmp_path / "out", "--branches", "image,caption")
    with pytest.raises(DataFormatError, match=r"train\.csv:1: no Caption column.*train_efficientnet\.py"):
        train_caption_rnn.main(["--data", str(images_only), "--weights", str(tmp_path / "w2"), *TINY_CAPTION_ARGS])


def test_a_dataset_without_images_uses_the_caption_branch_alone(trained_branches, tmp_path):
    _, weights = trained_branches
    weights = copy_weights(weights, tmp_path)
    captions_only = make_tiny_dataset(tmp_path / "captions_only", n_test=TRAINED_N_TEST, images=False)
    summary = run(captions_only, weights, tmp_path / "out", "--branches", "caption", "--evaluate")
    assert summary["branches"] == ["caption"] and summary["unreadable_images"] == 0
    submission = pd.read_csv(tmp_path / "out" / "submission.csv", dtype=str)
    assert submission["ImageID"].tolist() == pd.read_csv(captions_only / "test.csv")["ImageID"].tolist()
    assert run(captions_only, weights, tmp_path / "auto")["branches"] == ["caption"]
    with pytest.raises(ValueError, match=r"image branch cannot run: the image folder .*captions_only/data does not exist"):
        run(captions_only, weights, tmp_path / "out", "--branches", "image")


def test_the_caption_branch_runs_beside_image_extraction_and_gives_what_it_gives_alone(trained_branches,
                                                                                       tmp_path, monkeypatch):
    import threading

    import pipeline.features as features_module
    import pipeline.prediction as prediction_module
    from pipeline.branches.caption import predict_caption_probs
    from pipeline.data.dataset import DatasetPaths, group_by_image, read_csv
    from pipeline.engine.runtime import cpu_threads
    from pipeline.prediction import BranchPredictor, Inputs, load_branch_checkpoints
    from pipeline.text_features import TextEncoder

    data, weights = trained_branches
    paths = DatasetPaths.resolve(str(data), None)
    frame = read_csv(paths.test_csv)
    checkpoints = load_branch_checkpoints(weights, None)
    predictor = BranchPredictor(checkpoints, paths, torch.device("cpu"), 8, model_cache=tmp_path / "cache")

    # The extraction waits until the caption branch has started in its own thread: they overlap.
    caption_started, events = threading.Event(), []

    def caption_branch(*args, **kwargs):
        events.append(("caption starts", threading.current_thread().name, torch.get_num_threads()))
        caption_started.set()
        result = predict_caption_probs(*args, **kwargs)
        events.append(("caption ends", threading.current_thread().name, None))
        return result

    extract = features_module.extract_into_store

    def extraction(*args, **kwargs):
        assert caption_started.wait(timeout=30)
        events.append(("extraction", threading.current_thread().name, None))
        return extract(*args, **kwargs)

    encode = TextEncoder.token_states

    def encoding(self, *args, **kwargs):
        events.append(("encoding", threading.current_thread().name, torch.get_num_threads()))
        return encode(self, *args, **kwargs)

    monkeypatch.setattr(prediction_module, "predict_caption_probs", caption_branch)
    monkeypatch.setattr(features_module, "extract_into_store", extraction)
    monkeypatch.setattr(TextEncoder, "token_states", encoding)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        probs = predictor.probabilities(frame, Inputs(paths, tmp_path / "cache")).by_branch
    finally:
        torch.set_num_threads(threads)
    names = {event: thread for event, thread, _ in events}
    assert names["extraction"] == threading.main_thread().name
    assert names["caption starts"] != threading.main_thread().name
    # One thread beside the extraction processes, not the caller's 2 (nor a new thread's default),
    # the text encoder's too.
    assert events[0][2] == 1
    encodings = [threads for event, thread, threads in events if event == "encoding" and thread == names["caption starts"]]
    assert encodings and set(encodings) == {1}
    # With the features cached nothing is extracted: the caption branch gets the caller's threads.
    events.clear()
    torch.set_num_threads(2)
    try:
        predictor.probabilities(frame, Inputs(paths, tmp_path / "cache"))
    finally:
        torch.set_num_threads(threads)
    assert [count for event, _, count in events if event == "caption starts"] == [2]
    with cpu_threads(1):
        alone = group_by_image(frame).mean(predict_caption_probs(checkpoints["caption"],
                                                                 frame["Caption"].fillna("").tolist(), "cpu"))
    assert probs["caption"].shape == (len(group_by_image(frame).images), len(checkpoints["caption"]["label_ids"]))
    assert (probs["caption"] == alone).all()
