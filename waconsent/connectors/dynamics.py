"""Dynamics 365 / Dataverse connector over the Web API (v9.2): msal + requests.

Reads page through the entity set at the largest page size (`Prefer:
odata.maxpagesize=5000`), following `@odata.nextLink` exactly as given and
stopping if a link repeats. Incremental reads filter `modifiedon ge <since>`, or,
with `dynamics.change_tracking`, follow the delta link of the last full read.
Writes are `PATCH entityset(id)` with `If-Match: *` (so a missing record is never
created), up to 1,000 to a `$batch`, one change set per record and
`Prefer: odata.continue-on-error`, so one bad record fails alone. Several batches
go out in parallel, bounded by `dynamics.max_concurrency` (`connectors.dynamics_writing`).

Every request goes through the shared RetryPolicy: 429 waits exactly its
`Retry-After`, 503 and connection errors back off; a 401 renews the token once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import requests

from waconsent import domain, logs
from waconsent.config.check import Verdict, require_fit
from waconsent.connectors import dynamics_batch as batch
from waconsent.connectors import dynamics_odata as odata
from waconsent.connectors.dynamics_auth import (
    TokenProvider,
    token_provider,
    warn_unless_dynamics_host,
)
from waconsent.connectors.dynamics_client import (
    TIMEOUT,
    DataverseClient,
    error_of,
    new_session,
    raise_for,
)
from waconsent.connectors.dynamics_metadata import DataverseMetadata, Entity, MappedTable, described
from waconsent.connectors.dynamics_values import DataverseValues
from waconsent.connectors.dynamics_writing import DataverseWriter
from waconsent.connectors.http import RetryPolicy
from waconsent.domain import CrmRecord, FieldDescription, FieldValue, WriteRequest, WriteResult
from waconsent.errors import ConfigError, ConnectionFailed
from waconsent.phones import USER_ID_PREFIX, search_digits

if TYPE_CHECKING:
    from waconsent.config import LoadedConfig
    from waconsent.config.schema import DynamicsConfig, MappingConfig

log = logging.getLogger(__name__)

MAX_PAGE_SIZE = 5000  # Dataverse's ceiling for odata.maxpagesize
ID_CHUNK = 200  # GUIDs per by-id query: ~10 KB of URL, well under Dataverse's limit
SEARCH_CHUNK = 60  # conditions per look-up by number (~4 KB of URL)


class _DeltaExpired(Exception):
    """The stored delta link is no longer accepted (expired token, or change tracking off)."""


class DynamicsConnector:
    """CrmConnector for one Dataverse entity set (usually `contacts`)."""

    read_ahead = True
    page_size = MAX_PAGE_SIZE
    ids_per_read = ID_CHUNK

    def __init__(
        self,
        settings: DynamicsConfig,
        mapping: MappingConfig,
        tokens: TokenProvider,
        *,
        policy: RetryPolicy | None = None,
        session: requests.Session | None = None,
        own_session: bool | None = None,
        timeout: float = TIMEOUT,
    ) -> None:
        if not settings.url or not mapping.object:
            raise ConfigError(
                ["dynamics.url and mapping.object are required for crm.kind = 'dynamics'"]
            )
        own_session = session is None if own_session is None else own_session
        self._org = settings.url.rstrip("/")
        self._base = f"{self._org}/api/data/v{settings.api_version}"
        self._set = odata.identifier(mapping.object, "mapping.object")
        self._fields = {
            logical: odata.identifier(name, f"mapping.fields.{logical}")
            for logical, name in mapping.fields.mapped().items()
        }
        self._phones = tuple(
            odata.identifier(name, "mapping.phone_fields") for name in mapping.phone_fields
        )
        values = mapping.values
        self._values = DataverseValues(self._fields, values.opted_in, values.opted_out)
        self._batch_size = max(1, min(batch.MAX_OPERATIONS, settings.batch_size))
        self._concurrency = max(1, settings.max_concurrency)
        self._change_tracking = settings.change_tracking
        #: the delta link of the last complete change-tracking read (`next_cursor`)
        self.delta_link: str | None = None
        self._total: int | None = None  # issue 17: the size of a one-page read
        self._client = DataverseClient(
            self._base,
            tokens,
            policy=policy or RetryPolicy(),
            session=session or new_session(self._concurrency),
            own_session=own_session,
            concurrency=self._concurrency,
            timeout=timeout,
        )
        #: records one `write` call carries: a $batch per worker, all workers busy
        self.write_batch_size = self._batch_size * self._concurrency
        self._meta = DataverseMetadata(
            MappedTable(
                self._org,
                self._base,
                self._set,
                self._fields,
                self._phones,
                values.opted_in,
                values.opted_out,
                self._change_tracking,
            ),
            lambda url: self._client.get_json(url, kind="metadata", table=self._set),
        )
        self._writer = DataverseWriter(
            self._base,
            self._set,
            self._client,
            self._values,
            self._meta.attributes,
            batch_size=self._batch_size,
            concurrency=self._concurrency,
        )

    # ---- construction ---------------------------------------------------------------------

    @classmethod
    def from_config(
        cls,
        config: LoadedConfig,
        *,
        policy: RetryPolicy | None = None,
        session: requests.Session | None = None,
    ) -> DynamicsConnector:
        """Checks the configuration and secrets; asks for a token lazily, on first use."""
        settings = config.settings
        dyn = settings.dynamics
        if dyn.url:
            warn_unless_dynamics_host(dyn.url)
        policy = policy or RetryPolicy()
        own_session = session is None
        session = session or new_session(dyn.max_concurrency)
        try:
            tokens = token_provider(dyn, config.secrets, session, policy)
            return cls(
                dyn,
                settings.mapping,
                tokens,
                policy=policy,
                session=session,
                own_session=own_session,
            )
        except ConfigError:
            if own_session:
                session.close()
            raise

    # ---- metadata -------------------------------------------------------------------------

    def mapping_verdicts(self) -> list[Verdict]:
        return self._meta.verdicts()

    def preflight(self) -> None:
        """Check mapped and phone attributes against EntityDefinitions; all problems at once."""
        verdicts = self.mapping_verdicts()
        require_fit(verdicts, source=f"Dataverse {self._org}, {self._meta.entity().where}")

    def describe_fields(self) -> Mapping[str, FieldDescription]:
        return described(self._meta.attributes())

    # ---- schema: `waconsent fields --apply` (connectors.dynamics_fields) -------------------

    def table_logical_name(self) -> str:
        """The mapped table's logical name (`contact`), as metadata URLs name it."""
        return self._meta.entity().logical_name

    def existing_columns(self) -> list[str]:
        """Every column the table has now, freshly read."""
        return list(self._meta.reload())

    def post_metadata(
        self, path: str, body: Mapping[str, Any], headers: Mapping[str, str]
    ) -> requests.Response:
        """One authenticated metadata POST under the shared policy; the caller reads the
        answer (a refusal is returned, not raised)."""
        return self._client.send(
            "POST",
            f"{self._base}/{path}",
            kind="metadata",
            body=json.dumps(body).encode(),
            headers={"Content-Type": "application/json; charset=utf-8", **headers},
        )

    # ---- reads ----------------------------------------------------------------------------

    def _select(self) -> str:
        entity = self._meta.entity()
        names = [entity.primary_id, "modifiedon", *self._phones, *self._fields.values()]
        if entity.primary_name:
            names.append(entity.primary_name)
        return odata.select(names)

    def _query_url(self, filter_: str | None = None) -> str:
        params = {"$select": self._select()}
        if filter_:
            params["$filter"] = filter_
        return f"{self._base}/{self._set}?" + odata.query_string(params)

    def _rows(
        self, url: str, *, track_changes: bool = False, delta: bool = False
    ) -> Iterator[dict[str, Any]]:
        """Rows of every page, following `@odata.nextLink` as given; cannot spin."""
        seen: set[str] = set()
        delta_link: str | None = None
        next_url: str | None = url
        prefer = odata.prefer(max_page_size=MAX_PAGE_SIZE, track_changes=track_changes)
        while next_url:
            if next_url in seen:
                raise ConnectionFailed(
                    f"Dataverse query on {self._set}: the next-page link "
                    "repeated; stopped instead of looping (a read that "
                    "ended short would look complete)"
                )
            seen.add(next_url)
            response = self._client.send("GET", next_url, kind="query", headers={"Prefer": prefer})
            if delta and len(seen) == 1 and response.status_code in (400, 404, 410):
                raise _DeltaExpired(
                    " ".join(error_of(response)).strip() or f"HTTP {response.status_code}"
                )
            if not response.ok:
                raise_for(response, "query", self._set)
            payload = response.json()
            next_url = payload.get("@odata.nextLink")
            if len(seen) == 1:  # issue 17: a read that fits one page tells its size
                self._total = None if next_url else len(payload.get("value", []))
            yield from payload.get("value", [])
            delta_link = payload.get("@odata.deltaLink") or delta_link
        if track_changes:
            # only a read that reached the last page may move the delta link
            self.delta_link = delta_link

    def _records(self, rows: Iterator[dict[str, Any]]) -> Iterator[CrmRecord]:
        entity = self._meta.entity()
        for row in rows:
            if "$deletedEntity" in str(row.get("@odata.context", "")) or "@odata.removed" in row:
                continue  # a delta read also lists deletions; the protocol has no use for them
            record_id = row.get(entity.primary_id)
            if not record_id:
                continue
            yield self._record(str(record_id), row, entity)

    def _record(self, record_id: str, row: Mapping[str, Any], entity: Entity) -> CrmRecord:
        fields: dict[str, FieldValue] = {}
        for logical, attribute in self._fields.items():
            fields[logical] = self._values.read(logical, row.get(attribute))
        modified = row.get("modifiedon")
        name = row.get(entity.primary_name) if entity.primary_name else None
        return CrmRecord(
            record_id=record_id,
            fields=fields,
            phones={
                phone: (str(row[phone]) if row.get(phone) is not None else None)
                for phone in self._phones
            },
            modified_at=odata.parse_datetime(modified) if isinstance(modified, str) else None,
            name=str(name) if name is not None else None,
        )

    def total_hint(self) -> int | None:
        """The size of a read that fitted one page, else None: `$count=true` would tell no
        more (Dataverse caps `@odata.count` at 5,000, our page size) and adds a count to
        every page's query, so it is not requested."""
        return self._total

    def next_cursor(self) -> str | None:
        """The delta link of the last complete tracked read (with change tracking on)."""
        return self.delta_link if self._change_tracking else None

    def read_all(self) -> Iterator[CrmRecord]:
        return self._records(self._rows(self._query_url(), track_changes=self._change_tracking))

    def read_changed_since(self, since: datetime, cursor: str | None = None) -> Iterator[CrmRecord]:
        """With change tracking and a delta link (`cursor`), the changes since it; else by
        `modifiedon ge since`."""
        if self._change_tracking and cursor:
            return self._delta_or_full(cursor)
        return self._records(self._rows(self._query_url(odata.modified_since(since))))

    def _delta_or_full(self, link: str) -> Iterator[CrmRecord]:
        try:
            yield from self._records(self._rows(link, track_changes=True, delta=True))
        except _DeltaExpired as exc:
            # change tracking starts over with a full read
            logs.event(
                log,
                "dataverse.delta_link_refused",
                logging.WARNING,
                reason=str(exc),
                table=self._set,
            )
            self.delta_link = None
            yield from self.read_all()

    def read_by_ids(self, record_ids: Sequence[str]) -> Iterator[CrmRecord]:
        wanted = list(dict.fromkeys(g for g in (odata.guid(r) for r in record_ids) if g))
        skipped = len(set(record_ids)) - len(wanted)
        if skipped:
            # no Dataverse record has an id that is not a GUID
            logs.event(log, "dataverse.ids_not_guids", count=skipped)
        key = self._meta.entity().primary_id
        for start in range(0, len(wanted), ID_CHUNK):
            chunk = wanted[start : start + ID_CHUNK]
            yield from self._records(self._rows(self._query_url(odata.ids_filter(key, chunk))))

    def find_by_keys(self, keys: Sequence[str]) -> Iterator[CrmRecord]:
        """Candidates by `contains` on the phone columns (the number's last digits, any
        formatting between them) or `eq` on the mapped user-id column."""
        digits = list(dict.fromkeys(d for d in map(search_digits, keys) if d))
        conditions = [odata.contains_in_order(phone, d) for d in digits for phone in self._phones]
        user_id_column = self._fields.get(domain.WHATSAPP_USER_ID)
        if user_id_column:
            conditions += [
                odata.eq(user_id_column, k.removeprefix(USER_ID_PREFIX))
                for k in keys
                if k.startswith(USER_ID_PREFIX)
            ]
        for start in range(0, len(conditions), SEARCH_CHUNK):
            where = " or ".join(conditions[start : start + SEARCH_CHUNK])
            yield from self._records(self._rows(self._query_url(where)))

    # ---- writes ---------------------------------------------------------------------------

    def batch_size(self, backlog: int) -> int:
        return self.write_batch_size

    def write(self, writes: Sequence[WriteRequest]) -> list[WriteResult]:
        """PATCH each record with only its changed attributes, in `$batch`es sent in
        parallel (at most max_concurrency); one result per write, in order."""
        return self._writer.write(writes)

    # ---- bookkeeping ----------------------------------------------------------------------

    def usage(self) -> Mapping[str, int | str | None]:
        return self._client.usage()

    def close(self) -> None:
        self._client.close()
