"""Export the trained image branch as one ONNX or OpenVINO model: ``python -m pipeline.tools.export``.

    python -m pipeline.tools.export --weights-dir weights --format onnx --out export/onnx
    python -m pipeline.tools.export --weights-dir weights --format openvino --out export/openvino

The model takes raw RGB pixels, uint8 (N, 3, R, R), each image squashed to R x R as the
pipeline resizes it, and returns the image branch's per-label probabilities, float32 (N, L):
input normalisation, the backbone, avg+max pooling, the test-time flip average of the
checkpoint's views, the float16 rounding of the feature cache and the image head, exactly as
inference.py computes the image branch. Beside it, OUT/model.json describes the input, the
output, the labels, the preprocessing and per-label thresholds for image-only use, and
OUT/README.md shows how to run it (docs/export.md).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.branches.image import ImageHeads, rebuild_backbone
from pipeline.checkpoint import checkpoint_path, probabilities_path
from pipeline.config import build_parser, option, parse_config, run_main, seed_option
from pipeline.data.dataset import (
    DEMO_DATA,
    ID_COLUMN,
    LABELS_COLUMN,
    DatasetPaths,
    LabelSet,
    group_by_image,
    load_train_val,
)
from pipeline.engine.openvino_runtime import convert_model, import_openvino
from pipeline.engine.runtime import seed_everything
from pipeline.fusion import FusionError, fusion_file, load_fusion, tune_fusion
from pipeline.inference import recorded_label_names
from pipeline.io import CheckpointError, OptionError, atomic_write, atomic_write_text, file_digest, write_json
from pipeline.labels import label_names
from pipeline.models.folding import NormalizeInput
from pipeline.models.image_model import AttentionPooled, pool_outputs
from pipeline.prediction import load_branch_checkpoints, validation_probabilities

FORMATS = ("onnx", "openvino")
# The pip package each format needs, by the module it is imported as.
RUNTIME_PACKAGES = {"onnx": {"onnx": "onnx"}, "openvino": {"openvino": "openvino"}}
INPUT_NAME, OUTPUT_NAME = "pixels", "probabilities"
DEFAULT_OPSET = 17
KNOWN_VIEWS = ("plain", "flip")


class ExportError(RuntimeError):
    """An export that cannot run here (a missing package, a checkpoint it cannot export); says why."""


@dataclass
class ExportConfig:
    """Settings of ``python -m pipeline.tools.export``."""

    weights_dir: str = option(
        "weights",
        "folder of the checkpoints: the image branch's image.pt is exported "
        "(and fusion.json / val_probs_image.csv give its thresholds)",
        aliases=("--weights",),
    )
    format: str = option(
        "onnx", "what to write: onnx (OUT/model.onnx) or openvino (OUT/model.xml + model.bin)", choices=list(FORMATS)
    )
    out: str = option(
        "export",
        "folder to write the model, model.json and README.md into; files there that an "
        "export did not write are never replaced without --force",
    )
    force: bool = option(False, "replace files in --out that no export wrote (a README.md of your own, say)")
    opset: int = option(
        DEFAULT_OPSET, "ONNX opset version (--format onnx; 17 up to the highest torch's exporter writes)"
    )
    data: str = option(
        str(DEMO_DATA),
        "dataset folder the weights were trained on: its dataset.json gives the label names, "
        "its validation split the image-only thresholds (both optional: without it, the label ids and 0.5)",
        "data",
    )
    val_fraction: float = option(
        0.15,
        "the --val-fraction the weights were trained with (the validation split the thresholds are tuned on)",
        "data",
    )
    seed: int = seed_option(
        "random seed, as inference.py's: a backbone trained from random initialisation "
        "(no pretrained weights) is rebuilt from it"
    )

    def validate(self) -> None:
        """Refuse settings that cannot work, naming the option."""
        if self.format not in FORMATS:
            raise ValueError(f"--format {self.format!r}: valid formats are {', '.join(FORMATS)}")
        if not self.out.strip():
            raise ValueError("--out is empty (an unset shell variable?); name the folder to write the model into")
        if not DEFAULT_OPSET <= self.opset <= max_opset():
            raise ValueError(
                f"--opset {self.opset}: valid opsets are {DEFAULT_OPSET}..{max_opset()} (the "
                "model needs 17; torch's ONNX exporter writes up to the highest)"
            )


def max_opset() -> int:
    """The highest ONNX opset torch's TorchScript exporter (the one used: dynamo=False) writes."""
    from torch.onnx import _constants

    return int(_constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)


