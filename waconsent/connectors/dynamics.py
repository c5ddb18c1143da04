"""Dynamics 365 / Dataverse connector over the Web API (v9.2): msal + requests.

Reads page through the entity set at the largest page size (`Prefer:
odata.maxpagesize=5000`), following `@odata.nextLink` exactly as given and
stopping if a link repeats. Incremental reads filter `modifiedon ge <since>`, or,
with `dynamics.change_tracking`, follow the delta link of the last full read.
Writes are `PATCH entityset(id)` with `If-Match: *` (so a missing record is never
created), up to 1,000 to a `$batch`, one change set per record and
`Prefer: odata.continue-on-error`, so one bad record fails alone. Several batches
go out in parallel, bounded by `dynamics.max_concurrency`.

Every request goes through the shared RetryPolicy: 429 waits exactly its
`Retry-After`, 503 and connection errors back off; a 401 renews the token once.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import requests
from requests.adapters import HTTPAdapter

from waconsent import domain
from waconsent.config.check import (
    DATAVERSE,
    MappingUnderCheck,
    Verdict,
    check_mapping,
    require_fit,
)
from waconsent.connectors import dynamics_batch as batch
from waconsent.connectors import dynamics_odata as odata
from waconsent.connectors.dynamics_auth import (
    TokenProvider,
    token_provider,
    warn_unless_dynamics_host,
)
from waconsent.connectors.http import Outcome, RetryPolicy, classify, retry_after_seconds
from waconsent.domain import CrmRecord, FieldDescription, FieldValue, WriteRequest, WriteResult
from waconsent.errors import (
    AuthenticationError,
    ConfigError,
    ConnectionFailed,
    PermanentRecordError,
    RateLimited,
    RetryableError,
)
from waconsent.phones import USER_ID_PREFIX, search_digits

if TYPE_CHECKING:
    from waconsent.config import LoadedConfig
    from waconsent.config.schema import DynamicsConfig, MappingConfig

log = logging.getLogger(__name__)

MAX_PAGE_SIZE = 5000  # Dataverse's ceiling for odata.maxpagesize
ID_CHUNK = 200  # GUIDs per by-id query: ~10 KB of URL, well under Dataverse's limit
SEARCH_CHUNK = 60  # conditions per look-up by number (~4 KB of URL)
TIMEOUT = 120.0  # seconds; Dataverse itself gives up on a request after 2 minutes

# entity set -> (logical name, primary id, primary name) for the common tables, so
# reads need no metadata call; any other entity set is looked up in EntityDefinitions.
KNOWN_ENTITIES: Mapping[str, tuple[str, str, str]] = {
    "contacts": ("contact", "contactid", "fullname"),
    "leads": ("lead", "leadid", "fullname"),
    "accounts": ("account", "accountid", "name"),
}

# per-operation answers inside a $batch that a later attempt may heal
_TRANSIENT_STATUSES = frozenset({401, 408, 423, 429, 500, 502, 503, 504})
_MISSING_STATUSES = frozenset({404, 412})  # 412: If-Match: * found no record

_DV_STRING_TYPES = frozenset({"String", "Memo"})


@dataclass(frozen=True)
class Attribute:
    """One attribute as EntityDefinitions describes it."""

    name: str
    type: str  # AttributeType: String, Memo, Boolean, Picklist, DateTime, ...
    updatable: bool = True
    max_length: int | None = None
    options: tuple[int, ...] = ()


@dataclass(frozen=True)
class Entity:
    logical_name: str
    entity_set: str
    primary_id: str
    primary_name: str | None = None
    change_tracking: bool | None = None


class _DeltaExpired(Exception):
    """The stored delta link is no longer accepted (expired token, or change tracking off)."""


def _int_value(value: str | int | None) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    text = value.strip()
    return int(text) if text.lstrip("-").isdigit() else None


class DynamicsConnector:
    """CrmConnector for one Dataverse entity set (usually `contacts`)."""

    read_ahead = True
    page_size = MAX_PAGE_SIZE
    ids_per_read = ID_CHUNK

    def __init__(self, settings: DynamicsConfig, mapping: MappingConfig, tokens: TokenProvider,
                 *, policy: RetryPolicy | None = None, session: requests.Session | None = None,
                 timeout: float = TIMEOUT) -> None:
        if not settings.url or not mapping.object:
            raise ConfigError(["dynamics.url and mapping.object are required for "
                               "crm.kind = 'dynamics'"])
        self._org = settings.url.rstrip("/")
        self._base = f"{self._org}/api/data/v{settings.api_version}"
        self._set = odata.identifier(mapping.object, "mapping.object")
        self._fields = {logical: odata.identifier(name, f"mapping.fields.{logical}")
                        for logical, name in mapping.fields.mapped().items()}
        self._phones = tuple(odata.identifier(name, "mapping.phone_fields")
                             for name in mapping.phone_fields)
        values = mapping.values
        self._opted_in_raw, self._opted_out_raw = values.opted_in, values.opted_out
        self._opted_in, self._opted_out = _int_value(values.opted_in), _int_value(values.opted_out)
        self._tokens = tokens
        self._policy = policy or RetryPolicy()
        self._batch_size = max(1, min(batch.MAX_OPERATIONS, settings.batch_size))
        self._concurrency = max(1, settings.max_concurrency)
        self._slots = threading.BoundedSemaphore(self._concurrency)
        self._change_tracking = settings.change_tracking
        #: the delta link of the last complete change-tracking read (`next_cursor`)
        self.delta_link: str | None = None
        self._own_session = session is None
        self._session = session or _new_session(self._concurrency)
        self._timeout = timeout
        #: records one `write` call carries: a $batch per worker, all workers busy
        self.write_batch_size = self._batch_size * self._concurrency
        self._entity: Entity | None = None
        known = KNOWN_ENTITIES.get(self._set)
        if known is not None:
            self._entity = Entity(known[0], self._set, known[1], known[2])
        self._attributes: dict[str, Attribute] | None = None
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._limits: dict[str, str] = {}

    # ---- construction ---------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: LoadedConfig, *, policy: RetryPolicy | None = None,
                    session: requests.Session | None = None) -> DynamicsConnector:
        """Checks the configuration and secrets; asks for a token lazily, on first use."""
        settings = config.settings
        dyn = settings.dynamics
        if dyn.url:
            warn_unless_dynamics_host(dyn.url)
        policy = policy or RetryPolicy()
        own_session = session is None
        session = session or _new_session(dyn.max_concurrency)
        try:
            tokens = token_provider(dyn, config.secrets, session, policy)
            connector = cls(dyn, settings.mapping, tokens, policy=policy, session=session)
        except ConfigError:
            if own_session:
                session.close()
            raise
        connector._own_session = own_session
        return connector

    # ---- HTTP -----------------------------------------------------------------------------

    def _send(self, method: str, url: str, *, kind: str, headers: Mapping[str, str] | None = None,
              body: bytes | None = None) -> requests.Response:
        """One Dataverse request under the shared policy; a 401 renews the token once."""
        if not url.startswith(self._base + "/"):
            # a nextLink or deltaLink must stay on the organization: the token goes with it
            raise ConnectionFailed(f"{kind}: refusing to follow a link outside {self._base}")
        renewed = False

        def attempt() -> requests.Response:
            nonlocal renewed
            while True:
                token = self._tokens.token()
                request_headers = {"Accept": "application/json", "OData-MaxVersion": "4.0",
                                   "OData-Version": "4.0", **(headers or {}),
                                   "Authorization": f"Bearer {token}"}
                with self._slots:
                    response = self._session.request(method, url, headers=request_headers,
                                                     data=body, timeout=self._timeout)
                self._note(kind, response)
                outcome = classify(response.status_code)
                if outcome is Outcome.RENEW_SESSION:
                    if renewed:
                        raise AuthenticationError(
                            f"Dataverse refused a freshly issued token ({kind}: HTTP 401); "
                            "check that the app registration has an application user in "
                            "this environment")
                    renewed = True
                    log.info("dataverse token refused; renewing it once", extra={"kind": kind})
                    self._tokens.renew(token)
                    continue
                if outcome is Outcome.RETRY:
                    code, _ = _error_of(response)
                    error = RateLimited if response.status_code == 429 else RetryableError
                    raise error(f"{kind}: HTTP {response.status_code} {code}".strip(),
                                status=response.status_code,
                                retry_after=retry_after_seconds(response.headers))
                return response

        return self._policy.run(attempt, f"Dataverse {kind}")

    def _note(self, kind: str, response: requests.Response) -> None:
        with self._lock:
            self._counts["api_calls"] += 1
            self._counts[kind] += 1
            if response.status_code == 429:
                self._counts["throttled"] += 1
            for header in ("x-ms-ratelimit-burst-remaining-xrm-requests",
                           "x-ms-ratelimit-time-remaining-xrm-requests"):
                if header in response.headers:
                    self._limits[header.removeprefix("x-ms-ratelimit-")] = response.headers[header]

    def _get_json(self, url: str, *, kind: str) -> dict[str, Any]:
        response = self._send("GET", url, kind=kind)
        if not response.ok:
            _raise_for(response, kind, self._set)
        payload: dict[str, Any] = response.json()
        return payload

    # ---- metadata -------------------------------------------------------------------------

    def _entity_info(self, *, refresh: bool = False) -> Entity:
        if self._entity is not None and not refresh:
            return self._entity
        url = f"{self._base}/EntityDefinitions?" + odata.query_string({
            "$select": "LogicalName,EntitySetName,PrimaryIdAttribute,PrimaryNameAttribute,"
                       "ChangeTrackingEnabled",
            "$filter": odata.eq("EntitySetName", self._set),
        })
        rows = self._get_json(url, kind="metadata").get("value", [])
        if not rows:
            raise ConfigError([f"mapping.object: Dataverse has no entity set {self._set!r} "
                               "(use the entity set name, the plural such as 'contacts')"],
                              source=f"Dataverse {self._org}")
        row = rows[0]
        self._entity = Entity(row["LogicalName"], row["EntitySetName"], row["PrimaryIdAttribute"],
                              row.get("PrimaryNameAttribute"), row.get("ChangeTrackingEnabled"))
        return self._entity

    def _load_attributes(self) -> dict[str, Attribute]:
        """Attribute metadata: 2 calls, plus 1 for a Choice opt-in (its option values)."""
        entity = self._entity_info()
        path = (f"{self._base}/EntityDefinitions"
                f"{odata.key_segment('LogicalName', entity.logical_name)}/Attributes")
        rows = self._get_json(path + "?" + odata.query_string(
            {"$select": "LogicalName,AttributeType,IsValidForUpdate"}), kind="metadata")
        found: dict[str, dict[str, Any]] = {
            row["LogicalName"]: {"name": row["LogicalName"], "type": row.get("AttributeType", ""),
                                 "updatable": bool(row.get("IsValidForUpdate", True))}
            for row in rows.get("value", [])}
        # MaxLength lives on the derived types; the base AttributeMetadata has no such property.
        for derived in ("StringAttributeMetadata", "MemoAttributeMetadata"):
            wanted = [n for n in self._fields.values()
                      if found.get(n, {}).get("type") == derived.removesuffix("AttributeMetadata")]
            if derived == "MemoAttributeMetadata" and not wanted:
                continue
            lengths = self._get_json(
                f"{path}/Microsoft.Dynamics.CRM.{derived}?"
                + odata.query_string({"$select": "LogicalName,MaxLength"}), kind="metadata")
            for row in lengths.get("value", []):
                if row["LogicalName"] in found:
                    found[row["LogicalName"]]["max_length"] = row.get("MaxLength")
        opt_in = self._fields.get(domain.OPT_IN)
        # Only a Choice opt-in is read and written (see FITTING_TYPES), so only its options
        # are worth a call; State and Status are refused without one.
        if opt_in and found.get(opt_in, {}).get("type") == "Picklist":
            choice = self._get_json(
                f"{path}{odata.key_segment('LogicalName', opt_in)}"
                "/Microsoft.Dynamics.CRM.PicklistAttributeMetadata?"
                + odata.query_string({"$select": "LogicalName",
                                      "$expand": "OptionSet($select=Options)"}),
                kind="metadata")
            options = (choice.get("OptionSet") or {}).get("Options") or []
            found[opt_in]["options"] = tuple(int(o["Value"]) for o in options)
        self._attributes = {name: Attribute(**values) for name, values in found.items()}
        return self._attributes

    def _metadata(self) -> dict[str, Attribute]:
        """Attribute metadata, loaded once (by preflight, or by the first write)."""
        return self._attributes if self._attributes is not None else self._load_attributes()

    def mapping_verdicts(self) -> list[Verdict]:
        """The shared checker over fresh metadata, then Dataverse's own check: change
        tracking must be on for the table when `dynamics.change_tracking` is set."""
        entity = self._entity_info(refresh=True)
        where = _where(entity)
        mapping = MappingUnderCheck(DATAVERSE, where, self._fields, self._phones,
                                    self._opted_in_raw, self._opted_out_raw)
        verdicts = check_mapping(mapping, _described(self._load_attributes()))
        if self._change_tracking:
            verdicts.append(_change_tracking_verdict(entity))
        return verdicts

    def preflight(self) -> None:
        """Check mapped and phone attributes against EntityDefinitions; all problems at once."""
        verdicts = self.mapping_verdicts()
        require_fit(verdicts, source=f"Dataverse {self._org}, {_where(self._entity_info())}")

    def describe_fields(self) -> Mapping[str, FieldDescription]:
        return _described(self._metadata())

    # ---- schema: `waconsent fields --apply` (connectors.dynamics_fields) -------------------

    def table_logical_name(self) -> str:
        """The mapped table's logical name (`contact`), as metadata URLs name it."""
        return self._entity_info().logical_name

    def existing_columns(self) -> list[str]:
        """Every column the table has now, freshly read."""
        return list(self._load_attributes())

    def post_metadata(self, path: str, body: Mapping[str, Any],
                      headers: Mapping[str, str]) -> requests.Response:
        """One authenticated metadata POST under the shared policy; the caller reads the
        answer (a refusal is returned, not raised)."""
        return self._send("POST", f"{self._base}/{path}", kind="metadata", body=json.dumps(
            body).encode(), headers={"Content-Type": "application/json; charset=utf-8",
                                     **headers})

    # ---- reads ----------------------------------------------------------------------------

    def _select(self) -> str:
        entity = self._entity_info()
        names = [entity.primary_id, "modifiedon", *self._phones, *self._fields.values()]
        if entity.primary_name:
            names.append(entity.primary_name)
        return odata.select(names)

    def _query_url(self, filter_: str | None = None) -> str:
        params = {"$select": self._select()}
        if filter_:
            params["$filter"] = filter_
        return f"{self._base}/{self._set}?" + odata.query_string(params)

    def _rows(self, url: str, *, track_changes: bool = False,
              delta: bool = False) -> Iterator[dict[str, Any]]:
        """Rows of every page, following `@odata.nextLink` as given; cannot spin."""
        seen: set[str] = set()
        delta_link: str | None = None
        next_url: str | None = url
        prefer = odata.prefer(max_page_size=MAX_PAGE_SIZE, track_changes=track_changes)
        while next_url:
            if next_url in seen:
                raise ConnectionFailed(f"Dataverse query on {self._set}: the next-page link "
                                       "repeated; stopped instead of looping (a read that "
                                       "ended short would look complete)")
            seen.add(next_url)
            response = self._send("GET", next_url, kind="query", headers={"Prefer": prefer})
            if delta and len(seen) == 1 and response.status_code in (400, 404, 410):
                raise _DeltaExpired(" ".join(_error_of(response)).strip()
                                    or f"HTTP {response.status_code}")
            if not response.ok:
                _raise_for(response, "query", self._set)
            payload = response.json()
            yield from payload.get("value", [])
            next_url = payload.get("@odata.nextLink")
            delta_link = payload.get("@odata.deltaLink") or delta_link
        if track_changes:
            # only a read that reached the last page may move the delta link
            self.delta_link = delta_link

    def _records(self, rows: Iterator[dict[str, Any]]) -> Iterator[CrmRecord]:
        entity = self._entity_info()
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
            fields[logical] = self._from_dataverse(logical, row.get(attribute))
        modified = row.get("modifiedon")
        name = row.get(entity.primary_name) if entity.primary_name else None
        return CrmRecord(
            record_id=record_id, fields=fields,
            phones={phone: (str(row[phone]) if row.get(phone) is not None else None)
                    for phone in self._phones},
            modified_at=odata.parse_datetime(modified) if isinstance(modified, str) else None,
            name=str(name) if name is not None else None)

    def _from_dataverse(self, logical: str, raw: Any) -> FieldValue:
        if raw is None:
            return None
        if logical == domain.OPT_IN and not isinstance(raw, bool) and isinstance(raw, int):
            if raw == self._opted_in:
                return True
            if self._opted_out is None or raw == self._opted_out:
                return False
            return None  # some other option: neither granted nor refused
        if logical in domain.BOOLEAN_FIELDS:
            return bool(raw)
        if logical in domain.DATETIME_FIELDS:
            return odata.parse_datetime(raw) if isinstance(raw, str) and raw else None
        return str(raw)

    def next_cursor(self) -> str | None:
        """The delta link of the last complete tracked read (with change tracking on)."""
        return self.delta_link if self._change_tracking else None

    def read_all(self) -> Iterator[CrmRecord]:
        return self._records(self._rows(self._query_url(), track_changes=self._change_tracking))

    def read_changed_since(self, since: datetime,
                           cursor: str | None = None) -> Iterator[CrmRecord]:
        """With change tracking and a delta link (`cursor`), the changes since it; else by
        `modifiedon ge since`."""
        if self._change_tracking and cursor:
            return self._delta_or_full(cursor)
        return self._records(self._rows(self._query_url(odata.modified_since(since))))

    def _delta_or_full(self, link: str) -> Iterator[CrmRecord]:
        try:
            yield from self._records(self._rows(link, track_changes=True, delta=True))
        except _DeltaExpired as exc:
            log.warning("dataverse did not accept the stored delta link (%s); change tracking "
                        "starts over with a full read of %s", exc, self._set)
            self.delta_link = None
            yield from self.read_all()

    def read_by_ids(self, record_ids: Sequence[str]) -> Iterator[CrmRecord]:
        wanted = list(dict.fromkeys(g for g in (odata.guid(r) for r in record_ids) if g))
        skipped = len(set(record_ids)) - len(wanted)
        if skipped:
            log.info("skipped record ids that are not GUIDs (no Dataverse record has them)",
                     extra={"count": skipped})
        key = self._entity_info().primary_id
        for start in range(0, len(wanted), ID_CHUNK):
            chunk = wanted[start:start + ID_CHUNK]
            yield from self._records(self._rows(self._query_url(odata.ids_filter(key, chunk))))

    def find_by_keys(self, keys: Sequence[str]) -> Iterator[CrmRecord]:
        """Candidates by `contains` on the phone columns (the number's last digits, any
        formatting between them) or `eq` on the mapped user-id column."""
        digits = list(dict.fromkeys(d for d in map(search_digits, keys) if d))
        conditions = [odata.contains_in_order(phone, d) for d in digits for phone in self._phones]
        user_id_column = self._fields.get(domain.WHATSAPP_USER_ID)
        if user_id_column:
            conditions += [odata.eq(user_id_column, k.removeprefix(USER_ID_PREFIX))
                           for k in keys if k.startswith(USER_ID_PREFIX)]
        for start in range(0, len(conditions), SEARCH_CHUNK):
            where = " or ".join(conditions[start:start + SEARCH_CHUNK])
            yield from self._records(self._rows(self._query_url(where)))

    # ---- writes ---------------------------------------------------------------------------

    def _payload(self, record_id: str, values: Mapping[str, FieldValue]) -> dict[str, Any]:
        attributes = self._metadata()
        body: dict[str, Any] = {}
        for logical, value in values.items():
            name = self._fields.get(logical)
            if name is None:
                raise PermanentRecordError(f"{logical} is not mapped to a Dataverse attribute",
                                           record_id=record_id, code="UNMAPPED_FIELD",
                                           fields=[logical])
            attribute = attributes.get(name)
            if attribute is None:
                raise PermanentRecordError(f"the entity has no attribute {name!r}",
                                           record_id=record_id, code="UNKNOWN_ATTRIBUTE",
                                           fields=[name])
            body[name] = self._to_dataverse(record_id, logical, attribute, value)
        return body

    def _to_dataverse(self, record_id: str, logical: str, attribute: Attribute,
                      value: FieldValue) -> Any:
        def refuse(reason: str, code: str = "INVALID_VALUE") -> PermanentRecordError:
            return PermanentRecordError(f"{attribute.name}: {reason}", record_id=record_id,
                                        code=code, fields=[attribute.name])

        if not attribute.updatable:
            raise refuse("the attribute cannot be updated", "NOT_UPDATABLE")
        if value is None:
            return None
        if attribute.type == "Picklist":
            if not isinstance(value, bool):
                raise refuse("expected true/false for the Choice opt-in, "
                             f"got {type(value).__name__}")
            option = self._opted_in if value else self._opted_out
            if option is None:
                raise refuse("no option value configured in [mapping.values] for "
                             f"{'opted_in' if value else 'opted_out'}", "NO_OPTION_VALUE")
            return option
        if attribute.type == "Boolean":
            if not isinstance(value, bool):
                raise refuse(f"expected a boolean, got {type(value).__name__}")
            return value
        if attribute.type == "DateTime":
            if not isinstance(value, datetime):
                raise refuse(f"expected a datetime, got {type(value).__name__}")
            return odata.format_datetime(value)
        if attribute.type in _DV_STRING_TYPES:
            text = odata.format_datetime(value) if isinstance(value, datetime) else str(value)
            if attribute.max_length is not None and len(text) > attribute.max_length:
                # never cut evidence short: report it and let an admin widen the column
                raise refuse(f"{len(text)} characters, the attribute holds at most "
                             f"{attribute.max_length}", "STRING_TOO_LONG")
            return text
        raise refuse(f"waconsent does not write {attribute.type} attributes", "UNSUPPORTED_TYPE")

    def batch_size(self, backlog: int) -> int:
        return self.write_batch_size

    def write(self, writes: Sequence[WriteRequest]) -> list[WriteResult]:
        """PATCH each record with only its changed attributes, in `$batch`es sent in
        parallel (at most max_concurrency); one result per write, in order."""
        results: list[WriteResult | None] = [None] * len(writes)
        pending: list[tuple[int, str, dict[str, Any]]] = []
        for index, write in enumerate(writes):
            record_id = odata.guid(write.record_id)
            if record_id is None:
                results[index] = WriteResult(write.record_id, False,
                                             "not a Dataverse record id (a GUID)", "INVALID_ID",
                                             permanent=True)
                continue
            try:
                body = self._payload(write.record_id, write.values)
            except PermanentRecordError as exc:
                results[index] = WriteResult(write.record_id, False, str(exc), exc.code,
                                             permanent=True)
                continue
            if not body:
                results[index] = WriteResult(write.record_id, True)
                continue
            pending.append((index, record_id, body))
        chunks = [pending[i:i + self._batch_size]
                  for i in range(0, len(pending), self._batch_size)]
        if len(chunks) <= 1:
            answered = [self._send_batch(chunk) for chunk in chunks]
        else:
            with ThreadPoolExecutor(max_workers=min(self._concurrency, len(chunks)),
                                    thread_name_prefix="dataverse-batch") as pool:
                answered = list(pool.map(self._send_batch, chunks))
        for chunk, chunk_results in zip(chunks, answered, strict=True):
            for (index, _, _), result in zip(chunk, chunk_results, strict=True):
                results[index] = WriteResult(writes[index].record_id, result.ok, result.error,
                                             result.code, result.permanent)
        return [r for r in results if r is not None]

    def _send_batch(self, chunk: Sequence[tuple[int, str, dict[str, Any]]]) -> list[WriteResult]:
        operations = [batch.Operation(str(n), "PATCH", f"{self._base}/{self._set}({record_id})",
                                      body, {"If-Match": "*"})
                      for n, (_, record_id, body) in enumerate(chunk, start=1)]
        content_type, payload = batch.build(operations)
        response = self._send("POST", f"{self._base}/$batch", kind="batch", body=payload,
                              headers={"Content-Type": content_type,
                                       "Prefer": odata.prefer(continue_on_error=True)})
        if not response.ok:
            code, message = _error_of(response)
            log.error("dataverse refused a whole $batch", extra={
                "status": response.status_code, "code": code, "operations": len(operations)})
            return [WriteResult(record_id, False, f"the $batch was refused: HTTP "
                                f"{response.status_code} {message}".strip(),
                                code or f"HTTP_{response.status_code}")
                    for _, record_id, _ in chunk]
        try:
            groups = batch.parse(response.headers.get("Content-Type", ""), response.text)
        except ValueError as exc:
            return [WriteResult(record_id, False, f"unreadable $batch answer: {exc}",
                                "BAD_BATCH_RESPONSE") for _, record_id, _ in chunk]
        answers = batch.match(operations, groups)
        return [_result(record_id, answers.get(operation.content_id))
                for operation, (_, record_id, _) in zip(operations, chunk, strict=True)]

    # ---- bookkeeping ----------------------------------------------------------------------

    def usage(self) -> Mapping[str, int | str | None]:
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


