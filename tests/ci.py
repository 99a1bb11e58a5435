"""What the tests need from their machine: skipped where it is missing here, failed under CI.

`make test` (and so CI, which sets CI=true) installs every tool and data set the suite uses, so
under CI a missing one is a broken install step, not a reason to pass by skipping.
"""

from __future__ import annotations

import os

import pytest


def skip_unless_ci(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} [required under CI]")
    pytest.skip(reason, allow_module_level=True)