# The files an export writes into --out, by format; model.json lists the model's own.
MODEL_FILES = {"onnx": ("model.onnx",), "openvino": ("model.xml", "model.bin")}
README_TITLE = "# The image branch, exported"


def _export_metadata(path: Path) -> dict | None:
    """The model.json an export wrote at ``path``, or None when it is not one."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    is_ours = (
        isinstance(meta, dict)
        and meta.get("format") in FORMATS
        and isinstance(meta.get("files"), list)
        and isinstance(meta.get("input"), dict)
        and meta["input"].get("name") == INPUT_NAME
    )
    return meta if is_ours else None


def _written_by_export(path: Path, meta: dict | None) -> bool:
    """Whether the existing ``path`` in --out is a file an export wrote: model.json by its keys,
    README.md by its title, a model file by the model.json beside it listing it."""
    if not path.is_file():
        return False
    if path.name == "model.json":
        return meta is not None
    if path.name == "README.md":
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.readline().startswith(README_TITLE)
    return meta is not None and path.name in meta["files"]


def check_out_folder(out: Path, fmt: str, force: bool) -> None:
    """Refuse (before any work) to replace a file in ``out`` that no export wrote, unless ``force``:
    ``--out .`` would otherwise overwrite the project's own README.md."""
    if force or not out.is_dir():
        return
    meta = _export_metadata(out / "model.json")
    foreign = [
        name
        for name in (*MODEL_FILES[fmt], "model.json", "README.md")
        if (out / name).exists() and not _written_by_export(out / name, meta)
    ]
    if foreign:
        raise OptionError(
            f"--out {out}: would replace {', '.join(foreign)}, which no export wrote; choose an "
            "empty or new folder, or give --force to replace them"
        )


def float16_rounded(values: torch.Tensor) -> torch.Tensor:
    """``values.half().float()`` computed in float32 arithmetic alone (round to nearest, ties to
    even, float16's subnormals and overflow included), for float32 ``values``.

    A runtime that computes float16 in float32 drops a float32 -> float16 -> float32 cast pair as
    a no-op, and the rounding with it (OpenVINO's CPU plugin does); a multiple of float16's
    spacing at each value's magnitude, found by comparisons, is what every runtime keeps.
    """
    magnitude = values.abs()
    step = torch.full_like(values, 2.0**-24)  # the spacing of float16's subnormals and lowest binade
    for exponent in range(-13, 16):  # binade [2^e, 2^(e+1)) has 11 significant bits: spacing 2^(e-10)
        step = torch.where(magnitude >= 2.0**exponent, torch.full_like(step, 2.0 ** (exponent - 10)), step)
    rounded = torch.round(values / step) * step  # both exact: step is a power of two
    return torch.where(magnitude < 65520.0, rounded, values * float("inf"))  # float16 overflows at 65520


