"""Salesforce as a CRM: simple-salesforce for login and REST, Bulk API 2.0 for big volumes.

API calls are a product feature here, so each operation has a fixed cost:

| operation                      | calls                                                    |
| ------------------------------ | -------------------------------------------------------- |
| preflight / describe_fields    | 1 describe (cached for the connector's life)             |
| read_all, read_changed_since   | 1 per 2,000 records; above `bulk_query_threshold` (the   |
|                                | first page's totalSize) a Bulk 2.0 query job instead:    |
|                                | create + polls + 1 per 50,000 rows                       |
| read_by_ids                    | 1 per ~500 ids (each query under the URL length limit)   |
| write (below the threshold)    | 1 sObject Collections PATCH per 200 records (+1 per lock |
|                                | retry, carrying only the locked records)                 |
| write (>= bulk_write_threshold)| create + upload + close + polls + 2 result reads per job |

Every request goes through the one call path of `salesforce_client` (retries, session
renewal, the org's allowance); values convert in `salesforce_values`, SOQL is built in
`salesforce_soql`, Bulk API 2.0 jobs run in `salesforce_bulk`, and the write paths
(Collections and Bulk updates) live in `salesforce_writing`.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator, Mapping, Sequence
from datetime import datetime
from functools import partial
from itertools import chain
from typing import TYPE_CHECKING, Any

import requests
from simple_salesforce.api import Salesforce

from waconsent import domain
from waconsent.config.check import (
    SALESFORCE,
    MappingUnderCheck,
    Verdict,
    check_mapping,
    require_fit,
)
from waconsent.config.schema import MappingConfig, SalesforceConfig
from waconsent.connectors.http import RetryPolicy
from waconsent.connectors.salesforce_auth import Authenticator, authenticator
from waconsent.connectors.salesforce_bulk import Bulk2, rest
from waconsent.connectors.salesforce_client import SalesforceClient
from waconsent.connectors.salesforce_soql import (
    api_name,
    is_record_id,
    select_all,
    select_by_ids,
    select_by_numbers,
    select_changed_since,
    select_changed_since_unordered,
    select_fields,
)
from waconsent.connectors.salesforce_values import SalesforceValues, parse_datetime
from waconsent.connectors.salesforce_writing import BULK_CHUNK, COLLECTION_LIMIT, SalesforceWriter
from waconsent.domain import CrmRecord, FieldDescription, WriteRequest, WriteResult
from waconsent.errors import ConfigError, ConnectionFailed
from waconsent.phones import USER_ID_PREFIX, like_pattern, search_digits

if TYPE_CHECKING:
    from waconsent.config import LoadedConfig

QUERY_PAGE_SIZE = 2_000  # Salesforce's maximum REST query page
IDS_PER_QUERY = 500  # 18-character ids an `Id IN (...)` query carries under the URL limit
_QUERY_OPTIONS = {"Sforce-Query-Options": f"batchSize={QUERY_PAGE_SIZE}"}


def _query_more(sf: Salesforce, *, link: str) -> Any:
    return sf.query_more(link, identifier_is_url=True, headers=_QUERY_OPTIONS)


# ---- the connector --------------------------------------------------------------------------


class SalesforceConnector:
    """CrmConnector over one Salesforce object (Contact, Lead, MessagingEndUser, ...)."""

    read_ahead = True
    page_size = QUERY_PAGE_SIZE
    ids_per_read = IDS_PER_QUERY

    def __init__(
        self,
        settings: SalesforceConfig,
        mapping: MappingConfig,
        auth: Authenticator,
        *,
        policy: RetryPolicy | None = None,
        session: requests.Session | None = None,
        bulk_timeout: float = 3600.0,
        bulk_page_size: int = 50_000,
    ) -> None:
        if not mapping.object:
            raise ConfigError(
                ["mapping.object: required for crm.kind = 'salesforce' (for example 'Contact')"]
            )
        self._settings = settings
        self._mapping = mapping
        self._auth = auth
        self._object = api_name(mapping.object, "mapping.object")
        self._mapped = mapping.fields.mapped()  # logical -> CRM field name
        self._phone_fields = tuple(
            api_name(f, "mapping.phone_fields") for f in mapping.phone_fields
        )
        self._fields = select_fields(self._phone_fields, self._mapped.values())
        self._picklist_values = (mapping.values.opted_in, mapping.values.opted_out)
        self._values = SalesforceValues(self._object, self._mapped, self._picklist_values)
        self._policy = policy or RetryPolicy()
        self._api = SalesforceClient(settings, auth, self._policy, session, self._object)
        self._call = self._api.call
        self._described: dict[str, FieldDescription] | None = None
        self._total: int | None = None  # issue 17: the current read's totalSize
        self._bulk = Bulk2(
            self._call, self._policy.sleep, timeout=bulk_timeout, page_size=bulk_page_size
        )
        self._writer = SalesforceWriter(
            self._object,
            self._mapped,
            self._values,
            self._describe,
            self._call,
            self._policy,
            self._bulk,
        )

    @classmethod
    def from_config(
        cls,
        config: LoadedConfig,
        *,
        policy: RetryPolicy | None = None,
        session: requests.Session | None = None,
    ) -> SalesforceConnector:
        """Checks the configuration and secrets; logs in lazily, on the first request."""
        settings = config.settings
        return cls(
            settings.salesforce,
            settings.mapping,
            authenticator(settings.salesforce, config.secrets),
            policy=policy,
            session=session,
        )

    # ---- metadata ---------------------------------------------------------------------------

    def _describe(self) -> dict[str, FieldDescription]:
        if self._described is None:
            try:
                answer: Mapping[str, Any] = self._call(
                    lambda sf: rest(sf, f"sobjects/{self._object}/describe"),
                    f"describe {self._object}",
                )
            except ConfigError:
                raise ConfigError(
                    [
                        f"mapping.object: Salesforce has no object {self._object!r} "
                        "that this user can see (check the API name, such as "
                        "'Contact', 'Lead' or 'MessagingEndUser')"
                    ]
                ) from None
            described: dict[str, FieldDescription] = {}
            for item in answer.get("fields", []):
                described[item["name"]] = FieldDescription(
                    name=item["name"],
                    type=item.get("type", ""),
                    updateable=bool(item.get("updateable", False)),
                    length=item.get("length") or None,
                    options=tuple(
                        p["value"]
                        for p in item.get("picklistValues") or []
                        if p.get("active", True)
                    ),
                )
            self._described = described
        return self._described

    def describe_fields(self) -> Mapping[str, FieldDescription]:
        return dict(self._describe())

    def mapping_verdicts(self) -> list[Verdict]:
        """The shared checker over one describe call. Salesforce has no check of its own:
        a picklist opt-in's values are checked there, against `options`."""
        opted_in, opted_out = self._picklist_values
        mapping = MappingUnderCheck(
            SALESFORCE,
            f"object {self._object}",
            self._mapped,
            self._phone_fields,
            opted_in,
            opted_out,
        )
        return check_mapping(mapping, self._describe())

    def preflight(self) -> None:
        """One describe call; a ConfigError names every problem of the mapping at once."""
        require_fit(self.mapping_verdicts(), source=f"Salesforce object {self._object}")

    # ---- reads ------------------------------------------------------------------------------

    def _pages(self, soql: str) -> Generator[Mapping[str, Any], None, None]:
        """Query pages, following nextRecordsUrl; stops if a link repeats (cannot spin).

        This is simple-salesforce's `query_all_iter` loop with each page fetched under the
        retry policy: a 503 on page 7 repeats page 7, not the whole read.
        """
        page: Mapping[str, Any] = self._call(
            lambda sf: sf.query(soql, headers=_QUERY_OPTIONS), "query"
        )
        yield page
        seen: set[str] = set()
        while not page.get("done", True):
            link = str(page.get("nextRecordsUrl") or "")
            if not link or link in seen:
                raise ConnectionFailed(
                    f"Salesforce query on {self._object}: the next-page link "
                    f"{link!r} is missing or repeated; stopped instead of "
                    "looping"
                )
            seen.add(link)
            page = self._call(partial(_query_more, link=link), "query page")
            yield page

    def _read(self, soql: str, bulk_soql: str) -> Iterator[CrmRecord]:
        pages = self._pages(soql)
        first = next(pages)
        self._total = int(first.get("totalSize", 0))
        if (
            not first.get("done", True)
            and int(first.get("totalSize", 0)) > self._settings.bulk_query_threshold
        ):
            # The first page told the size (no separate COUNT() call): leave its cursor
            # and let one Bulk API 2.0 job carry the rest.
            pages.close()
            types = {name: d.type for name, d in self._describe().items()}
            for row in self._bulk.query(bulk_soql):
                yield self._record(row, types)
            return
        for page in chain([first], pages):
            for raw in page.get("records", []):
                yield self._record(raw, None)

    def read_all(self) -> Iterator[CrmRecord]:
        return self._read(
            select_all(self._object, self._fields), select_all(self._object, self._fields)
        )

    def read_changed_since(self, since: datetime, cursor: str | None = None) -> Iterator[CrmRecord]:
        """By SystemModstamp >= since; Salesforce keeps no cursor for us."""
        return self._read(
            select_changed_since(self._object, self._fields, since),
            select_changed_since_unordered(self._object, self._fields, since),
        )

    def total_hint(self) -> int | None:
        return self._total

    def next_cursor(self) -> str | None:
        return None

    def read_by_ids(self, record_ids: Sequence[str]) -> Iterator[CrmRecord]:
        # A string that cannot be an id is simply absent: Salesforce would refuse the whole
        # query over one malformed id literal (INVALID_QUERY_FILTER_OPERATOR).
        wanted = [i for i in dict.fromkeys(record_ids) if is_record_id(i)]
        for soql in select_by_ids(self._object, self._fields, wanted, most=IDS_PER_QUERY):
            yield from self._records_of(soql)

    def find_by_keys(self, keys: Sequence[str]) -> Iterator[CrmRecord]:
        """Candidates by a LIKE on the phone fields (the number's last digits, any
        formatting between them) or by the mapped user-id field; one query per ~100 numbers."""
        patterns = list(dict.fromkeys(like_pattern(d) for d in map(search_digits, keys) if d))
        user_id_field = self._mapped.get(domain.WHATSAPP_USER_ID)
        user_ids = (
            [k.removeprefix(USER_ID_PREFIX) for k in keys if k.startswith(USER_ID_PREFIX)]
            if user_id_field
            else []
        )
        if not patterns and not user_ids:
            return
        for soql in select_by_numbers(
            self._object, self._fields, self._phone_fields, patterns, user_id_field, user_ids
        ):
            yield from self._records_of(soql)

    def _records_of(self, soql: str) -> Iterator[CrmRecord]:
        for page in self._pages(soql):
            for raw in page.get("records", []):
                yield self._record(raw, None)

    def _record(self, raw: Mapping[str, Any], csv_types: Mapping[str, str] | None) -> CrmRecord:
        """A query row (JSON, or Bulk CSV strings when `csv_types` is given) as a CrmRecord."""
        fields = {
            logical: self._values.read(
                logical, raw.get(name), csv_types.get(name) if csv_types else None
            )
            for logical, name in self._mapped.items()
        }
        phones = {
            name: (str(raw[name]) if raw.get(name) not in (None, "") else None)
            for name in self._phone_fields
        }
        return CrmRecord(
            record_id=str(raw["Id"]),
            fields=fields,
            phones=phones,
            modified_at=parse_datetime(raw.get("SystemModstamp")),
        )

    # ---- writes (the paths themselves are in salesforce_writing) ---------------------------

    def batch_size(self, backlog: int) -> int:
        """200 (one Collections call) normally; from `bulk_write_threshold` waiting writes on,
        up to BULK_CHUNK at once, so `write` takes the Bulk API 2.0 path."""
        if backlog >= self._settings.bulk_write_threshold:
            return max(COLLECTION_LIMIT, min(backlog, BULK_CHUNK))
        return COLLECTION_LIMIT

    def write(self, writes: Sequence[WriteRequest]) -> list[WriteResult]:
        """From `bulk_write_threshold` writes on, Bulk API 2.0 update jobs; below it, sObject
        Collections in calls of 200. One result per write, in order."""
        if len(writes) >= self._settings.bulk_write_threshold:
            return self._writer.write_bulk(writes)
        return self._writer.write_collections(writes)

    # ---- the rest ---------------------------------------------------------------------------

    def usage(self) -> Mapping[str, int | str | None]:
        return self._api.usage()

    def close(self) -> None:
        self._api.close()


__all__ = ["SalesforceConnector"]
