"""output/report.html: written by ``inference.py --evaluate``, self-contained, its thumbnails capped,
and, in headless Chromium, rendered with every image loaded and a tuner that scores fusion settings
exactly as pipeline.fusion and pipeline.metrics do."""

from __future__ import annotations

import ast
import base64
import html
import json
import re
import shlex
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import inference
import pipeline.report_page
from pipeline.data.dataset import DatasetPaths
from pipeline.fusion import FusionSettings, load_fusion
from pipeline.metrics import evaluate_probs, samples_f1
from pipeline.report_page import PageLimits, asset_text, script_json, tuner_arrays, write_report_page
from tests.conftest import WORDS

pytestmark = pytest.mark.filterwarnings("ignore:backbone test_efficientnet:UserWarning")

CHROMIUM, CHROMEDRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver")
NO_BROWSER = ("headless Chromium is not installed (apt-get install chromium chromium-driver): "
              "the page is not rendered in a browser")


def run(data, weights, output, *extra):
    return inference.main(["--data", str(data), "--weights", str(weights), "--output", str(output),
                           "--workers", "0", "--val-fraction", "0.25", *extra])


def embedded(page: str, element: str) -> dict:
    match = re.search(rf'<script type="application/json" id="{element}">(.*?)</script>', page, re.S)
    assert match, f"no {element} in the page"
    return json.loads(match.group(1))


def page_arrays(data: dict) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The labels and probabilities the page embeds, decoded as its script decodes them."""
    n, labels = data["n"], len(data["labels"])
    y = np.frombuffer(base64.b64decode(data["y"]), np.uint8).reshape(n, labels)
    probs = {b: np.frombuffer(base64.b64decode(p["data"]), "<" + p["dtype"]).reshape(n, labels)
             for b, p in data["probs"].items()}
    return y, probs


def python_f1(data: dict, weights: dict, threshold: float, per_label: dict) -> float:
    """Samples-F1 of the given settings by pipeline.fusion and pipeline.metrics on the page's arrays."""
    y, probs = page_arrays(data)
    settings = FusionSettings(**{**data["fusion"], "method": "weighted", "stacker": None, "weights": weights,
                                 "threshold": threshold, "per_label_thresholds": per_label})
    return samples_f1(y, settings.predict(probs))


# The data folder and label names a hostile dataset may bring: a folder name that a shell would
# split and run, a label name that would end or derail the page's inline JSON, and ones that
# matplotlib's mathtext would try to parse.
HOSTILE_FOLDER = "rep data;echo PWNED"
PAGE_NAMES = {1: "<!--<script>", 3: "cost $5^ or $6", 18: "dog", 19: "a $\\frac$ horse"}


@pytest.fixture(scope="module")
def evaluated(trained_branches, tmp_path_factory):
    """(weights, output) of one ``--evaluate`` run on the tiny trained branches, their data in
    a folder named ``HOSTILE_FOLDER`` and their labels named ``PAGE_NAMES`` by dataset.json."""
    data, weights = trained_branches
    root = tmp_path_factory.mktemp("report")
    shutil.copytree(weights, root / "weights")
    hostile = shutil.copytree(data, root / HOSTILE_FOLDER)
    info_path = hostile / "dataset.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    info.setdefault("train.csv", {})["labels"] = {str(i): name for i, name in PAGE_NAMES.items()}
    info_path.write_text(json.dumps(info))
    with pytest.MonkeyPatch.context() as patch:
        import torch

        patch.setattr(torch.cuda, "is_available", lambda: False)
        run(hostile, root / "weights", root / "out", "--evaluate")
    return root / "weights", root / "out"


