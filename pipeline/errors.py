"""Errors named by the action they trigger (after dolma's ``core/errors.py``).

- :class:`AbortRun`: the run itself cannot proceed (bad config, missing model, bad manifest).
  The runner commits what is done and exits non-zero (2; :class:`StageBusy`, another process
  already running the same stage and shard, exits 3; :class:`RunThrottled`, the source kept
  refusing requests through the stage's cool-downs, exits 4; :class:`RunHalted`, the machine cannot
  go on: a full disk, a quota, a read-only filesystem, no memory or file handles, exits 5). Raised
  from ``process(batch)``, it may carry the results of the items the stage finished first: they
  are committed, and the items without a result keep their current row (an item that was never
  tried loses no attempt).
- :class:`PermanentError`: this item failed and retrying will not help (a removed video, a corrupt
  file). Recorded as ``failed_permanent``; retried only with ``--retry-failed`` or ``--force``.
- :class:`TransientError`: this item failed for now (HTTP 429, a timeout). Recorded as
  ``failed_transient`` and retried with backoff up to the stage's ``max_attempts``.

Any other exception raised for one item fails that item permanently with reason
``unexpected:<ExceptionType>`` and a summarized traceback; it never stops the run, unless it is
about the machine rather than the item (ENOSPC, EDQUOT, EROFS, EMFILE, ENFILE, MemoryError, found
anywhere in its chain: :mod:`pipeline.machine`): then it stops the run as :class:`RunHalted`.
"""

from __future__ import annotations

from typing import Any, Literal


class PipelineError(Exception):
    """Base class of every error the engine treats specially."""


class AbortRun(PipelineError):
    """The run cannot proceed; nothing further is attempted. The CLI exits with ``exit_code``.

    ``results``: the :class:`~pipeline.stage.Result` of each item of the batch the stage finished
    before it had to stop; the runner commits them before stopping.
    """

    exit_code = 2

    def __init__(self, *args: object, results: list[Any] | None = None) -> None:
        super().__init__(*args)
        self.results: list[Any] = list(results or [])


class StageBusy(AbortRun):
    """Another process is running the same stage (and an overlapping shard) of this run folder."""

    exit_code = 3


class RunThrottled(AbortRun):
    """The stage's source kept refusing requests (rate limits, bot checks) through the stage's
    cool-downs: the run stopped so the source can recover. Rerun later or after the fix the message
    names; nothing in the run folder is wrong."""

    exit_code = 4


class RunHalted(AbortRun):
    """The machine cannot go on (a full disk or quota, a read-only filesystem, no memory or file
    handles): not the items' fault, so no row says they failed. Fix the machine and rerun."""

    exit_code = 5


class ItemError(PipelineError):
    """An error that fails one item. ``reason`` is a short machine-readable class."""

    status: Literal["failed_permanent", "failed_transient"] = "failed_permanent"

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(f"{reason}: {message}" if message else reason)
        self.reason = reason
        self.message = message or reason


class PermanentError(ItemError):
    status = "failed_permanent"


class TransientError(ItemError):
    status = "failed_transient"
