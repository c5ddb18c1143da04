"""The one HTTP policy shared by the CRM connectors: how outcomes are classified and retried.

Outcomes are read from one table (status -> what to do), never from message text.
Retries use exponential backoff with full jitter, prefer the server's
`Retry-After` (clamped), and stop on attempts and on total delay. `sleep` is
injectable so tests run instantly and can assert the waits.
"""

from __future__ import annotations

import enum
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TypeVar

import requests
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt

from waconsent.errors import ConnectionFailed, RetryableError

T = TypeVar("T")


class Outcome(enum.Enum):
    OK = "ok"
    RETRY = "retry"  # throttled or the service is briefly unwell
    RENEW_SESSION = "renew_session"  # the token expired: renew once, then repeat
    FAIL = "fail"  # the request itself is wrong; repeating will not help


STATUS_OUTCOMES: Mapping[int, Outcome] = {
    408: Outcome.RETRY,
    429: Outcome.RETRY,
    500: Outcome.RETRY,
    502: Outcome.RETRY,
    503: Outcome.RETRY,
    504: Outcome.RETRY,
    401: Outcome.RENEW_SESSION,
}


def classify(status: int) -> Outcome:
    if 200 <= status < 300:
        return Outcome.OK
    return STATUS_OUTCOMES.get(status, Outcome.FAIL)


def retry_after_seconds(headers: Mapping[str, str], now: datetime | None = None) -> float | None:
    """`Retry-After` as seconds: either delta-seconds or an HTTP date."""
    value = headers.get("Retry-After") or headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def _is_transient(exc: BaseException) -> bool:
    return isinstance(exc, (RetryableError, requests.ConnectionError, requests.Timeout))


@dataclass(frozen=True)
class RetryPolicy:
    """Built once per connector; `run` calls a function under the policy."""

    attempts: int = 6
    base_delay: float = 1.0
    max_delay: float = 60.0
    max_retry_after: float = 300.0
    max_total_delay: float = 600.0
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False)
    jitter: Callable[[float, float], float] = field(default=random.uniform, compare=False)

    def wait_for(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, RetryableError) and exc.retry_after is not None:
            return min(exc.retry_after, self.max_retry_after)
        ceiling = min(self.max_delay, self.base_delay * 2 ** (state.attempt_number - 1))
        return self.jitter(0, ceiling)

    def run(self, fn: Callable[[], T], what: str = "request") -> T:
        waited = [0.0]

        def _sleep(seconds: float) -> None:
            waited[0] += seconds
            self.sleep(seconds)

        def _stop(state: RetryCallState) -> bool:
            return bool(
                stop_after_attempt(self.attempts)(state) or waited[0] >= self.max_total_delay
            )

        retrying = Retrying(
            retry=retry_if_exception(_is_transient),
            wait=self.wait_for,
            stop=_stop,
            sleep=_sleep,
            reraise=True,
        )
        try:
            return retrying(fn)
        except RetryableError as exc:
            raise ConnectionFailed(
                f"{what}: still refused after retrying (last answer: {exc})"
            ) from exc
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise ConnectionFailed(
                f"{what}: cannot reach the server after retrying ({type(exc).__name__})"
            ) from None