def test_evaluate_writes_one_self_contained_page(evaluated):
    weights, out = evaluated
    page = (out / "report.html").read_text(encoding="utf-8")
    for name in PAGE_NAMES.values():
        assert f"<h3>{html.escape(name)} " in page
    # Self-contained: nothing to fetch; every image is inline data.
    assert not re.search(r"""(src|href)\s*=\s*['"](https?:|//)""", page)
    assert re.findall(r"""<img[^>]*src=['"](?!data:)""", page) == []
    thumbs = embedded(page, "thumbs")
    referenced = set(re.findall(r"""data-thumb=['"](\d+)['"]""", page))
    assert referenced and referenced == set(thumbs)
    for encoded in thumbs.values():
        with Image.open(BytesIO(base64.b64decode(encoded))) as image:
            assert image.format == "JPEG" and max(image.size) <= PageLimits().size
    # The tiny images are 32 px: thumbnails are never enlarged.
    assert all(Image.open(BytesIO(base64.b64decode(t))).size == (32, 32) for t in thumbs.values())
    data = embedded(page, "report-data")
    metrics = json.loads((out / "metrics.json").read_text())
    assert data["fused_samples_f1"] == metrics["branches"]["fused"]["samples_f1"]
    assert data["target"] == str(weights / "fusion.json")
    # The embedded probabilities are the very ones evaluated: fused again, they give metrics.json's F1.
    saved = load_fusion(weights / "fusion.json")
    assert python_f1(data, saved.weights, saved.threshold, saved.per_label_thresholds) == \
        pytest.approx(metrics["branches"]["fused"]["samples_f1"], abs=1e-12)
    y, _ = page_arrays(data)
    assert y.sum(axis=0).tolist() == [metrics["branches"]["fused"]["per_label"][str(i)]["support"] for i in WORDS]
    assert len(page.encode()) < 400_000


def test_no_report_writes_none(trained_branches, tmp_path):
    data, weights = trained_branches
    shutil.copytree(weights, tmp_path / "weights")
    run(data, tmp_path / "weights", tmp_path / "out", "--evaluate", "--no-report")
    assert (tmp_path / "out" / "metrics.json").is_file()
    assert not (tmp_path / "out" / "report.html").exists()


def test_thumbnails_keep_to_the_caps_and_the_page_states_them(tmp_path):
    rng = np.random.default_rng(0)
    n, labels = 20, 3
    (tmp_path / "data").mkdir()
    ids = [f"{i}.jpg" for i in range(n)]
    for image_id in ids:
        Image.fromarray(rng.integers(0, 255, (90, 160, 3), dtype=np.uint8)).save(tmp_path / "data" / image_id)
    y = (rng.random((n, labels)) < 0.4).astype(np.int64)
    y[y.sum(axis=1) == 0, 0] = 1
    probs = {"image": rng.random((n, labels)).astype(np.float32), "caption": rng.random((n, labels)).astype(np.float32)}
    settings = FusionSettings(branches=["image", "caption"], label_ids=[1, 2, 3], weights={"image": 0.5, "caption": 0.5},
                              threshold=0.5)
    metrics = {"fused": evaluate_probs(y, settings.probabilities(probs), settings.thresholds(), [1, 2, 3])}
    limits = PageLimits(per_label=2, disagreement=2, total=5, size=48)
    frame = __import__("pandas").DataFrame({"ImageID": ids, "Caption": [f"caption {i} </script>" for i in range(n)]})
    summary = write_report_page(tmp_path / "report.html", y, probs, settings, [1, 2, 3], metrics, frame,
                                DatasetPaths(tmp_path, tmp_path / "data"), source="validation split",
                                weights_dir=tmp_path, command=["python", "inference.py"], limits=limits)
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    thumbs = embedded(page, "thumbs")
    # 3 labels x 2 kinds x 2 + 2 entries ask for more images than the cap of 5 allows.
    assert summary["thumbnails"] == len(thumbs) == 5
    for encoded in thumbs.values():
        with Image.open(BytesIO(base64.b64decode(encoded))) as image:
            assert image.size == (48, 27)  # 160x90 shrunk to 48 px on its longest side
    assert "at most 2 per label and kind, 2 in the disagreement gallery, 5 distinct images in all, each at most 48 px" \
        in page
    assert "gallery entries left out by the cap" in page
    # Captions are escaped, never markup.
    assert re.search(r"caption \d+ &lt;/script&gt;", page) and not re.search(r"caption \d+ </script>", page)


def test_the_pages_command_is_shell_quoted(evaluated):
    """The rerun command the page shows, pasted into bash, runs inference.py on the data folder
    as it is named: a ";" in the name never starts a second command."""
    weights, out = evaluated
    data = embedded((out / "report.html").read_text(encoding="utf-8"), "report-data")
    # A shell function stands in for python and prints each argument it gets on its own line.
    shown = subprocess.run(["bash", "-c", "python() { printf '%s\\n' \"$@\"; }\n" + data["command"]],
                           capture_output=True, text=True, check=True, timeout=60).stdout.splitlines()
    assert shown == ["inference.py", "--data", str(weights.parent / HOSTILE_FOLDER), "--weights-dir", str(weights)]


