"""The one call path to Salesforce: a logged-in simple-salesforce client, every request
under the shared retry policy, the session renewed once, API calls and the org's
allowance (`Sforce-Limit-Info`) counted from every answer.

Failures are classified by HTTP status and `errorCode`, never by message text: 5xx,
UNABLE_TO_LOCK_ROW and connection errors are retried; INVALID_SESSION_ID renews the
session once (impossible with auth `access_token`); REQUEST_LIMIT_EXCEEDED with the daily
allowance used up is ApiLimitExhausted (with allowance left it is a concurrency limit,
retried).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import requests
from simple_salesforce.api import Salesforce
from simple_salesforce.exceptions import SalesforceError

from waconsent.config.schema import SalesforceConfig
from waconsent.connectors.http import Outcome, RetryPolicy, classify, retry_after_seconds
from waconsent.connectors.salesforce_auth import Authenticator
from waconsent.errors import (
    ApiLimitExhausted,
    AuthenticationError,
    ConfigError,
    ConnectionFailed,
    RateLimited,
    RetryableError,
)

T = TypeVar("T")

#: errorCode -> what to do, ahead of the status table of `http.classify`.
CODE_OUTCOMES: Mapping[str, Outcome] = {
    "INVALID_SESSION_ID": Outcome.RENEW_SESSION,
    "UNABLE_TO_LOCK_ROW": Outcome.RETRY,
    "SERVER_UNAVAILABLE": Outcome.RETRY,
    "REQUEST_RUNNING_TOO_LONG": Outcome.RETRY,
}
#: The org's allowance is used up (when Sforce-Limit-Info does not say otherwise).
LIMIT_CODES = frozenset({"REQUEST_LIMIT_EXCEEDED"})
#: A request-level 400/404 with these codes means the mapping names something missing.
CONFIG_CODES = frozenset(
    {
        "INVALID_FIELD",
        "INVALID_TYPE",
        "NOT_FOUND",
        "MALFORMED_QUERY",
        "INVALID_QUERY_FILTER_OPERATOR",
    }
)

#: Per-record errors retried for that record alone.
TRANSIENT_RECORD_CODES = frozenset({"UNABLE_TO_LOCK_ROW"})
#: Per-record errors that retrying will not heal: the outbox reports them once.
PERMANENT_RECORD_CODES = frozenset(
    {
        "INVALID_FIELD",
        "INVALID_TYPE_ON_FIELD_IN_RECORD",
        "STRING_TOO_LONG",
        "FIELD_INTEGRITY_EXCEPTION",
        "ENTITY_IS_DELETED",
        "INVALID_CROSS_REFERENCE_KEY",
        "MALFORMED_ID",
        "INVALID_ID_FIELD",
        "INVALID_FIELD_FOR_INSERT_UPDATE",
        "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST",
        "FIELD_CUSTOM_VALIDATION_EXCEPTION",
        "REQUIRED_FIELD_MISSING",
        "INSUFFICIENT_ACCESS_OR_READONLY",
        "INSUFFICIENT_ACCESS_ON_CROSS_REFERENCE_ENTITY",
        "NOT_FOUND",
        "INVALID_TYPE",
        "NUMBER_OUTSIDE_VALID_RANGE",
        "INVALID_EMAIL_ADDRESS",
        "DUPLICATE_VALUE",
    }
)

_LIMIT_INFO = re.compile(r"(?:^|[;,\s])api-usage=(\d+)/(\d+)")


def error_of(content: object) -> tuple[str, str]:
    """(errorCode, message) from a simple-salesforce exception's `.content`."""
    if isinstance(content, bytes | str):
        try:
            content = json.loads(content)
        except ValueError:
            return "", ""
    if isinstance(content, list) and content and isinstance(content[0], Mapping):
        content = content[0]
    if isinstance(content, Mapping):
        return (
            str(content.get("errorCode") or content.get("error") or ""),
            str(content.get("message") or content.get("error_description") or ""),
        )
    return "", ""


def limit_info(headers: Mapping[str, str]) -> tuple[int, int] | None:
    match = _LIMIT_INFO.search(headers.get("Sforce-Limit-Info", ""))
    return (int(match.group(1)), int(match.group(2))) if match else None