# ---- helpers --------------------------------------------------------------------------------

def _new_session(concurrency: int) -> requests.Session:
    session = requests.Session()
    session.mount("https://", HTTPAdapter(pool_connections=2, pool_maxsize=concurrency + 1))
    return session


def _error_of(response: requests.Response) -> tuple[str, str]:
    """Dataverse's `error.code` and `error.message`; empty strings when the body has none."""
    return batch.dataverse_error(response.text)


def _raise_for(response: requests.Response, kind: str, entity_set: str) -> None:
    status = response.status_code
    code, message = _error_of(response)
    said = f"HTTP {status} {code}: {message}".strip().rstrip(":")
    if status == 403:
        raise AuthenticationError(f"Dataverse refused the {kind} ({said}); the application user "
                                  f"needs a security role that can read and update "
                                  f"{entity_set}")
    if status in (400, 404):
        raise ConfigError([f"Dataverse refused the {kind} on {entity_set!r} ({said}); run "
                           "`waconsent check` to compare the mapping with the entity"])
    raise ConnectionFailed(f"Dataverse {kind} failed: {said}")


def _result(record_id: str, answer: batch.OperationResult | None) -> WriteResult:
    if answer is None:
        return WriteResult(record_id, False, "the $batch answer has no result for this record",
                           "NO_RESULT")
    if 200 <= answer.status < 300:
        return WriteResult(record_id, True)
    code, message = answer.error()
    if answer.status in _MISSING_STATUSES:
        return WriteResult(record_id, False, "no such record in Dataverse (deleted or merged?)",
                           code or "NOT_FOUND", permanent=True)
    transient = answer.status in _TRANSIENT_STATUSES
    return WriteResult(record_id, False, f"HTTP {answer.status} {message}".strip(),
                       code or f"HTTP_{answer.status}", permanent=not transient)


def _where(entity: Entity) -> str:
    """The table as messages name it."""
    return f"the {entity.logical_name} entity (entity set {entity.entity_set!r})"


def _change_tracking_verdict(entity: Entity) -> Verdict:
    """Delta links exist only for a table with 'Track changes' on; only a table whose
    metadata says it is off is refused (no answer is no refusal)."""
    problems = () if entity.change_tracking is not False else (
        f"change tracking is not enabled on {_where(entity)}; enable 'Track changes' on the "
        "table or set it to false",)
    return Verdict("dynamics.change_tracking", entity.logical_name, None, problems)


def _described(attributes: Mapping[str, Attribute]) -> dict[str, FieldDescription]:
    """Attributes as the mapping checker reads them: Dataverse's own type names, and a
    Choice's option values as the decimal strings [mapping.values] is compared with."""
    return {name: FieldDescription(name, a.type, a.updatable, a.max_length,
                                   tuple(str(o) for o in a.options))
            for name, a in attributes.items()}