def test_inline_json_cannot_end_or_derail_its_script_element(evaluated):
    value = {"name": "<!--<script></script>&'", "</SCRIPT><!--": ["<script", "-->"]}
    text = str(script_json(value))
    assert not set("<>&") & set(text)
    assert json.loads(text) == value
    # In the page: the label names reach the data intact, and its script elements hold no "<".
    page = (evaluated[1] / "report.html").read_text(encoding="utf-8")
    assert [label["name"] for label in embedded(page, "report-data")["labels"]] == list(PAGE_NAMES.values())
    for body in re.findall(r'<script type="application/json" id="\w+">(.*?)</script>', page, re.S):
        assert "<" not in body


def test_the_page_is_built_from_its_package_files_only():
    """The page's HTML, CSS and script are package data (pipeline/report_assets), not Python strings."""
    tree = ast.parse(Path(pipeline.report_page.__file__).read_text(encoding="utf-8"))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and ast.get_docstring(node)}
    strings = [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)
               and isinstance(node.value, str) and id(node) not in docstrings]
    assert [text for text in strings if re.search(r"<[a-zA-Z]+[\s>/]|</|function\s*\(|=>|\{\s*[\w-]+\s*:", text)] == []
    for name in ("page.html", "page.css", "page.js"):
        assert asset_text(name).strip()
    assert "{{ script }}" in asset_text("page.html") and "{{ css }}" in asset_text("page.html")
    # Inlined as they are into <script> and <style>: nothing in them may end those elements early.
    assert not re.search(r"</script|<!--", asset_text("page.js"), re.I)
    assert not re.search(r"</style", asset_text("page.css"), re.I)


# --- the page's script, run by node (and by Chromium in the browser test) ----------------------

NODE = shutil.which("node")
PAGE_JS = Path(pipeline.report_page.__file__).parent / "report_assets" / "page.js"
# JavaScript bodies that read ``input`` and return JSON, run by node on page.js's exports and by
# the browser on the page's own functions (``page`` is then the window).
JS_FUSION = """
return input.cases.map((c) => {
  const model = page.tunerModel(c.data);
  const state = {weights: new Map(Object.entries(c.weights)), threshold: c.threshold,
                 perLabel: new Map(Object.entries(c.per_label))};
  const fused = page.fuse(model, state.weights);
  const scored = page.score(model, page.binarize(model, fused, page.thresholdsOf(model, state)));
  return {fused: Array.from(fused), samples: scored.samples, f1: scored.labels.map((m) => m.f1)};
});
"""
JS_FRAGMENTS = """
const model = page.tunerModel(input.data), saved = page.savedState(model, input.fusion);
return input.fragments.map((fragment) => {
  try {
    const state = page.parseFragment(fragment, model, saved);
    return {weights: Object.fromEntries(state.weights), threshold: state.threshold,
            per_label: Object.fromEntries(state.perLabel), problem: page.settingsProblem(model, state)};
  } catch (err) {
    return {error: err.message};
  }
});
"""


