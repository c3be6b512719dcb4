"""A minimal BentoML service whose readiness and failures the tests control.

``__is_ready__`` is false while the file named by ``$HEALTHD_TEST_NOT_READY_FILE`` exists, so a
test flips ``/readyz`` to 503 by creating that file. ``echo`` answers its input, and fails with
a 500 for the input ``"fail"``, so a test can drive the request error rate in ``/metrics``.
"""

from __future__ import annotations

import os
from pathlib import Path

import bentoml

_NOT_READY_FILE = Path(os.environ.get("HEALTHD_TEST_NOT_READY_FILE", "/nonexistent/not-ready"))


@bentoml.service(workers=1)
class Echo:
    """Echoes text; readiness follows the marker file."""

    def __is_ready__(self) -> bool:
        """Ready unless the test created the marker file."""
        return not _NOT_READY_FILE.exists()

    @bentoml.api
    def echo(self, text: str) -> str:
        """The input, or a server error for ``"fail"``."""
        if text == "fail":
            raise RuntimeError("asked to fail")
        return text