class ExportedImageBranch(nn.Module):
    """The image branch as inference computes it, in one module: raw uint8 RGB pixels
    (N, 3, R, R) -> per-label probabilities float32 (N, L).

    Normalisation (``NormalizeInput``), the backbone in eval mode (unfused: the runtimes fold batch norm themselves),
    avg+max pooling, the running mean over the views (plain, then mirrored) rounded to float16
    after each view as the feature cache keeps it (``features._mean_into``;
    :func:`float16_rounded`), then the image head's feature standardisation, head and sigmoid
    (``ImageHeads.head_probabilities``).
    """

    def __init__(self, backbone: nn.Module, preprocessing: dict, views: Sequence[str], heads: ImageHeads) -> None:
        super().__init__()
        unknown = [view for view in views if view not in KNOWN_VIEWS]
        if unknown or not views:
            raise ExportError(f"image.pt: views {list(views)}; this exporter knows {', '.join(KNOWN_VIEWS)}")
        if heads.head is None:
            raise ExportError("image.pt: no image head to export")
        self.normalize = NormalizeInput(preprocessing)
        self.backbone = backbone
        self.flips = tuple(view == "flip" for view in views)
        # Registered so their tensors are the model's; ``heads`` runs them as inference does.
        self.head, self.head_norm = heads.head, heads.head_norm
        self.heads = heads
        self.eval()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        images = self.normalize(pixels)  # (N, 3, R, R) uint8 -> float32 normalised
        views = torch.cat([images.flip(-1) if flip else images for flip in self.flips])  # (V*N, 3, R, R)
        pooled = pool_outputs(self.backbone(views))  # (V*N, 2C), or (V*N, 2C + L) with a class attention
        pooled = pooled.reshape(len(self.flips), -1, pooled.shape[-1])  # (V, N, 2C)
        # The running mean over the views, kept in float16 as the cache keeps it (features._mean_into).
        features = float16_rounded(pooled[0])  # (N, 2C)
        for k in range(1, len(self.flips)):
            features = float16_rounded((features * k + pooled[k]) / (k + 1))
        return self.heads.head_probabilities(features)  # (N, L) float32


def build_exported_branch(checkpoint: dict) -> ExportedImageBranch:
    """The exportable module of a loaded image-branch checkpoint."""
    backbone = rebuild_backbone(checkpoint, "image")
    heads = ImageHeads.from_checkpoints({"image": checkpoint})
    module = backbone.module if heads.attention is None else AttentionPooled(backbone.module, heads.attention)
    return ExportedImageBranch(module.eval(), checkpoint["preprocessing"], checkpoint["backbone"]["views"], heads)


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _require_packages(fmt: str) -> None:
    for module, package in RUNTIME_PACKAGES[fmt].items():
        if not _installed(module):
            raise ExportError(
                f"--format {fmt} needs the {package} package, which is not installed: pip install {package}"
            )


def _load_image_checkpoint(weights_dir: Path) -> dict:
    path = checkpoint_path(weights_dir, "image")
    if not path.is_file():
        raise CheckpointError(
            f"{path}: no image-branch checkpoint to export; train the image branch first "
            f"(python train_efficientnet.py --weights-dir {weights_dir})"
        )
    return load_branch_checkpoints(weights_dir, ["image"])["image"]