def run_node(body: str, payload: object) -> object:
    script = (f"const page = require({json.dumps(str(PAGE_JS))});\n"
              "const input = JSON.parse(require('fs').readFileSync(0, 'utf8'));\n"
              f"process.stdout.write(JSON.stringify((() => {{ {body} }})()));")
    done = subprocess.run([NODE, "-e", script], input=json.dumps(payload), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def random_cases(count: int, seed: int = 0) -> list[dict]:
    """Random fusion problems: 1-3 branches in a random order, float32 or float64 probabilities
    (some on a coarse grid, so ties and scores exactly at a threshold occur), images one branch
    could not score, weights of 0 (some images then fall back to the plain mean), per-label
    thresholds for some labels. Each with Python's fused probabilities, samples-F1 and per-label F1."""
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(seed)
    cases = []
    for k in range(count):
        n, labels = int(rng.integers(1, 40)), int(rng.integers(2, 7))
        branches = [str(b) for b in rng.permutation(["image", "decoder", "caption"])[: rng.integers(1, 4)]]
        dtype = np.float32 if k % 2 else np.float64
        probs = {b: rng.random((n, labels)) for b in branches}
        if k % 3 == 0:
            probs = {b: np.round(p * 10) / 10 for b, p in probs.items()}
        probs = {b: p.astype(dtype) for b, p in probs.items()}
        for b in branches[:-1]:
            probs[b][rng.random(n) < 0.2] = np.nan  # an image this branch could not read
        y = (rng.random((n, labels)) < 0.35).astype(np.uint8)
        weights = {b: float(rng.choice([0.0, round(float(rng.random()), 3)])) for b in branches}
        weights[branches[int(rng.integers(len(branches)))]] = round(float(rng.uniform(0.1, 1)), 3)
        ids = [int(i) for i in sorted(rng.choice(90, size=labels, replace=False) + 1)]
        per_label = {str(i): round(float(rng.uniform(0.05, 0.95)), 2) for i in ids if rng.random() < 0.4}
        settings = FusionSettings(branches=branches, label_ids=ids, weights=weights,
                                  threshold=round(float(rng.uniform(0.05, 0.95)), 2), per_label_thresholds=per_label)
        pred = settings.predict(probs)
        cases.append({
            "data": tuner_arrays(y, probs, ids, [f"label {i}" for i in ids]),
            "weights": weights, "threshold": settings.threshold, "per_label": per_label,
            "python": {"fused": settings.probabilities(probs).ravel().tolist(), "samples": samples_f1(y, pred),
                       "f1": f1_score(y, pred, average=None, zero_division=0).tolist()}})
    return cases


def assert_scored_as_python(cases: list[dict], results: list[dict]) -> None:
    assert len(results) == len(cases)
    for case, result in zip(cases, results):
        # The same doubles: fused in the same order of operations.
        assert result["fused"] == case["python"]["fused"]
        assert result["samples"] == pytest.approx(case["python"]["samples"], abs=1e-12)
        assert result["f1"] == pytest.approx(case["python"]["f1"], abs=1e-12)


FRAGMENTS = {
    "pl=99:0.3,toString:0.3": 'fragment pl: "99" is not a label id of this page (ids: 1, 3)',
    "pl=toString:0.3": 'fragment pl: "toString" is not a label id of this page (ids: 1, 3)',
    "pl=__proto__:0.3": 'fragment pl: "__proto__" is not a label id of this page (ids: 1, 3)',
    "pl=1": 'fragment pl: "1" is not name:value',
    "t=abc": 'fragment t: "abc" is not a number',
    "t=": 'fragment t: "" is not a number',
    "t=0x1": 'fragment t: "0x1" is not a number',
    "w=caption:abc": 'fragment w, weight of caption: "abc" is not a number',
    "w=nosuch:1": "fragment w: nosuch is not one of the branches image, caption",
}


def fragment_payload() -> dict:
    y = np.array([[1, 0], [0, 1]], dtype=np.uint8)
    probs = {"image": np.array([[0.9, 0.2], [0.3, 0.6]]), "caption": np.array([[0.7, 0.1], [0.2, 0.8]])}
    fusion = {"weights": {"image": 0.5, "caption": 0.5}, "threshold": 0.5, "per_label_thresholds": {"3": 0.4}}
    return {"data": tuner_arrays(y, probs, [1, 3], ["person", "toString"]), "fusion": fusion,
            "fragments": [*FRAGMENTS, "w=caption:0.25&t=0.45&pl=3:0.35", "pl=", "t=1.5", "pl=1:1e-3,3:2"]}


def assert_fragments_handled(results: list[dict]) -> None:
    refused = dict(zip(FRAGMENTS, results))
    assert {fragment: outcome.get("error") for fragment, outcome in refused.items()} == FRAGMENTS
    good, cleared, high, per_label_high = results[len(FRAGMENTS):]
    assert good == {"weights": {"image": 0.5, "caption": 0.25}, "threshold": 0.45, "per_label": {"3": 0.35},
                    "problem": ""}
    assert cleared["per_label"] == {} and cleared["problem"] == ""
    assert high["problem"] == "the global threshold must be between 0 and 1, not 1.5"
    assert per_label_high["problem"] == "the threshold of toString (id 3) must be between 0 and 1, not 2"


@pytest.mark.skipif(NODE is None, reason="node is not installed: the page's script is checked in the browser only")
def test_the_scripts_fusion_and_f1_are_pythons_on_random_inputs():
    cases = random_cases(60)
    assert_scored_as_python(cases, run_node(JS_FUSION, {"cases": cases}))


@pytest.mark.skipif(NODE is None, reason="node is not installed: the page's script is checked in the browser only")
def test_the_fragment_refuses_unknown_labels_and_values_that_are_not_numbers():
    assert_fragments_handled(run_node(JS_FRAGMENTS, fragment_payload()))


@pytest.mark.skipif(NODE is None, reason="node is not installed: the page's script is checked in the browser only")
def test_the_scripts_shell_quoting_is_shlexs():
    words = ["", "a b", HOSTILE_FOLDER, "it's", "$(touch x)", "`x`", "a\nb", "weights/fusion.json", "ü", "=x",
             "image=0.35,caption=0.65", "-x", "*", "~"]
    assert run_node("return input.map(page.shellQuote);", words) == [shlex.quote(w) for w in words]


# --- headless Chromium -----------------------------------------------------------------------


class Browser:
    """Headless Chromium driven through chromedriver's W3C WebDriver HTTP protocol (stdlib only)."""

    def __init__(self, profile: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.driver = subprocess.Popen([CHROMEDRIVER, f"--port={port}"], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
        self.base = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                self._call("GET", "/status")
                break
            except OSError:
                time.sleep(0.1)
        args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                "--window-size=1280,2400"]
        session = self._call("POST", "/session", {"capabilities": {"alwaysMatch": {
            "browserName": "chrome", "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
            "goog:loggingPrefs": {"browser": "ALL"}}}})
        self.session = f"/session/{session['sessionId']}"

    def _call(self, method: str, path: str, body: dict | None = None):
        request = urllib.request.Request(self.base + path, method=method,
                                         data=None if body is None else json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())["value"]

    def open(self, url: str) -> None:
        self._call("POST", self.session + "/url", {"url": url})

    def run(self, script: str, *args):
        return self._call("POST", self.session + "/execute/sync", {"script": script, "args": list(args)})

    def run_page_function(self, body: str, payload: object):
        """A JS_* body run on the page's own functions, ``input`` being ``payload``."""
        return self.run(f"const page = window, input = arguments[0]; {body}", payload)

    def screenshot(self) -> bytes:
        return base64.b64decode(self._call("GET", self.session + "/screenshot"))

    def console(self) -> list[dict]:
        return self._call("POST", self.session + "/se/log", {"type": "browser"})

    def close(self) -> None:
        try:
            self._call("DELETE", self.session)
        finally:
            self.driver.terminate()
            self.driver.wait(timeout=30)


@pytest.mark.skipif(not (Path(CHROMIUM).is_file() and CHROMEDRIVER), reason=NO_BROWSER)
def test_page_renders_in_chromium_and_its_tuner_scores_as_python(evaluated, tmp_path):
    weights, out = evaluated
    page = out / "report.html"
    data = embedded(page.read_text(encoding="utf-8"), "report-data")
    metrics = json.loads((out / "metrics.json").read_text())
    browser = Browser(tmp_path / "profile")
    try:
        browser.open(page.as_uri())
        state = browser.run(
            "return {text: document.body.innerText,"
            " images: [...document.images].map(i => [i.alt, i.complete, i.naturalWidth]),"
            " f1: document.getElementById('tuner-f1').dataset.value,"
            " error: document.getElementById('page-error').hidden ? '' : document.getElementById('page-error').textContent,"
            " fusion: document.getElementById('fusion-json').textContent,"
            " download: document.getElementById('download').href};")
        shot = browser.screenshot()
        for name in PAGE_NAMES.values():
            assert name in state["text"]
        assert len(state["images"]) > 5
        assert [i for i in state["images"] if not (i[1] and i[2] > 0)] == []
        assert state["error"] == ""
        # The tuner, at the settings in use, gives --evaluate's fused samples-F1.
        assert float(state["f1"]) == pytest.approx(metrics["branches"]["fused"]["samples_f1"], abs=1e-4)
        shown = json.loads(state["fusion"])
        # The download link saves exactly the text shown.
        assert urllib.parse.unquote(state["download"].partition(",")[2]) == state["fusion"]
        saved = load_fusion(weights / "fusion.json")
        assert shown["weights"] == saved.weights and shown["per_label_thresholds"] == saved.per_label_thresholds

        # Other settings through the fragment: the page's F1 is Python's for them, and its
        # fusion.json text loads as fusion.json and holds them.
        weights_set = {"image": 0.2, "decoder": 0.1, "caption": 0.7}
        fragment = "w=" + ",".join(f"{b}:{w}" for b, w in weights_set.items()) + "&t=0.37&pl=1:0.6,19:0.2"
        browser.open(page.as_uri() + "#" + fragment)
        state = browser.run("return {f1: document.getElementById('tuner-f1').dataset.value,"
                            " fusion: document.getElementById('fusion-json').textContent};")
        expected = python_f1(data, weights_set, 0.37, {"1": 0.6, "19": 0.2})
        assert float(state["f1"]) == pytest.approx(expected, abs=1e-9)
        (tmp_path / "fusion.json").write_text(state["fusion"])
        tuned = load_fusion(tmp_path / "fusion.json")
        assert (tuned.weights, tuned.threshold, tuned.per_label_thresholds) == (weights_set, 0.37, {"1": 0.6, "19": 0.2})

        # A slider moved by hand re-scores too.
        state = browser.run("const r = document.getElementById('t-range'); r.value = '0.8';"
                            " r.dispatchEvent(new Event('input'));"
                            " return document.getElementById('tuner-f1').dataset.value;")
        assert float(state) == pytest.approx(python_f1(data, weights_set, 0.8, {"1": 0.6, "19": 0.2}), abs=1e-9)
        # A fragment naming a branch the page lacks says so, and the score of the rest still shows.
        browser.open(page.as_uri() + "#w=nosuch:1&t=0.5")
        state = browser.run("return [document.getElementById('tuner-error').textContent,"
                            " document.getElementById('tuner-f1').dataset.value];")
        assert "nosuch is not one of the branches" in state[0] and state[1] != ""
        # Labels the page does not have, and a threshold that is not a number: refused where the
        # user looks, the settings in use kept (no NaN beside the slider).
        for fragment, message in [("pl=99:0.3,toString:0.3", 'fragment pl: "99" is not a label id of this page'),
                                  ("pl=toString:0.3", 'fragment pl: "toString" is not a label id'),
                                  ("t=abc", 'fragment t: "abc" is not a number')]:
            browser.open(page.as_uri() + "#" + fragment)
            state = browser.run("return [document.getElementById('tuner-error').textContent,"
                                " document.getElementById('tuner-f1').dataset.value,"
                                " document.getElementById('t-value').textContent];")
            assert state[0].startswith(message) and state[1] != "" and state[2] == str(saved.threshold)
        # The one-off command, pasted into bash, runs inference.py on the data folder as named.
        oneoff = browser.run("return document.getElementById('oneoff').textContent;")
        shown = subprocess.run(["bash", "-c", "python() { printf '%s\\n' \"$@\"; }\n" + oneoff],
                               capture_output=True, text=True, check=True, timeout=60).stdout.splitlines()
        assert shown[:3] == ["inference.py", "--data", str(weights.parent / HOSTILE_FOLDER)]
        assert shown[-4:-2] == ["--fusion-weights", ",".join(f"{b}={w}" for b, w in saved.weights.items())]
        # The page's own fusion, F1, fragment parsing and quoting are Python's (as under node).
        cases = random_cases(20, seed=1)
        assert_scored_as_python(cases, browser.run_page_function(JS_FUSION, {"cases": cases}))
        assert_fragments_handled(browser.run_page_function(JS_FRAGMENTS, fragment_payload()))
        errors = [entry for entry in browser.console() if entry.get("level") == "SEVERE"]
        assert errors == []
    finally:
        browser.close()
    with Image.open(BytesIO(shot)) as image:
        assert image.format == "PNG" and image.size[0] >= 800
        # A rendered page, not a blank one: many distinct colours.
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 50
