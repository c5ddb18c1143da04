"""The protocol every CRM connector satisfies; the run speaks only this.

A connector translates its vendor's API into plain data: records come out as
`CrmRecord` with *logical* consent fields (opt_in as a bool, datetimes as aware
UTC) and raw phone values by CRM field name; writes go in as `WriteRequest` with
logical fields and come back as one `WriteResult` per request, in order.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from typing import Protocol, runtime_checkable

from waconsent.config.check import Verdict
from waconsent.domain import CrmRecord, FieldDescription, WriteRequest, WriteResult


@runtime_checkable
class CrmConnector(Protocol):
    """What a CRM must offer the sync run."""

    #: how many records one write call carries (Salesforce collections: 200)
    write_batch_size: int
    #: whether the run should fetch the next page in a thread while it decides this one:
    #: worth it when reads wait on the network; a local SQLite read is faster in line
    #: (its rows hand the interpreter lock back and forth with the deciding thread)
    read_ahead: bool

    def preflight(self) -> None:
        """Check the mapping against the CRM before anything is read or written.

        Raises one ConfigError listing every problem of `mapping_verdicts()`.
        """

    def mapping_verdicts(self) -> list[Verdict]:
        """Every verdict on the mapping: the shared checker (`waconsent.config.check`) over
        this CRM's fields, then what only this CRM can check. `waconsent check` prints
        them and `preflight` raises them, so the two always agree."""

    def read_all(self) -> Iterator[CrmRecord]:
        """Every record of the mapped object, lazily, page by page."""

    def read_changed_since(self, since: datetime) -> Iterator[CrmRecord]:
        """Records modified at or after `since` (the caller already subtracted its lookback)."""

    def read_by_ids(self, record_ids: Sequence[str]) -> Iterator[CrmRecord]:
        """The named records (missing ones are simply absent)."""

    def find_by_keys(self, keys: Sequence[str]) -> Iterator[CrmRecord]:
        """Records that may carry one of these match keys: an E.164 number in any phone
        field, however it was typed, or a user id (`uid:...`) in the mapped user-id field.

        A superset, found by a search the CRM can run on unnormalized text (the number's
        last digits in order); the caller confirms each candidate by its parsed number. Used
        only for numbers the phone index does not know yet (a contact created since the last
        sync), because such a search cannot use the CRM's indexes.
        """

    def apply(self, writes: Sequence[WriteRequest]) -> list[WriteResult]:
        """Write one batch of at most `write_batch_size`; one result per request, same order."""

    def describe_fields(self) -> Mapping[str, FieldDescription]:
        """The object's fields as the CRM describes them, by CRM field name."""

    def usage(self) -> Mapping[str, int | str | None]:
        """API usage of this connector so far (`api_calls`, and limits where the CRM says)."""

    def close(self) -> None:
        """Release sessions and pools."""


@runtime_checkable
class BulkWriter(Protocol):
    """A CRM with a bulk path for large write sets (Salesforce Bulk API 2.0)."""

    #: from this many queued writes on, the run hands them to `apply_bulk` in one go
    bulk_write_threshold: int

    def apply_bulk(self, writes: Sequence[WriteRequest]) -> list[WriteResult]:
        """Any number of writes; one result per request, same order."""


@runtime_checkable
class CursorConnector(Protocol):
    """A CRM that keeps a cursor of its own between incremental reads (Dataverse's delta
    link). The run stores it with the watermarks and hands it back to the next run."""

    cursor_state: str | None