def image_only_thresholds(config: ExportConfig, label_ids: list[int]) -> tuple[list[float], str]:
    """(per-label thresholds for the image branch's probabilities alone, where they came from).

    fusion-image.json's or fusion.json's when it fuses the image branch alone by weighted
    average (its thresholds are then the image branch's own); else tuned here on the image
    branch's validation probabilities (val_probs_image.csv) and the validation split of
    ``--data``, as inference tunes fusion; else 0.5 for every label. fusion.json tuned for several branches is not
    used: its thresholds fit the fused probabilities, not the image branch's.
    """
    weights_dir = Path(config.weights_dir)
    reasons = []
    # inference.py --branches image keeps its settings in fusion-image.json; fusion.json fuses the
    # image branch alone only where that is the one branch trained.
    for fusion_path in (fusion_file(weights_dir, ["image"]), weights_dir / "fusion.json"):
        if not fusion_path.is_file():
            continue
        try:
            settings = load_fusion(fusion_path)
        except FusionError as err:
            reasons.append(f"{fusion_path} unreadable ({err})")
        else:
            if settings.label_ids != label_ids:
                reasons.append(f"{fusion_path} was tuned for labels {settings.label_ids}, image.pt has {label_ids}")
            elif settings.branches == ["image"] and settings.method == "weighted":
                return [
                    round(float(t), 4) for t in settings.thresholds()
                ], f"{fusion_path}: tuned for the image branch alone"
            else:
                reasons.append(
                    f"{fusion_path} fuses {settings.branches} ({settings.method}); its thresholds fit "
                    "the fused probabilities, not the image branch alone"
                )
    try:
        _, _, val = load_train_val(DatasetPaths.resolve(config.data), config.val_fraction)
        val_images = group_by_image(val).images
        if val_images.empty:
            raise ValueError(f"--val-fraction {config.val_fraction}: the validation split is empty")
        labels = LabelSet(tuple(label_ids))
        y_val = labels.encode(val_images[LABELS_COLUMN])
        probs = validation_probabilities(weights_dir, ["image"], val_images[ID_COLUMN].tolist(), label_ids)
    except (OSError, ValueError) as err:  # no dataset, no val_probs_image.csv, a split that does not fit
        reasons.append(f"cannot tune on the validation split: {err}")
        return [0.5] * len(label_ids), "0.5 for every label (" + "; ".join(reasons) + ")"
    settings = tune_fusion(y_val, probs, label_ids, compare_stacker=False)
    return [round(float(t), 4) for t in settings.thresholds()], (
        f"tuned for the image branch alone on the validation split of {config.data} "
        f"(--val-fraction {config.val_fraction}, {len(y_val)} images, {probabilities_path(weights_dir, 'image')}), "
        "global then per-label as inference tunes fusion"
    )


def _export_onnx(module: nn.Module, example: torch.Tensor, out: Path, opset: int) -> list[Path]:
    import onnx

    path = out / "model.onnx"

    def write(tmp: Path) -> None:
        torch.onnx.export(
            module,
            (example,),
            str(tmp),
            dynamo=False,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "N"}, OUTPUT_NAME: {0: "N"}},
        )
        onnx.checker.check_model(str(tmp), full_check=True)

    atomic_write(path, write)
    return [path]


