"""The write path of the Dataverse connector: PATCHes sent as `$batch`es, answers read back.

Apart from `connectors.dynamics`, which decides what to read and write, so that each reads
on its own; `DynamicsConnector.write` delegates here. Each record becomes
`PATCH entityset(id)` with `If-Match: *` (so a missing record is never created), up to
`batch_size` to a `$batch`, one change set per record and
`Prefer: odata.continue-on-error`, so one bad record fails alone. Several batches go out in
parallel, bounded by `dynamics.max_concurrency`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from waconsent import logs
from waconsent.connectors import dynamics_batch as batch
from waconsent.connectors import dynamics_odata as odata
from waconsent.connectors.dynamics_client import DataverseClient, error_of
from waconsent.connectors.dynamics_metadata import Attribute
from waconsent.connectors.dynamics_values import DataverseValues
from waconsent.domain import WriteRequest, WriteResult
from waconsent.errors import PermanentRecordError

# the connector's logger: the write path's events keep the name they always had
log = logging.getLogger("waconsent.connectors.dynamics")

# per-operation answers inside a $batch that a later attempt may heal
_TRANSIENT_STATUSES = frozenset({401, 408, 423, 429, 500, 502, 503, 504})
_MISSING_STATUSES = frozenset({404, 412})  # 412: If-Match: * found no record

Pending = tuple[int, str, dict[str, Any]]  # (index in the writes, GUID, PATCH body)


class DataverseWriter:
    """Writes one entity set's records through a DataverseClient, in parallel `$batch`es."""

    def __init__(
        self,
        base: str,
        entity_set: str,
        client: DataverseClient,
        values: DataverseValues,
        attributes: Callable[[], Mapping[str, Attribute]],
        *,
        batch_size: int,
        concurrency: int,
    ) -> None:
        self._base = base
        self._set = entity_set
        self._client = client
        self._values = values
        self._attributes = attributes
        self._batch_size = batch_size
        self._concurrency = concurrency

    def write(self, writes: Sequence[WriteRequest]) -> list[WriteResult]:
        """PATCH each record with only its changed attributes, in `$batch`es sent in
        parallel (at most max_concurrency); one result per write, in order."""
        results: list[WriteResult | None] = [None] * len(writes)
        pending: list[Pending] = []
        for index, write in enumerate(writes):
            record_id = odata.guid(write.record_id)
            if record_id is None:
                results[index] = WriteResult(
                    write.record_id,
                    False,
                    "not a Dataverse record id (a GUID)",
                    "INVALID_ID",
                    permanent=True,
                )
                continue
            try:
                body = self._values.payload(write.record_id, write.values, self._attributes())
            except PermanentRecordError as exc:
                results[index] = WriteResult(
                    write.record_id, False, str(exc), exc.code, permanent=True
                )
                continue
            if not body:
                results[index] = WriteResult(write.record_id, True)
                continue
            pending.append((index, record_id, body))
        chunks = [
            pending[i : i + self._batch_size] for i in range(0, len(pending), self._batch_size)
        ]
        if len(chunks) <= 1:
            answered = [self._send_batch(chunk) for chunk in chunks]
        else:
            with ThreadPoolExecutor(
                max_workers=min(self._concurrency, len(chunks)),
                thread_name_prefix="dataverse-batch",
            ) as pool:
                answered = list(pool.map(logs.in_context(self._send_batch), chunks))
        for chunk, chunk_results in zip(chunks, answered, strict=True):
            for (index, _, _), result in zip(chunk, chunk_results, strict=True):
                results[index] = WriteResult(
                    writes[index].record_id, result.ok, result.error, result.code, result.permanent
                )
        return [r for r in results if r is not None]

    def _send_batch(self, chunk: Sequence[Pending]) -> list[WriteResult]:
        operations = [
            batch.Operation(
                str(n), "PATCH", f"{self._base}/{self._set}({record_id})", body, {"If-Match": "*"}
            )
            for n, (_, record_id, body) in enumerate(chunk, start=1)
        ]
        content_type, payload = batch.build(operations)
        response = self._client.send(
            "POST",
            f"{self._base}/$batch",
            kind="batch",
            body=payload,
            headers={"Content-Type": content_type, "Prefer": odata.prefer(continue_on_error=True)},
        )
        if not response.ok:
            code, message = error_of(response)
            logs.event(
                log,
                "dataverse.batch_refused",
                logging.ERROR,
                status=response.status_code,
                code=code,
                operations=len(operations),
            )
            return [
                WriteResult(
                    record_id,
                    False,
                    f"the $batch was refused: HTTP {response.status_code} {message}".strip(),
                    code or f"HTTP_{response.status_code}",
                )
                for _, record_id, _ in chunk
            ]
        try:
            groups = batch.parse(response.headers.get("Content-Type", ""), response.text)
        except ValueError as exc:
            return [
                WriteResult(
                    record_id, False, f"unreadable $batch answer: {exc}", "BAD_BATCH_RESPONSE"
                )
                for _, record_id, _ in chunk
            ]
        answers = batch.match(operations, groups)
        return [
            _result(record_id, answers.get(operation.content_id))
            for operation, (_, record_id, _) in zip(operations, chunk, strict=True)
        ]


def _result(record_id: str, answer: batch.OperationResult | None) -> WriteResult:
    if answer is None:
        return WriteResult(
            record_id, False, "the $batch answer has no result for this record", "NO_RESULT"
        )
    if 200 <= answer.status < 300:
        return WriteResult(record_id, True)
    code, message = answer.error()
    if answer.status in _MISSING_STATUSES:
        return WriteResult(
            record_id,
            False,
            "no such record in Dataverse (deleted or merged?)",
            code or "NOT_FOUND",
            permanent=True,
        )
    transient = answer.status in _TRANSIENT_STATUSES
    return WriteResult(
        record_id,
        False,
        f"HTTP {answer.status} {message}".strip(),
        code or f"HTTP_{answer.status}",
        permanent=not transient,
    )