class SalesforceClient:
    """Logs in lazily, on the first request; `object_name` only names the object in errors."""

    def __init__(
        self,
        settings: SalesforceConfig,
        auth: Authenticator,
        policy: RetryPolicy,
        session: requests.Session | None,
        object_name: str,
    ) -> None:
        self._settings = settings
        self._auth = auth
        self._policy = policy
        self._object = object_name
        self._owns_session = session is None
        self._session = session or requests.Session()
        self._session.hooks["response"].append(self._observe)
        self._client: Salesforce | None = None
        self._calls = 0
        self._usage: tuple[int, int] | None = None
        self._last_headers: Mapping[str, str] = {}

    def _observe(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        """Response hook: count API calls and read Sforce-Limit-Info (logins are not API calls)."""
        if "/services/data/" not in response.url:
            return
        self._calls += 1
        self._last_headers = response.headers
        usage = limit_info(response.headers)
        if usage is not None:
            self._usage = usage

    def _sf(self) -> Salesforce:
        if self._client is None:
            session = self._policy.run(
                lambda: self._auth.login(self._session), f"Salesforce {self._auth.mode} login"
            )
            self._client = Salesforce(
                session_id=session.token,
                instance_url=session.instance_url,
                version=self._settings.api_version,
                session=self._session,
                object_pairs_hook=dict,
            )
        return self._client

    def call(self, fn: Callable[[Salesforce], T], what: str) -> T:
        """Run `fn` with a logged-in client under the retry policy, renewing the session once."""

        def attempt() -> T:
            renewed = False
            while True:
                client = self._sf()
                try:
                    return fn(client)
                except SalesforceError as exc:
                    self._raise_for(exc, what)  # returns only for INVALID_SESSION_ID
                    if renewed or not self._auth.can_renew:
                        raise self._auth.expired() from None
                    self._client = None
                    renewed = True

        return self._policy.run(attempt, what)

    def _raise_for(self, exc: SalesforceError, what: str) -> None:
        """Turn a refused request into the project's errors; return to renew the session."""
        status = int(exc.status)
        code, message = error_of(exc.content)
        if code in LIMIT_CODES:
            self._raise_limit(code, status, what)
        outcome = CODE_OUTCOMES.get(code) or classify(status)
        if outcome is Outcome.RENEW_SESSION:
            return
        if outcome is Outcome.RETRY:
            raise RetryableError(
                f"Salesforce answered {status} {code}".strip(),
                status=status,
                retry_after=retry_after_seconds(self._last_headers),
            )
        if status in (401, 403):
            raise AuthenticationError(
                f"{what}: Salesforce refused the request ({status} "
                f"{code}: {message}); check the integration user's "
                "permissions on " + self._object
            )
        if status in (400, 404) and code in CONFIG_CODES:
            raise ConfigError([f"{what} on {self._object}: Salesforce answered {code}: {message}"])
        raise ConnectionFailed(f"{what}: Salesforce answered {status} {code}: {message}")

    def _raise_limit(self, code: str, status: int, what: str) -> None:
        usage = limit_info(self._last_headers)
        if usage is not None and usage[0] < usage[1]:
            # The daily allowance is not used up: a concurrency limit, which clears.
            raise RateLimited(
                f"{what}: Salesforce refused a concurrent request ({code}, "
                f"api-usage {usage[0]}/{usage[1]})",
                status=status,
                retry_after=retry_after_seconds(self._last_headers),
            )
        shown = f"api-usage {usage[0]}/{usage[1]}" if usage else "no usage figures sent"
        raise ApiLimitExhausted(
            f"Salesforce's API request limit for this org (the daily 'API Requests, Last "
            f"24 Hours' allowance) is used up ({code}, {shown}) during {what}; the run "
            "stops here and queued writes stay in the outbox for the next run"
        )

    def usage(self) -> dict[str, int | str | None]:
        used, limit = self._usage if self._usage else (None, None)
        return {"api_calls": self._calls, "api_usage_used": used, "api_usage_max": limit}

    def close(self) -> None:
        self._session.hooks["response"] = [
            hook for hook in self._session.hooks["response"] if hook != self._observe
        ]
        if self._owns_session:
            self._session.close()
        self._client = None
