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
    """What a CRM must offer the sync run. Built by `from_config` in each vendor module;
    `open_crm` picks the vendor."""

    #: whether the run should fetch the next page in a thread while it decides this one:
    #: worth it when reads wait on the network; a local SQLite read is faster in line
    #: (its rows hand the interpreter lock back and forth with the deciding thread)
    read_ahead: bool
    #: records one page of `read_all` carries, and records one `read_by_ids` call carries:
    #: what an incremental run compares to choose between reading by id and reading all
    page_size: int
    ids_per_read: int

    def preflight(self) -> None:
        """Check the mapping against the CRM before anything is read or written.

        Raises one ConfigError listing every problem of `mapping_verdicts()`.
        """

    def mapping_verdicts(self) -> list[Verdict]:
        """Every verdict on the mapping: the shared checker (`waconsent.config.check`) over
        this CRM's fields, then what only this CRM can check. `waconsent check` prints
        them and `preflight` raises them, so the two always agree."""

    def read_all(self) -> Iterator[CrmRecord]:
        """Every record of the mapped object, lazily, page by page. A next-page link that
        repeats raises ConnectionFailed: a read that ends short would look complete."""

    def read_changed_since(self, since: datetime, cursor: str | None) -> Iterator[CrmRecord]:
        """Records modified at or after `since` (the caller already subtracted its lookback),
        or, where the CRM keeps a cursor of its own and `cursor` is one it handed out
        (`next_cursor`), the changes since that cursor."""

    def next_cursor(self) -> str | None:
        """The cursor for the next `read_changed_since`, once a read ran to its end (the run
        stores it with its watermarks); None for a CRM that keeps none (then `since` rules)."""

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

    def batch_size(self, backlog: int) -> int:
        """How many writes one `write` call should carry when `backlog` are waiting: the
        one place a connector decides between its ordinary path and a bulk path."""

    def write(self, writes: Sequence[WriteRequest]) -> list[WriteResult]:
        """Write any number of records; one result per request, in order. A value the CRM
        cannot hold fails its own record (permanent), never the batch."""

    def describe_fields(self) -> Mapping[str, FieldDescription]:
        """The object's fields as the CRM describes them, by CRM field name."""

    def usage(self) -> Mapping[str, int | str | None]:
        """API usage of this connector so far (`api_calls`, and limits where the CRM says)."""

    def close(self) -> None:
        """Release sessions and pools."""


@runtime_checkable
class TotalHint(Protocol):
    """Optional beside `CrmConnector` (issue 17): a connector that can tell how many
    records its current `read_all` / `read_changed_since` will yield, once the first page is
    in, without an extra request (Salesforce's `totalSize`). The run asks only while a
    progress bar is shown; connectors without it simply have no ETA."""

    def total_hint(self) -> int | None:
        """The number of records the read in progress yields in all; None when unknown."""


def total_hint(connector: object) -> int | None:
    """The connector's hint for the read in progress, if it gives one."""
    return connector.total_hint() if isinstance(connector, TotalHint) else None
