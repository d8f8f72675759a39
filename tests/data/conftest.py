"""Fixtures for the data tests: messy ImageFolder trees and small generated images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.helpers import write_flat_folder
from tests.helpers.messy import make_messy_folder


@pytest.fixture
def messy(tmp_path: Path) -> dict[str, Any]:
    """A fresh messy folder (see :func:`tests.helpers.messy.make_messy_folder`)."""
    return make_messy_folder(tmp_path / "messy")


@pytest.fixture(scope="session")
def messy_ro(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A messy folder shared by tests that only read it."""
    return make_messy_folder(tmp_path_factory.mktemp("messy_ro") / "messy")


@pytest.fixture
def flat_folder(tmp_path: Path) -> Path:
    """Three classes of small distinct flat-colour PNGs (12 images)."""
    return write_flat_folder(tmp_path / "flat", {"a": 5, "b": 4, "c": 3})
