"""Errors named by the action they trigger (after dolma's ``core/errors.py``).

- :class:`AbortRun`: the run itself cannot proceed (bad config, missing model, bad manifest).
  The runner commits what is done and exits non-zero (2; :class:`StageBusy`, another process
  already running the same stage and shard, exits 3).
- :class:`PermanentError`: this item failed and retrying will not help (a removed video, a corrupt
  file). Recorded as ``failed_permanent``; retried only with ``--retry-failed`` or ``--force``.
- :class:`TransientError`: this item failed for now (HTTP 429, a timeout). Recorded as
  ``failed_transient`` and retried with backoff up to the stage's ``max_attempts``.

Any other exception raised for one item fails that item permanently with reason
``unexpected:<ExceptionType>`` and a summarized traceback; it never stops the run.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Base class of every error the engine treats specially."""


class AbortRun(PipelineError):
    """The run cannot proceed; nothing further is attempted. The CLI exits with ``exit_code``."""

    exit_code = 2


class StageBusy(AbortRun):
    """Another process is running the same stage (and an overlapping shard) of this run folder."""

    exit_code = 3


class ItemError(PipelineError):
    """An error that fails one item. ``reason`` is a short machine-readable class."""

    status: str = "failed_permanent"

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason
        self.message = message or reason


class PermanentError(ItemError):
    status = "failed_permanent"


class TransientError(ItemError):
    status = "failed_transient"
