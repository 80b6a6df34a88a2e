"""``inference.py``: reads its settings and the dataset, predicts the test CSV with the prediction
core (``pipeline.prediction``) and writes the submission, the evaluation report and the summary
(``--image`` files are predicted by ``pipeline.predictor``, on the same core)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.data.dataset import (
    DATASET_INFO,
    LABELS_COLUMN,
    DataFormatError,
    DatasetPaths,
    LabelSet,
    check_known_labels,
    group_by_image,
    load_train_val,
    read_prediction_csv,
    recorded_labels,
)
from pipeline.engine import timing
from pipeline.engine.distributed import DistContext, distributed_session
from pipeline.engine.runtime import configure_backends, oom_hint, resolve_device, reuse_freed_memory, seed_everything
from pipeline.inference_config import InferenceConfig, parse_branch_list
from pipeline.io import write_json
from pipeline.labels import label_names
from pipeline.prediction import (
    BranchPredictor,
    Inputs,
    check_dataset_labels,
    choose_branches,
    list_unreadable,
    load_branch_checkpoints,
    missing_inputs,
    predict_in_chunks,
    resolve_fusion,
    split_labels,
    split_probabilities,
    submission_label_text,
    validation_split,
)

log = logging.getLogger(__name__)


def run_inference(config: InferenceConfig) -> dict:
    """Predict test.csv (or ``--test-csv``) with the fused branches; optionally evaluate.
    Returns a summary. (``--image`` runs ``pipeline.predictor.predict_files`` instead.)"""
    config.validate()
    reuse_freed_memory()
    with oom_hint(config.batch_size), distributed_session(resolve_device(config.device)) as (context, device):
        return _run_inference(config, device, context)


def _run_inference(config: InferenceConfig, device: torch.device, context: DistContext) -> dict:
    """Predict the test CSV; under torchrun every process predicts its share of the chunks
    and rank 0 writes the submission and evaluates."""
    logging.basicConfig(level=logging.INFO if context.is_main else logging.WARNING, format="%(message)s")
    configure_backends(device)
    started, started_at = time.perf_counter(), time.time()
    timing.reset()
    seed_everything(config.seed)
    paths = DatasetPaths.resolve(config.data, config.images)
    weights_dir, output_dir = Path(config.weights_dir), Path(config.output)
    # Every input file is read before any slow step, so a broken one fails at once; which
    # columns they have decides the branches that can run.
    data_labels, train, val = load_train_val(paths, config.val_fraction)
    recorded, separator = recorded_labels(config.data)
    test_csv = Path(config.test_csv) if config.test_csv else paths.test_csv
    # --evaluate needs no test set: without DATA/test.csv it scores the validation split alone.
    test = (
        None
        if config.evaluate and not config.test_csv and not test_csv.is_file()
        else read_prediction_csv(test_csv, captions=False)
    )
    frames = {paths.train_csv: train, **({test_csv: test} if test is not None else {})}
    eval_frame = None
    if config.evaluate and config.eval_csv:
        eval_frame = read_prediction_csv(
            config.eval_csv, captions=False, label_names=recorded, label_separator=separator
        )
        if LABELS_COLUMN not in eval_frame:
            raise DataFormatError(f"--eval-csv {config.eval_csv}:1: needs a {LABELS_COLUMN} column")
        frames[Path(config.eval_csv)] = eval_frame
    branches = choose_branches(weights_dir, parse_branch_list(config.branches), missing_inputs(paths, frames))
    checkpoints = load_branch_checkpoints(weights_dir, branches)
    branches = list(checkpoints)
    labels = LabelSet(tuple(checkpoints[branches[0]]["label_ids"]))
    if context.is_main:
        check_dataset_labels(paths.train_csv, data_labels, labels, weights_dir)
    predictor = BranchPredictor(checkpoints, paths, device, config.batch_size, config.runtime, weights_dir / "cache")
    inputs = Inputs(paths, weights_dir / "cache", config.workers)
    settings = resolve_fusion(
        config,
        branches,
        labels,
        weights_dir,
        lambda: validation_split(weights_dir, branches, labels, data_labels, val),
        context,
    )

    names = label_names(labels.ids, recorded)
    summary: dict[str, Any] = {
        "branches": branches,
        "fusion_method": settings.method,
        "submission": None,
        "rows": 0,
        "fusion_val_samples_f1": settings.val_samples_f1,
        "unreadable_images": 0,
    }
    unreadable: list[str] = []
    if test is not None:
        submission = output_dir / "submission.csv"
        unreadable = predict_in_chunks(
            predictor,
            test,
            inputs,
            settings,
            labels,
            submission,
            config.chunk_size,
            f"{test_csv.name} features",
            context,
            label_text=submission_label_text(names, separator),
        )
        summary.update(
            submission=str(submission), rows=len(group_by_image(test).images), unreadable_images=len(unreadable)
        )
    if not context.is_main:
        return {"rank": context.rank, "rows": summary["rows"]}
    if test is None:
        log.info("no %s: evaluating only (validation metrics and the report page), no submission", test_csv)
    else:
        if unreadable:
            list_unreadable(unreadable, output_dir)
        if recorded:
            write_submission_info(output_dir, names, separator)
        log.info(
            "wrote %s: %d rows for the %d images (%d rows) of %s",
            submission,
            summary["rows"],
            summary["rows"],
            len(test),
            test_csv,
        )

    if config.evaluate:
        from pipeline.report import evaluation_report

        if eval_frame is not None:
            check_known_labels(eval_frame, labels)  # the model's labels are known only now
            y_true = labels.encode(group_by_image(eval_frame).images[LABELS_COLUMN])
            probs = predictor.probabilities(eval_frame, inputs, description="evaluation features").by_branch
            source = str(config.eval_csv)
        else:
            y_true, source = split_labels(val, labels, data_labels, weights_dir), "validation split"
            probs = split_probabilities(predictor, inputs, train, val).by_branch
        report = evaluation_report(y_true, probs, settings, list(labels.ids), output_dir, source, names)
        summary["metrics"] = {name: m["samples_f1"] for name, m in report.items()}
        summary["evaluated_on"] = source
        if config.report:
            from pipeline.report_page import write_report_page

            rerun = [
                "python",
                "inference.py",
                "--data",
                str(config.data),
                "--weights-dir",
                str(config.weights_dir),
                *(["--branches", config.branches] if config.branches else []),
            ]
            write_report_page(
                output_dir / "report.html",
                y_true,
                probs,
                settings,
                list(labels.ids),
                report,
                group_by_image(eval_frame if eval_frame is not None else val).images,
                paths,
                source=source,
                weights_dir=weights_dir,
                command=rerun,
                plots=[output_dir / "per_label_f1.png", output_dir / "f1_vs_threshold.png"],
                label_names=names,
            )
    summary["seconds"] = round(time.perf_counter() - started, 1)
    summary["timing"] = timing.summary()
    summary_file = output_dir / "inference_summary.json"
    # The files this run wrote, not those an earlier run left in the folder.
    summary["files"] = [
        str(path) for path in sorted(output_dir.iterdir()) if path.is_file() and path.stat().st_mtime >= started_at
    ] + [str(summary_file)]
    write_json(summary_file, summary)
    log.info(summary_line(summary, output_dir))
    return summary


def summary_line(summary: dict, output_dir: Path) -> str:
    """What a person reads at the end of a run: the scores, the time, where the files went; the
    full record is ``inference_summary.json``."""
    metrics = summary.get("metrics")
    if metrics:
        branches = ", ".join(f"{name} {score:.4f}" for name, score in metrics.items() if name != "fused")
        scores = f"samples-F1 fused {metrics['fused']:.4f} ({branches}) on the {summary['evaluated_on']}"
    elif summary["fusion_val_samples_f1"] is not None:
        scores = f"fusion's validation samples-F1 {summary['fusion_val_samples_f1']:.4f}"
    else:
        scores = "fusion set by hand (no validation score)"
    report = output_dir / "report.html"
    page = f", {report}" if str(report) in summary["files"] else ""
    return (
        f"inference: {scores}; {summary['rows']} test rows, {summary['seconds'] / 60:.1f} min; wrote "
        f"{summary['submission']}{page}; every figure: {output_dir / 'inference_summary.json'}"
    )


def recorded_label_names(data: str | Path) -> dict[str, str]:
    """The label names ``dataset.json`` records for the dataset's train.csv ({} without one);
    ``pipeline.labels.label_names`` names the labels it lacks."""
    return recorded_labels(data)[0]


def write_submission_info(output_dir: Path, names: dict[str, str], separator: str | None) -> None:
    """OUTPUT/dataset.json: the names of the submission's labels by id (and the separator when
    its Labels are names), so submission.csv reads back, and is read by a person, with the
    names of the training data."""
    entry = {"labels": names, **({"label_separator": separator} if separator is not None else {})}
    write_json(output_dir / DATASET_INFO, {"submission.csv": entry})
