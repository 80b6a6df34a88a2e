"""The Python API (pipeline.Predictor): the records inference.py --image prints, the submission
inference.py writes, and the README's example as written."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

import inference
from pipeline.io import OptionError

ROOT = Path(__file__).resolve().parents[1]
VAL_FRACTION = ["--val-fraction", "0.25"]


@pytest.fixture(scope="module")
def tuned(trained_branches, tmp_path_factory):
    """(dataset, weights, batch output): the shared weights copied, fusion.json tuned and the
    submission written by one batch run of inference.py."""
    data, weights = trained_branches
    root = tmp_path_factory.mktemp("predictor")
    weights = Path(shutil.copytree(weights, root / "weights"))
    batch = root / "batch"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("torch.cuda.is_available", lambda: False)
        inference.main(["--data", str(data), "--weights", str(weights), "--output", str(batch), "--workers", "0",
                        *VAL_FRACTION])
    return data, weights, batch


def test_predict_gives_the_records_of_inference_image(tuned, tmp_path):
    data, weights, _ = tuned
    test = pd.read_csv(data / "test.csv", dtype=str)
    rows = test.iloc[[0, 2, 5]]
    files = [str(data / "data" / image_id) for image_id in rows["ImageID"]]
    captions = rows["Caption"].tolist()
    cli = inference.main(["--data", str(data), "--weights", str(weights), "--output", str(tmp_path), *VAL_FRACTION,
                          "--image", *files, "--caption", *captions, "--format", "json"])["predictions"]

    predictor = inference_predictor(data, weights)
    records = predictor.predict(files, captions=captions)
    assert records == cli
    # No dataset.json, and ids that are not the competition's 18: the names are the ids.
    assert {label["name"] for r in records for label in r["labels"]} <= {"1", "3", "18", "19"}
    # A PIL image gets its file's probabilities: 32 px images decode at full scale either way.
    in_memory = predictor.predict([Image.open(files[1])], captions=[captions[1]])[0]
    assert in_memory["image"] is None
    assert {k: v for k, v in in_memory.items() if k != "image"} == {k: v for k, v in cli[1].items() if k != "image"}


def test_without_captions_the_image_branches_predict_as_on_the_command_line(tuned, tmp_path):
    data, weights, _ = tuned
    file = str(data / "data" / pd.read_csv(data / "test.csv", dtype=str)["ImageID"].iloc[3])
    cli = inference.main(["--data", str(data), "--weights", str(weights), "--output", str(tmp_path), *VAL_FRACTION,
                          "--image", file])["predictions"]
    record = inference_predictor(data, weights).predict(file)
    assert record == cli and set(record[0]["branches"]) == {"image", "decoder"}


def test_predict_csv_gives_the_submission_of_inference(tuned, tmp_path):
    data, weights, batch = tuned
    expected = pd.read_csv(batch / "submission.csv", dtype=str, keep_default_na=False)
    predictor = inference_predictor(data, weights)
    written = tmp_path / "sub.csv"
    got = predictor.predict_csv(data / "test.csv", data / "data", submission=written)
    pd.testing.assert_frame_equal(got, expected)
    assert written.read_text() == (batch / "submission.csv").read_text()


def test_wrong_arguments_are_refused_naming_them(tuned):
    data, weights, _ = tuned
    predictor = inference_predictor(data, weights)
    with pytest.raises(OptionError, match="^captions: 1 caption"):
        predictor.predict([data / "data" / "0.jpg", data / "data" / "1.jpg"], captions=["a dog"])
    with pytest.raises(TypeError, match="image, output are inference.py options"):
        type(predictor).from_weights(weights, device="cpu", image=["a.jpg"], output="out")
    with pytest.raises(ValueError, match="^--threshold must be between 0 and 1"):
        type(predictor).from_weights(weights, device="cpu", threshold=2.0)


def inference_predictor(data: Path, weights: Path):
    from pipeline import Predictor

    return Predictor.from_weights(weights, device="cpu", data=str(data), val_fraction=0.25, workers=0)


def readme_python_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^## Python API\n(.*?)(?=^## )", text, re.S | re.M)
    assert section, "README.md has no '## Python API' section"
    block = re.search(r"```python\n(.*?)```", section.group(1), re.S)
    assert block, "README.md's Python API section has no ```python block"
    return block.group(1)


def test_the_readme_python_example_runs_as_written(tuned, capsys):
    data, weights, batch = tuned
    code = readme_python_example()
    assert '"weights"' in code and '"DIR' in code  # what is substituted below
    namespace: dict = {}
    exec(code.replace('"weights"', repr(str(weights))).replace('"DIR', '"' + str(data)), namespace)
    expected = pd.read_csv(batch / "submission.csv", dtype=str, keep_default_na=False)
    pd.testing.assert_frame_equal(namespace["submission"], expected)
    record = namespace["records"][0]
    assert record["image"] == f"{data}/data/1.jpg" and record["labels"]
    assert str(record["labels"][0]["name"]) in capsys.readouterr().out


def test_importing_the_package_stays_light_and_predictor_loads_on_use():
    code = ("import sys, pipeline.data.dataset\n"
            "assert 'pipeline.predictor' not in sys.modules and 'pipeline.inference' not in sys.modules\n"
            "from pipeline import Predictor\n"
            "assert Predictor.__module__ == 'pipeline.predictor'\n"
            "try:\n    import pipeline\n    pipeline.Nothing\nexcept AttributeError as err:\n    print(err)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "module 'pipeline' has no attribute 'Nothing'"
