"""Bulk API 2.0 for big reads and writes: create a job, poll its state, fetch CSV results.

simple-salesforce has a Bulk 2.0 handler, but it sleeps with `time.sleep` and
retries on its own; here every request goes through the connector's single call
path (retry policy, session renewal, limit handling, call counting) and every
wait goes through the policy's injectable `sleep`.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol, TypeVar

import requests
from simple_salesforce.api import Salesforce

from waconsent.errors import ConnectionFailed

T = TypeVar("T")

TERMINAL_STATES = frozenset({"JobComplete", "Failed", "Aborted"})
NULL = "#N/A"  # Bulk API CSV: set the field to null (an empty cell leaves it unchanged)


class Caller(Protocol):
    """The connector's call path: runs `fn` with a logged-in client under the policy."""

    def __call__(self, fn: Callable[[Salesforce], T], what: str) -> T: ...


@dataclass
class IngestOutcome:
    """What an ingest job says about its records, by record id."""

    job_id: str
    state: str
    error_message: str = ""
    succeeded: set[str] = field(default_factory=set)
    failed: dict[str, tuple[str, str]] = field(default_factory=dict)  # id -> (code, message)


def split_error(text: str) -> tuple[str, str]:
    """'STRING_TOO_LONG:Opt In Source: data value too large:--' -> (code, message)."""
    code, _, message = text.partition(":")
    if code and code.replace("_", "").isalnum() and code.upper() == code:
        return code, message.rstrip(":-").strip() or code
    return "UNKNOWN_ERROR", text


def rest(sf: Salesforce, path: str, **kwargs: Any) -> Any:
    """`Salesforce.restful` (JSON in, JSON out), typed for the call path."""
    return sf.restful(path, **kwargs)


def _raw(sf: Salesforce, method: str, url: str, **kwargs: Any) -> requests.Response:
    # The one private call of simple-salesforce used here: `restful` parses every answer
    # as JSON, and the CSV endpoints of Bulk 2.0 answer CSV or nothing (201).
    response: requests.Response = sf._call_salesforce(method, url, name="bulk2", **kwargs)
    return response


def _results_page(sf: Salesforce, *, job_id: str, params: Mapping[str, str]) -> requests.Response:
    return _raw(sf, "GET", f"{sf.bulk2_url}query/{job_id}/results", params=params)


class Bulk2:
    def __init__(
        self,
        call: Caller,
        sleep: Callable[[float], None],
        *,
        poll_base: float = 2.0,
        poll_max: float = 30.0,
        timeout: float = 3600.0,
        page_size: int = 50_000,
    ) -> None:
        self._call = call
        self._sleep = sleep
        self._poll_base = poll_base
        self._poll_max = poll_max
        self._timeout = timeout
        self._page_size = page_size

    # ---- jobs -------------------------------------------------------------------------------

    def _wait(self, kind: str, job_id: str) -> Mapping[str, Any]:
        """Poll the job until it is done; waits grow from poll_base to poll_max seconds."""
        waited = 0.0
        delay = self._poll_base
        while True:
            info: Mapping[str, Any] = self._call(
                lambda sf: rest(sf, f"jobs/{kind}/{job_id}"), f"Bulk API 2.0 {kind} job state"
            )
            if info.get("state") in TERMINAL_STATES:
                return info
            if waited >= self._timeout:
                self._call(
                    lambda sf: rest(
                        sf, f"jobs/{kind}/{job_id}", method="PATCH", json={"state": "Aborted"}
                    ),
                    f"Bulk API 2.0 {kind} job abort",
                )
                raise ConnectionFailed(
                    f"Bulk API 2.0 {kind} job {job_id} was still "
                    f"{info.get('state')} after {waited:.0f} s; aborted it"
                )
            self._sleep(delay)
            waited += delay
            delay = min(self._poll_max, delay * 2)

    # ---- query ------------------------------------------------------------------------------

    def query(self, soql: str) -> Iterator[dict[str, str]]:
        """Rows of a query job as CSV dicts (strings; empty = null), paged by Sforce-Locator."""
        job: Mapping[str, Any] = self._call(
            lambda sf: rest(
                sf,
                "jobs/query",
                method="POST",
                json={
                    "operation": "query",
                    "query": soql,
                    "contentType": "CSV",
                    "lineEnding": "LF",
                    "columnDelimiter": "COMMA",
                },
            ),
            "Bulk API 2.0 query job",
        )
        job_id = str(job["id"])
        info = self._wait("query", job_id)
        if info.get("state") != "JobComplete":
            raise ConnectionFailed(
                f"Bulk API 2.0 query job {job_id} ended {info.get('state')}: "
                f"{info.get('errorMessage', '')}"
            )
        locator = ""
        seen: set[str] = set()
        while True:
            params = {"maxRecords": str(self._page_size)}
            if locator:
                params["locator"] = locator
            response = self._call(
                partial(_results_page, job_id=job_id, params=params), "Bulk API 2.0 query results"
            )
            response.encoding = "utf-8"
            yield from csv.DictReader(io.StringIO(response.text))
            locator = response.headers.get("Sforce-Locator", "null") or "null"
            if locator == "null":
                return
            if locator in seen:
                raise ConnectionFailed(
                    f"Bulk API 2.0 query job {job_id} repeated the result "
                    f"locator {locator!r}; stopped instead of looping"
                )
            seen.add(locator)

    # ---- ingest -----------------------------------------------------------------------------

    def update(
        self, object_name: str, columns: Sequence[str], rows: Sequence[Mapping[str, str]]
    ) -> IngestOutcome:
        """One `update` ingest job over `rows` (CSV cells; Id first), with its results read back."""
        buffer = io.StringIO()
        writer = csv.DictWriter(
            buffer, fieldnames=list(columns), lineterminator="\n", extrasaction="raise"
        )
        writer.writeheader()
        writer.writerows(rows)
        data = buffer.getvalue().encode("utf-8")
        job: Mapping[str, Any] = self._call(
            lambda sf: rest(
                sf,
                "jobs/ingest",
                method="POST",
                json={
                    "object": object_name,
                    "operation": "update",
                    "contentType": "CSV",
                    "lineEnding": "LF",
                    "columnDelimiter": "COMMA",
                },
            ),
            "Bulk API 2.0 ingest job",
        )
        job_id = str(job["id"])
        self._call(
            lambda sf: _raw(
                sf,
                "PUT",
                f"{sf.bulk2_url}ingest/{job_id}/batches",
                data=data,
                headers={"Content-Type": "text/csv"},
            ),
            "Bulk API 2.0 upload",
        )
        self._call(
            lambda sf: rest(
                sf, f"jobs/ingest/{job_id}", method="PATCH", json={"state": "UploadComplete"}
            ),
            "Bulk API 2.0 upload complete",
        )
        info = self._wait("ingest", job_id)
        outcome = IngestOutcome(job_id, str(info.get("state")), str(info.get("errorMessage") or ""))
        for row in self._results(job_id, "successfulResults"):
            outcome.succeeded.add(row.get("Id") or row.get("sf__Id", ""))
        for row in self._results(job_id, "failedResults"):
            outcome.failed[row.get("Id") or row.get("sf__Id", "")] = split_error(
                row.get("sf__Error", "")
            )
        return outcome

    def _results(self, job_id: str, which: str) -> Iterator[dict[str, str]]:
        response = self._call(
            lambda sf: _raw(sf, "GET", f"{sf.bulk2_url}ingest/{job_id}/{which}/"),
            f"Bulk API 2.0 {which}",
        )
        response.encoding = "utf-8"
        return csv.DictReader(io.StringIO(response.text))
