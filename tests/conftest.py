"""Suite-wide settings.

Hypothesis runs derandomized by default, so the suite is deterministic (the same examples
on every run and in CI); ``pytest --hypothesis-profile=explore`` searches with fresh
randomness and more examples.  No deadline: the machine is shared and noisy.
"""

import pathlib
import tempfile

import pytest
from hypothesis import settings

settings.register_profile("deterministic", derandomize=True, deadline=None)
settings.register_profile("explore", deadline=None, max_examples=1000)
settings.load_profile("deterministic")


@pytest.fixture
def private_tmp(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    """A private TMPDIR for a test's processes, so leftovers are attributable to it (a
    global /tmp scan would see other test runs on the same machine)."""
    path = tmp_path / "tmp"
    path.mkdir()
    monkeypatch.setenv("TMPDIR", str(path))
    monkeypatch.setattr(tempfile, "tempdir", str(path))
    return path
