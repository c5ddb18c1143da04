"""The one exception tree of waconsent, grouped by what the caller should do.

::

    WaconsentError
    ├── ConfigError            fix the configuration or the command line   (exit 1)
    ├── InputError             fix the input file; the good parts were kept (exit 1)
    ├── FatalError             the run cannot proceed; nothing is lost     (exit 3)
    │   ├── AuthenticationError    credentials refused or missing
    │   ├── ApiLimitExhausted      the CRM's daily limit is used up
    │   ├── ConnectionFailed       the CRM or the store cannot be reached
    │   └── RunLockHeld            another node is running a sync for this CRM
    ├── RetryableError         try the same request again later (carries retry_after)
    │   └── RateLimited
    └── RecordError            one record failed; skip it, keep its write queued
        └── PermanentRecordError   retrying will not heal it (bad field, bad type)

The CLI maps this tree to the exit codes of SPEC section 3; nothing else reads
an exception's message text to decide what to do. Anything outside the tree is shown
only through `describe`: its message may quote personal data.
"""

from __future__ import annotations

from collections.abc import Sequence


class WaconsentError(Exception):
    """Base of every error waconsent raises on purpose."""


class ConfigError(WaconsentError):
    """The configuration (or a command-line argument) is wrong; every problem is listed at once."""

    def __init__(self, problems: Sequence[str], source: str = "") -> None:
        self.problems = tuple(problems)
        self.source = source
        header = f"{source}: " if source else ""
        if len(self.problems) == 1:
            message = header + self.problems[0]
        else:
            message = (
                header
                + f"{len(self.problems)} problems:\n"
                + "\n".join(f"  - {p}" for p in self.problems)
            )
        super().__init__(message)


class InputError(WaconsentError):
    """An input file had bad parts; the good parts were processed and the bad ones listed."""


class FatalError(WaconsentError):
    """The run cannot go on; whatever was queued stays queued."""


class AuthenticationError(FatalError):
    """The CRM refused the credentials (or they are missing)."""


class ApiLimitExhausted(FatalError):
    """The CRM's API allowance is used up; retrying today will not help."""


class ConnectionFailed(FatalError):
    """An outside system could not be reached after the retry policy gave up."""


class RunLockHeld(FatalError):
    """Another run for the same CRM holds the lock (on this node or another)."""

    def __init__(self, crm: str, holder: str) -> None:
        self.crm = crm
        self.holder = holder
        super().__init__(f"another sync run for {crm} is in progress (held by {holder})")


class RetryableError(WaconsentError):
    """A transient refusal; `retry_after` is the server's requested wait in seconds, if any."""

    def __init__(
        self, message: str, *, status: int | None = None, retry_after: float | None = None
    ) -> None:
        self.status = status
        self.retry_after = retry_after
        super().__init__(message)


class RateLimited(RetryableError):
    """429 or an equivalent throttle answer."""


class RecordError(WaconsentError):
    """One record could not be written; its neighbours are unaffected."""

    def __init__(
        self, message: str, *, record_id: str, code: str = "", fields: Sequence[str] = ()
    ) -> None:
        self.record_id = record_id
        self.code = code
        self.fields = tuple(fields)
        super().__init__(message)


class PermanentRecordError(RecordError):
    """A record error that retrying will not heal (unknown field, wrong type, too long)."""


def describe(exc: BaseException) -> str:
    """What went wrong, in words safe for a log, a run record or the terminal.

    Our own errors say what happened, and their messages are written to hold no personal
    data. Any other error is named by its type, and a database error by its code (the
    SQLSTATE, or SQLite's error name), never by its message: a driver's message may quote
    SQL parameters (numbers, names, IP addresses) or the values of a violated constraint.
    """
    if isinstance(exc, WaconsentError):
        return str(exc)
    original = getattr(exc, "orig", None)
    cause = original if isinstance(original, BaseException) else exc
    code = getattr(cause, "sqlstate", None) or getattr(cause, "sqlite_errorname", None)
    name = type(exc).__name__
    if cause is not exc:
        name += f" ({type(cause).__name__})"
    return f"{name}, code {code}" if code else name