def _export_openvino(module: nn.Module, example: torch.Tensor, out: Path) -> list[Path]:
    ov = import_openvino()

    resolution = example.shape[-1]
    model = convert_model(
        module, example_input=example, input=[(ov.PartialShape([-1, 3, resolution, resolution]), ov.Type.u8)]
    )
    model.inputs[0].get_tensor().set_names({INPUT_NAME})
    model.outputs[0].get_tensor().set_names({OUTPUT_NAME})
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "model.xml", out / "model.bin"]
    with tempfile.TemporaryDirectory(dir=out, prefix=".export-") as tmp:
        # Full-precision weights: save_model would store them in float16 by default.
        ov.save_model(model, str(Path(tmp) / "model.xml"), compress_to_fp16=False)
        for name in ("model.bin", "model.xml"):  # the .xml last: a complete .xml has its .bin
            with open(Path(tmp) / name, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(Path(tmp) / name, out / name)
    return paths


def run_exported(path: Path, fmt: str, pixels: np.ndarray) -> np.ndarray | None:
    """Probabilities (N, L) of the written model on uint8 ``pixels`` (N, 3, R, R), with
    onnxruntime or OpenVINO on the CPU in float32 (None when the runtime is not installed)."""
    if fmt == "onnx":
        if not _installed("onnxruntime"):
            return None
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run([OUTPUT_NAME], {INPUT_NAME: pixels})[0]
    ov = import_openvino()

    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return compiled(pixels)[compiled.output(0)]


def _preprocessing_record(preprocessing: dict, views: list[str]) -> dict:
    resolution, interpolation = preprocessing["resolution"], preprocessing["interpolation"]
    record = {
        **preprocessing,
        "input_pixels": "raw RGB values 0..255 (uint8), channels first: the mean/std normalisation is folded "
        "into the model",
        "resize_how": f"squash: the whole image resized to {resolution} x {resolution} ignoring its aspect ratio "
        f"(no crop), {interpolation} with antialiasing (torchvision Resize, as "
        "pipeline.data.transforms.build_transform(preprocessing, normalize=False))",
        "channel_order": "RGB (an image in another mode is converted to 8-bit RGB first: pipeline.data.images.to_rgb)",
        "orientation": "upright: a file's EXIF orientation is applied first (PIL.ImageOps.exif_transpose)",
        "views": list(views),
    }
    if "flip" in views:
        record["flip_averaging"] = (
            "inside the model: the pooled features of the image and of its horizontal "
            "mirror are averaged before the head; pass the unmirrored image"
        )
    return record


def _readme(meta: dict) -> str:
    r, fmt = meta["resolution"], meta["format"]
    resample = meta["preprocessing"]["interpolation"].upper()  # BICUBIC or BILINEAR
    name = meta["files"][0]
    run = {
        "onnx": [
            "import onnxruntime as ort",
            f'session = ort.InferenceSession("{name}")',
            f'probs = session.run(["{OUTPUT_NAME}"], {{"{INPUT_NAME}": pixels}})[0]',
        ],
        "openvino": [
            "import openvino as ov",
            f'model = ov.Core().compile_model("{name}", "CPU", {{"INFERENCE_PRECISION_HINT": "f32"}})',
            "probs = model(pixels)[model.output(0)]",
        ],
    }[fmt]
    example = "\n".join(
        [
            "import json",
            "import numpy as np",
            "from PIL import Image, ImageOps",
            run[0],
            'meta = json.load(open("model.json"))',
            "# exif_transpose: a phone photo upright, as the pipeline sees it",
            f'image = ImageOps.exif_transpose(Image.open("photo.jpg")).convert("RGB").resize(({r}, {r}), '
            f"Image.Resampling.{resample})",
            "pixels = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)[None]  # (1, 3, R, R)",
            *run[1:],
            'print([name for name, p, t in zip(meta["label_names"], probs[0], meta["thresholds"]) if p >= t])',
        ]
    )
    flip = (
        "\nThe model averages the features of the image and of its horizontal mirror itself: pass the "
        "image unmirrored.\n"
        if "flip" in meta["preprocessing"]["views"]
        else ""
    )
    return f"""{README_TITLE} ({fmt})

`{"`, `".join(meta["files"])}`: the trained image branch of `{meta["source"]["checkpoint"]}` as one model.

- **input** `{INPUT_NAME}`: uint8, (N, 3, {r}, {r}), NCHW, RGB, raw values 0..255: each image squashed (resized
  without keeping its aspect ratio, no crop) to {r} x {r}, {meta["preprocessing"]["interpolation"]}. The mean/std
  normalisation is inside the model.
- **output** `{OUTPUT_NAME}`: float32, (N, {len(meta["label_ids"])}): the probability of each label, column j
  for label `label_ids[j]` of `model.json` (names in `label_names`).
- **thresholds** (`model.json`, one per label): a label is predicted when its probability is >= its
  threshold ({meta["thresholds_source"]}); inference.py also gives an image its most probable label
  when none reaches its threshold.
{flip}
```python
{example}
```

Pillow's {meta["preprocessing"]["interpolation"]} resize above is close to the pipeline's, not identical: the
pipeline resizes the decoded image with torchvision's antialiased resize. For the pixels (and so
the probabilities) of `inference.py --image FILE --branches image` to within about 1e-4, make
them with `pipeline.data.transforms.build_transform(model.json's preprocessing, normalize=False)`.
"""


def export_image_branch(config: ExportConfig) -> dict:
    """Write the image branch as one model in ``config.format`` into ``config.out``, with
    model.json and README.md beside it; returns what was written."""
    config.validate()
    _require_packages(config.format)
    weights_dir, out = Path(config.weights_dir), Path(config.out)
    check_out_folder(out, config.format, config.force)
    checkpoint = _load_image_checkpoint(weights_dir)
    seed_everything(config.seed)  # as inference seeds before it rebuilds the backbone
    module = build_exported_branch(checkpoint)
    preprocessing, views = checkpoint["preprocessing"], list(checkpoint["backbone"]["views"])
    resolution, label_ids = int(preprocessing["resolution"]), [int(i) for i in checkpoint["label_ids"]]
    example = torch.randint(
        0, 256, (2, 3, resolution, resolution), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )  # (2, 3, R, R): a batch, not one image
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript tracer both exporters use warns that it is deprecated (torch.export needs onnxscript).
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        expected = module(example).numpy()
        if config.format == "onnx":
            files = _export_onnx(module, example, out, config.opset)
        else:
            files = _export_openvino(module, example, out)
    got = run_exported(files[0], config.format, example.numpy())
    check = (
        {"runtime": None, "note": "runtime not installed; not run"}
        if got is None
        else {
            "runtime": "onnxruntime" if config.format == "onnx" else "openvino CPU f32",
            "max_abs_difference_vs_torch": float(np.abs(got - expected).max()),
            "images": len(example),
        }
    )
    recorded = recorded_label_names(config.data) if Path(config.data).is_dir() else {}
    names = label_names(label_ids, recorded)  # the names inference.py and the report give them
    thresholds, source = image_only_thresholds(config, label_ids)
    precision = checkpoint["backbone"].get("precision", "fp32")
    meta = {
        "format": config.format,
        "files": [path.name for path in files],
        "resolution": resolution,
        "input": {
            "name": INPUT_NAME,
            "dtype": "uint8",
            "layout": "NCHW",
            "shape": ["N", 3, resolution, resolution],
            "channels": "RGB",
            "range": "0..255",
        },
        "output": {
            "name": OUTPUT_NAME,
            "dtype": "float32",
            "shape": ["N", len(label_ids)],
            "meaning": "per-label probabilities (sigmoid), column j for label_ids[j]",
        },
        "label_ids": label_ids,
        "label_names": [names[str(i)] for i in label_ids],
        "label_names_source": f"{config.data}/dataset.json"
        if recorded
        else "none recorded: "
        + ("the competition's COCO names" if names != {str(i): str(i) for i in label_ids} else "the label ids"),
        "preprocessing": _preprocessing_record(preprocessing, views),
        "thresholds": thresholds,
        "thresholds_source": source,
        "decision": "label j is predicted when probabilities[:, j] >= thresholds[j]; an image with no label "
        "over its threshold gets its most probable one (as inference.py decides)",
        "backbone": {
            **{key: checkpoint["backbone"][key] for key in ("name", "weights", "weights_digest")},
            # Random initial weights are not in image.pt: inference rebuilds them from its --seed.
            **({"rebuilt_from_seed": config.seed} if checkpoint["backbone"]["weights"] == "random" else {}),
        },
        "computes_in": "float32"
        + (
            ""
            if precision == "fp32"
            else f" (the pipeline runs this backbone in {precision}: expect differences of that precision's rounding)"
        ),
        "source": {
            "checkpoint": str(checkpoint_path(weights_dir, "image")),
            "checkpoint_digest": file_digest(checkpoint_path(weights_dir, "image")),
        },
        "check": check,
    }
    if config.format == "onnx":
        meta["opset"] = config.opset
    write_json(out / "model.json", meta)
    atomic_write_text(out / "README.md", _readme(meta))
    return {
        "format": config.format,
        "out": str(out),
        "model": [str(p) for p in files],
        "metadata": str(out / "model.json"),
        "readme": str(out / "README.md"),
        "thresholds_source": source,
        "check": check,
    }


def get_args_parser() -> argparse.ArgumentParser:
    return build_parser(ExportConfig, __doc__, debug=True)


def main(argv: list[str] | None = None) -> dict:
    result = export_image_branch(parse_config(ExportConfig, get_args_parser(), argv))
    print(f"wrote {', '.join(result['model'])}, {result['metadata']}, {result['readme']}")
    check = result["check"]
    if check["runtime"]:
        print(f"  {check['runtime']} vs torch: max abs difference {check['max_abs_difference_vs_torch']:.2e}")
    return result


if __name__ == "__main__":
    sys.exit(run_main(main, get_args_parser(), errors=(ExportError,)))
