"""Salesforce write paths: sObject Collections PATCHes and Bulk API 2.0 update jobs.

Split out of `salesforce` so the connector stays a readable size: the connector decides
which path a `write` takes, and this module turns the writes into payloads, sends them,
retries locked records and gives one `WriteResult` per write, in order. Requests still go
through the connector's single call path and retry policy, handed in at construction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TypeVar

from waconsent.connectors.http import RetryPolicy
from waconsent.connectors.salesforce_bulk import NULL, Bulk2, Caller, IngestOutcome, rest
from waconsent.connectors.salesforce_client import PERMANENT_RECORD_CODES, TRANSIENT_RECORD_CODES
from waconsent.connectors.salesforce_values import SalesforceValues, csv_cell
from waconsent.domain import FieldDescription, WriteRequest, WriteResult
from waconsent.errors import ConnectionFailed, PermanentRecordError, RetryableError

T = TypeVar("T")

COLLECTION_LIMIT = 200  # sObject Collections: records per call
BULK_JOB_LIMIT = 100_000  # rows per ingest job (keeps one upload far below 100 MB)
BULK_CHUNK = BULK_JOB_LIMIT  # queued writes handed to one `write` on the bulk path


class _RowsLocked(RetryableError):
    """Some records of a batch were locked; the policy retries just those."""


def batched(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class SalesforceWriter:
    """Writes to one Salesforce object for `SalesforceConnector.write`."""

    def __init__(
        self,
        object_name: str,
        mapped: Mapping[str, str],
        values: SalesforceValues,
        describe: Callable[[], Mapping[str, FieldDescription]],
        call: Caller,
        policy: RetryPolicy,
        bulk: Bulk2,
    ) -> None:
        self._object = object_name
        self._mapped = mapped
        self._values = values
        self._describe = describe
        self._call = call
        self._policy = policy
        self._bulk = bulk

    def _payloads(
        self, writes: Sequence[WriteRequest], results: list[WriteResult | None]
    ) -> list[tuple[int, dict[str, str | bool | None]]]:
        """CRM field values per write; refused ones get their result now and are not sent."""
        fields = self._describe()
        payloads = []
        for index, write in enumerate(writes):
            try:
                payload = self._values.payload(write.record_id, write.values, fields)
            except PermanentRecordError as refused:
                results[index] = WriteResult(
                    write.record_id, False, str(refused), refused.code, permanent=True
                )
                continue
            if payload:
                payloads.append((index, payload))
            else:
                results[index] = WriteResult(write.record_id, True)
        return payloads

    def write_collections(self, writes: Sequence[WriteRequest]) -> list[WriteResult]:
        """sObject Collections in calls of 200; one result per write, in order."""
        return [
            result
            for batch in batched(writes, COLLECTION_LIMIT)
            for result in self._write_collection(batch)
        ]

    def _write_collection(self, writes: Sequence[WriteRequest]) -> list[WriteResult]:
        """sObject Collections PATCH, 200 records a call, allOrNone false; one result per write."""
        results: list[WriteResult | None] = [None] * len(writes)
        payloads = self._payloads(writes, results)
        for chunk in batched(payloads, COLLECTION_LIMIT):
            self._send_collection(writes, chunk, results)
        return [
            r if r is not None else WriteResult(w.record_id, False, "no answer", "NO_RESULT")
            for r, w in zip(results, writes, strict=True)
        ]

    def _send_collection(
        self,
        writes: Sequence[WriteRequest],
        chunk: Sequence[tuple[int, dict[str, str | bool | None]]],
        results: list[WriteResult | None],
    ) -> None:
        pending = list(chunk)

        def attempt() -> None:
            nonlocal pending
            body = {
                "allOrNone": False,
                "records": [
                    {"attributes": {"type": self._object}, "id": writes[index].record_id, **payload}
                    for index, payload in pending
                ],
            }
            answer = self._call(
                lambda sf: rest(sf, "composite/sobjects", method="PATCH", json=body),
                "sObject Collections update",
            )
            if not isinstance(answer, list) or len(answer) != len(pending):
                raise ConnectionFailed(
                    f"sObject Collections update on {self._object}: expected "
                    f"{len(pending)} results, got "
                    f"{len(answer) if isinstance(answer, list) else answer!r}"
                )
            locked = []
            # Results come in request order; a failed record's result has no id.
            for (index, payload), result in zip(pending, answer, strict=True):
                record_id = writes[index].record_id
                if result.get("success"):
                    results[index] = WriteResult(record_id, True)
                    continue
                errors = result.get("errors") or [{}]
                code = str(errors[0].get("statusCode") or "UNKNOWN_ERROR")
                message = "; ".join(str(e.get("message", "")) for e in errors) or code
                results[index] = WriteResult(
                    record_id, False, message, code, permanent=code in PERMANENT_RECORD_CODES
                )
                if code in TRANSIENT_RECORD_CODES:
                    locked.append((index, payload))
            pending = locked
            if pending:
                raise _RowsLocked(f"{len(pending)} record(s) locked (UNABLE_TO_LOCK_ROW)")

        try:
            self._policy.run(attempt, f"sObject Collections update on {self._object}")
        except ConnectionFailed as exc:
            if not isinstance(exc.__cause__, _RowsLocked):
                raise
            # Still locked after the policy's attempts: their results say so, not permanent.

    def write_bulk(self, writes: Sequence[WriteRequest]) -> list[WriteResult]:
        """Bulk API 2.0 update jobs. Records a job reports locked are retried through sObject
        Collections; records a failed or aborted job never processed come back ok=False, not
        permanent."""
        results: list[WriteResult | None] = [None] * len(writes)
        payloads = self._payloads(writes, results)
        order = {name: None for name in self._mapped.values()}
        for chunk in batched(payloads, BULK_JOB_LIMIT):
            used = [n for n in order if any(n in payload for _, payload in chunk)]
            rows = [
                {
                    "Id": writes[index].record_id,
                    **{n: csv_cell(payload[n], NULL) if n in payload else "" for n in used},
                }
                for index, payload in chunk
            ]
            outcome = self._bulk.update(self._object, ["Id", *used], rows)
            self._take_outcome(outcome, writes, chunk, results)
        retry = [
            index
            for index, result in enumerate(results)
            if result is not None and result.code in TRANSIENT_RECORD_CODES
        ]
        for batch in batched(retry, COLLECTION_LIMIT):
            for index, result in zip(
                batch, self._write_collection([writes[i] for i in batch]), strict=True
            ):
                results[index] = result
        return [
            r if r is not None else WriteResult(w.record_id, False, "no answer", "NO_RESULT")
            for r, w in zip(results, writes, strict=True)
        ]

    def _take_outcome(
        self,
        outcome: IngestOutcome,
        writes: Sequence[WriteRequest],
        chunk: Sequence[tuple[int, Mapping[str, object]]],
        results: list[WriteResult | None],
    ) -> None:
        for index, _ in chunk:
            record_id = writes[index].record_id
            if record_id in outcome.failed:
                code, message = outcome.failed[record_id]
                results[index] = WriteResult(
                    record_id, False, message, code, permanent=code in PERMANENT_RECORD_CODES
                )
            elif record_id in outcome.succeeded:
                results[index] = WriteResult(record_id, True)
            else:
                detail = f": {outcome.error_message}" if outcome.error_message else ""
                results[index] = WriteResult(
                    record_id,
                    False,
                    f"not processed by Bulk API 2.0 job {outcome.job_id} ({outcome.state}{detail})",
                    "UNPROCESSED",
                )


__all__ = ["BULK_CHUNK", "BULK_JOB_LIMIT", "COLLECTION_LIMIT", "SalesforceWriter", "batched"]
