"""Where the time goes: each script's JSON summary names its stages' seconds and images per
second and the CPU's instruction set (key ``timing``)."""

from __future__ import annotations

import json
import shutil

import pytest

from pipeline.engine import timing
from pipeline.engine.runtime import instruction_set

AMX = "flags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"
BF16 = "flags\t\t: fpu sse avx2 avx512f avx512_vnni avx512_bf16\n"
AVX2 = "model name\t: AMD EPYC 7B13\nflags\t\t: fpu sse sse2 avx avx2 fma\n"


def test_the_instruction_set_is_the_widest_the_cpu_flags_name():
    assert instruction_set(AMX) == "amx"
    assert instruction_set(BF16) == "avx512_bf16"
    assert instruction_set(AVX2) == "avx2"


def test_stages_add_up_and_give_images_per_second():
    timing.reset()
    timing.add("decode", 1.5, 30)
    timing.add("decode", 0.5, 10)
    with timing.timed("fusion", 4):
        pass
    stages = timing.summary()["stages"]
    assert stages["decode"] == {"seconds": 2.0, "images": 40, "img_s": 20.0}
    assert stages["fusion"]["images"] == 4
    timing.reset()
    assert timing.summary()["stages"] == {}


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_inference_summary_times_every_stage(trained_branches, tmp_path):
    import inference

    data, trained = trained_branches
    weights = tmp_path / "weights"
    shutil.copytree(trained, weights)
    inference.main(["--data", str(data), "--weights", str(weights), "--output", str(tmp_path / "out"),
                    "--device", "cpu", "--workers", "0"])
    summary = json.loads((tmp_path / "out" / "inference_summary.json").read_text())
    times = summary["timing"]
    assert times["instruction_set"] == instruction_set() and times["cpu"]
    assert {"decode", "frozen front", "heads", "caption", "fusion"} <= set(times["stages"])
    rows = summary["rows"]
    assert times["stages"]["fusion"]["images"] == rows and times["stages"]["heads"]["images"] == rows
    assert all(stage["seconds"] >= 0 for stage in times["stages"].values())


def test_training_summaries_time_their_stages(trained_branches):
    _, weights = trained_branches
    image = json.loads((weights / "image_summary.json").read_text())["timing"]
    assert {"decode", "frozen front", "heads (training)", "heads"} <= set(image["stages"])
    assert image["instruction_set"] == instruction_set()
