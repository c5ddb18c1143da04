"""The one call path to the Dataverse Web API: every request under the shared retry policy,
within the concurrency bound, with the token renewed once on a 401, counted for `usage()`.

Outcomes are classified by status (`connectors.http.classify`), never by message text:
429 waits exactly its Retry-After, 5xx and dropped connections back off with jitter, a
second 401 is an AuthenticationError, 403 a missing security role, 400/404 a mapping
problem (ConfigError).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Mapping
from typing import Any

import requests
from requests.adapters import HTTPAdapter

from waconsent import logs
from waconsent.connectors import dynamics_batch as batch
from waconsent.connectors.dynamics_auth import TokenProvider
from waconsent.connectors.http import Outcome, RetryPolicy, classify, retry_after_seconds
from waconsent.errors import (
    AuthenticationError,
    ConfigError,
    ConnectionFailed,
    RateLimited,
    RetryableError,
)

log = logging.getLogger("waconsent.connectors.dynamics")

TIMEOUT = 120.0  # seconds; Dataverse itself gives up on a request after 2 minutes
_LIMIT_HEADERS = (
    "x-ms-ratelimit-burst-remaining-xrm-requests",
    "x-ms-ratelimit-time-remaining-xrm-requests",
)


def new_session(concurrency: int) -> requests.Session:
    session = requests.Session()
    session.mount("https://", HTTPAdapter(pool_connections=2, pool_maxsize=concurrency + 1))
    return session


def error_of(response: requests.Response) -> tuple[str, str]:
    """Dataverse's `error.code` and `error.message`; empty strings when the body has none."""
    return batch.dataverse_error(response.text)


class DataverseClient:
    """Requests to one organization's Web API (`base`); never follows a link elsewhere,
    because the bearer token travels with it."""

    def __init__(
        self,
        base: str,
        tokens: TokenProvider,
        *,
        policy: RetryPolicy,
        session: requests.Session,
        own_session: bool,
        concurrency: int,
        timeout: float = TIMEOUT,
    ) -> None:
        self.base = base
        self._tokens = tokens
        self._policy = policy
        self._session = session
        self._own_session = own_session
        self._slots = threading.BoundedSemaphore(max(1, concurrency))
        self._timeout = timeout
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._limits: dict[str, str] = {}

    def send(
        self,
        method: str,
        url: str,
        *,
        kind: str,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
    ) -> requests.Response:
        """One Dataverse request under the shared policy; a 401 renews the token once."""
        if not url.startswith(self.base + "/"):
            # a nextLink or deltaLink must stay on the organization: the token goes with it
            raise ConnectionFailed(f"{kind}: refusing to follow a link outside {self.base}")
        renewed = False

        def attempt() -> requests.Response:
            nonlocal renewed
            while True:
                token = self._tokens.token()
                request_headers = {
                    "Accept": "application/json",
                    "OData-MaxVersion": "4.0",
                    "OData-Version": "4.0",
                    **(headers or {}),
                    "Authorization": f"Bearer {token}",
                }
                with self._slots:
                    response = self._session.request(
                        method, url, headers=request_headers, data=body, timeout=self._timeout
                    )
                self._note(kind, response)
                outcome = classify(response.status_code)
                if outcome is Outcome.RENEW_SESSION:
                    if renewed:
                        raise AuthenticationError(
                            f"Dataverse refused a freshly issued token ({kind}: HTTP 401); "
                            "check that the app registration has an application user in "
                            "this environment"
                        )
                    renewed = True
                    logs.event(log, "dataverse.token_renewed", kind=kind)
                    self._tokens.renew(token)
                    continue
                if outcome is Outcome.RETRY:
                    code, _ = error_of(response)
                    error = RateLimited if response.status_code == 429 else RetryableError
                    raise error(
                        f"{kind}: HTTP {response.status_code} {code}".strip(),
                        status=response.status_code,
                        retry_after=retry_after_seconds(response.headers),
                    )
                return response

        return self._policy.run(attempt, f"Dataverse {kind}")

    def get_json(self, url: str, *, kind: str, table: str) -> dict[str, Any]:
        """A GET whose refusal becomes the project's error (naming `table`)."""
        response = self.send("GET", url, kind=kind)
        if not response.ok:
            raise_for(response, kind, table)
        payload: dict[str, Any] = response.json()
        return payload

    def _note(self, kind: str, response: requests.Response) -> None:
        with self._lock:
            self._counts["api_calls"] += 1
            self._counts[kind] += 1
            if response.status_code == 429:
                self._counts["throttled"] += 1
            for header in _LIMIT_HEADERS:
                if header in response.headers:
                    self._limits[header.removeprefix("x-ms-ratelimit-")] = response.headers[header]

    def usage(self) -> dict[str, int | str | None]:
        with self._lock:
            usage: dict[str, int | str | None] = {
                "api_calls": self._counts["api_calls"],
                "query_pages": self._counts["query"],
                "batches": self._counts["batch"],
                "metadata_calls": self._counts["metadata"],
                "throttled": self._counts["throttled"],
            }
            usage.update(self._limits)
        return usage

    def close(self) -> None:
        if self._own_session:
            self._session.close()


def raise_for(response: requests.Response, kind: str, table: str) -> None:
    status = response.status_code
    code, message = error_of(response)
    said = f"HTTP {status} {code}: {message}".strip().rstrip(":")
    if status == 403:
        raise AuthenticationError(
            f"Dataverse refused the {kind} ({said}); the application user "
            f"needs a security role that can read and update {table}"
        )
    if status in (400, 404):
        raise ConfigError(
            [
                f"Dataverse refused the {kind} on {table!r} ({said}); run "
                "`waconsent check` to compare the mapping with the entity"
            ]
        )
    raise ConnectionFailed(f"Dataverse {kind} failed: {said}")
