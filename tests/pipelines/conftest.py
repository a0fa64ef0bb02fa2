"""Fixtures shared by the loader tests of the tiny SD pipeline (a module may override them)."""

from pathlib import Path

import pytest

from tests.pipelines.sd_helpers import jaxdiff_sd_pipe
from tests.reference_io import reference_dir


@pytest.fixture(scope="module")
def sd_dir() -> Path:
    return reference_dir("pipelines_stable_diffusion") / "sd_tiny"


@pytest.fixture(scope="module")
def shared_pipe(sd_dir):
    """One jaxdiff pipeline (DDIM) per module, so its compiled programs are reused."""
    return jaxdiff_sd_pipe(sd_dir)
