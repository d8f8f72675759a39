"""Logging set-up: one handler on the ``deepimage`` logger, quiet on non-zero ranks.

Library modules log through ``logging.getLogger(__name__)``; only the command line calls
:func:`setup_logging`. Records from processes other than rank 0 are dropped by a filter
(warnings and errors pass, so a failing rank is still heard), instead of patching ``print``.
"""

from __future__ import annotations

import logging
import os
import sys


class RankFilter(logging.Filter):
    """Let through records from rank 0, and warnings or worse from any rank."""

    def __init__(self, rank: int | None = None) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        rank = self.rank if self.rank is not None else int(os.environ.get("RANK", "0"))
        return rank == 0 or record.levelno >= logging.WARNING


class _Formatter(logging.Formatter):
    """Plain messages for information; 'warning:' / 'error:' and the rank otherwise."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno < logging.WARNING:
            return message
        rank = os.environ.get("RANK")
        where = f"[rank {rank}] " if rank not in (None, "0") else ""
        return f"{where}{record.levelname.lower()}: {message}"


def setup_logging(level: int = logging.INFO) -> None:
    """Send ``deepimage`` log records to stderr, one line each, filtered by rank."""
    logger = logging.getLogger("deepimage")
    if any(getattr(h, "_deepimage", False) for h in logger.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    handler.addFilter(RankFilter())
    handler._deepimage = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
