"""One log format for the ``sidecache`` command and the processes it starts (bench jobs)."""

from __future__ import annotations

import logging
import os


def configure_logging() -> None:
    """Log to stderr at the level ``$SIDECACHE_LOG`` names (default INFO)."""
    logging.basicConfig(
        level=os.environ.get("SIDECACHE_LOG", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
