"""Options of the real-data checks (`make check-real`)."""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--shared",
        default="../shared/comp5329",
        help="folder holding the real competition data (train.csv, test.csv, data/)",
    )


@pytest.fixture(scope="session")
def shared(request: pytest.FixtureRequest) -> Path:
    root = Path(request.config.getoption("--shared"))
    if not (root / "train.csv").is_file():
        pytest.skip(f"{root}/train.csv not found: real-data checks need the development copy")
    return root
