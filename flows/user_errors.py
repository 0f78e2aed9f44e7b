"""How errors reach the user of the command line: one line naming what to fix.

A mistake the user can fix (embedder.errors.UserError) is printed once, by the CLI, without
a traceback (`--debug` shows it). Prefect would log it too, with its traceback, on the task
and flow run loggers; a full disk makes MLflow's and Prefect's bookkeeping fail in turn and
bury the first error under theirs. The helpers here keep the one message that matters.
"""

from __future__ import annotations

import errno
import logging

from embedder.errors import UserError

BUSY_MACHINE = (
    "Prefect's temporary server did not start in time (a busy machine, or several runs "
    "starting at once). Start the servers once with `gen2embed up --workdir DIR` and run "
    "again: runs then use them; or raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS "
    "(90 by default here)."
)


class BusyMachine(UserError, TimeoutError):
    """The run's temporary Prefect server did not answer in time (BUSY_MACHINE; exit 3)."""


class _DropUserErrors(logging.Filter):
    """Prefect logs a failed run's exception (traceback included) on its task and flow run
    loggers; for a mistake the user can fix, the CLI's one message says it all."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, UserError):
            return False
        message = record.getMessage()
        return not any(
            f"exception {name}:" in message or f"exception: {name}:" in message
            for name in _user_error_names()
        )


def _user_error_names() -> set[str]:
    names, todo = set(), [UserError]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo += cls.__subclasses__()
    return names


def user_cause(exc: BaseException) -> str | None:
    """The first error in `exc`'s chain a user can act on, as one line of text."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, UserError):
            return str(seen)
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return f"no space left on the device ({seen.filename or seen})"
        if "database or disk is full" in str(seen):
            return "no space left on the device holding the workdir's databases"
        seen = seen.__cause__ or seen.__context__
    return None


def quiet_user_errors() -> None:
    # Prefect's API log handler writes "--- Error logging to API ---" and the server's 500 to
    # stderr when the server cannot store a log (its database on a full disk); like the stdlib
    # handlers it stays silent when logging errors are turned off, as they are in production.
    logging.raiseExceptions = False
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logging.getLogger(name).addFilter(_DropUserErrors())
