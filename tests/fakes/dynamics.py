"""A stateful fake of the Dataverse Web API (v9.2) and of its Entra ID token endpoint.

Records live in memory. Queries are answered the way Dataverse answers them:
`$filter` is parsed and evaluated (comparisons, `and`/`or`/`not`, parentheses,
`Microsoft.Dynamics.CRM.In(...)`, string literals with doubled quotes), `$select`
is checked against the attributes, pages follow `Prefer: odata.maxpagesize`
(capped at 5,000) with an opaque `$skiptoken` in `@odata.nextLink`, and
`Prefer: odata.track-changes` ends a read with an `@odata.deltaLink`. `$batch`
bodies are parsed with the standard library's MIME parser (not the connector's
code) and answered per operation with real multipart/mixed responses. Writes bump
`modifiedon` at second precision. Service protection (429 with Retry-After), 503,
expired tokens (401) and If-Match on a missing record (412) can be staged.

Routes are registered on a `responses.RequestsMock`; unmatched URLs (for example
login.microsoftonline.com) raise ConnectionError, so a test sees any stray call.
"""

from __future__ import annotations

import email
import email.policy
import json
import re
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import responses

ORG_URL = "https://acme.crm4.dynamics.com"
AUTHORITY_HOST = "https://login.fake-sovereign.test"
TENANT_ID = "11111111-2222-3333-4444-555555555555"
CLIENT_ID = "66666666-7777-8888-9999-000000000000"
CLIENT_SECRET = "s3cr3t~value-never-logged"

OPTED_IN, OPTED_OUT, NOT_SET = 100_000_000, 100_000_001, 100_000_002

Response = tuple[int, dict[str, str], str]


@dataclass(frozen=True)
class FakeAttribute:
    name: str
    type: str  # AttributeType
    updatable: bool = True
    max_length: int | None = None
    options: tuple[tuple[int, str], ...] = ()
    #: the derived metadata type when it is not `<AttributeType>AttributeMetadata`: a
    #: multi-select Choice is AttributeType Virtual, MultiSelectPicklistAttributeMetadata
    metadata_type: str | None = None

    @property
    def metadata(self) -> str:
        return f"{self.metadata_type or self.type}AttributeMetadata"


def contact_attributes(*, opt_in_choice: bool = False) -> dict[str, FakeAttribute]:
    """The contact entity with the dynamics preset's custom attributes."""
    opt_in = (
        FakeAttribute(
            "new_whatsappoptin",
            "Picklist",
            options=((OPTED_IN, "Opted in"), (OPTED_OUT, "Opted out"), (NOT_SET, "Not set")),
        )
        if opt_in_choice
        else FakeAttribute("new_whatsappoptin", "Boolean")
    )
    attributes = [
        FakeAttribute("contactid", "Uniqueidentifier", updatable=False),
        FakeAttribute("fullname", "String", updatable=False, max_length=160),
        FakeAttribute("firstname", "String", max_length=50),
        FakeAttribute("modifiedon", "DateTime", updatable=False),
        FakeAttribute("mobilephone", "String", max_length=50),
        FakeAttribute("telephone1", "String", max_length=50),
        FakeAttribute("emailaddress1", "String", max_length=100),
        FakeAttribute("description", "Memo", max_length=2000),
        opt_in,
        FakeAttribute("new_whatsappoptindate", "DateTime"),
        FakeAttribute("new_whatsappoptinip", "String", max_length=45),
        FakeAttribute("new_whatsappoptinsource", "String", max_length=200),
        FakeAttribute("new_whatsappoptoutdate", "DateTime"),
        FakeAttribute("new_whatsapplastinbound", "DateTime"),
        FakeAttribute("new_whatsappsessionexpires", "DateTime"),
        FakeAttribute("new_whatsappproofmissing", "Boolean"),
        FakeAttribute("new_whatsappuserid", "String", max_length=100),
    ]
    return {a.name: a for a in attributes}


# ---- $filter: tokenizer, parser, evaluator ----------------------------------------------------


class FilterError(ValueError):
    pass


_TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<string>'(?:[^']|'')*')
  | (?P<datetime>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:\d{2}))
  | (?P<guid>[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})
  | (?P<number>-?\d+)
  | (?P<name>[A-Za-z_][A-Za-z0-9_.]*)
  | (?P<punct>[(),\[\]=])
""",
    re.VERBOSE,
)

_OPERATORS = {"eq", "ne", "gt", "ge", "lt", "le"}


@dataclass(frozen=True)
class Token:
    kind: str
    text: str


def tokenize(text: str) -> list[Token]:
    tokens, position = [], 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            snippet = text[position : position + 10]
            raise FilterError(f"syntax error at position {position}: {snippet!r}")
        position = match.end()
        kind = match.lastgroup or ""
        if kind != "ws":
            tokens.append(Token(kind, match.group()))
    return tokens


def literal_value(token: Token) -> Any:
    if token.kind == "string":
        return token.text[1:-1].replace("''", "'")
    if token.kind == "datetime":
        return datetime.fromisoformat(token.text.replace("Z", "+00:00")).astimezone(UTC)
    if token.kind == "guid":
        return token.text.lower()
    if token.kind == "number":
        return int(token.text)
    if token.kind == "name" and token.text in ("true", "false"):
        return token.text == "true"
    if token.kind == "name" and token.text == "null":
        return None
    raise FilterError(f"expected a literal, got {token.text!r}")


Predicate = Callable[[Mapping[str, Any]], bool]


@dataclass
class Comparison:
    """One parsed `name op literal`, kept so tests can see what the server understood."""

    attribute: str
    operator: str
    value: Any


class FilterParser:
    def __init__(self, text: str) -> None:
        self.tokens = tokenize(text)
        self.position = 0
        self.comparisons: list[Comparison] = []

    def parse(self) -> Predicate:
        predicate = self._or()
        if self.position != len(self.tokens):
            raise FilterError(f"unexpected {self.tokens[self.position].text!r}")
        return predicate

    def _peek(self) -> Token | None:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def _take(self, text: str | None = None) -> Token:
        token = self._peek()
        if token is None or (text is not None and token.text != text):
            raise FilterError(f"expected {text or 'more'}, got {token.text if token else 'end'}")
        self.position += 1
        return token

    def _or(self) -> Predicate:
        parts = [self._and()]
        while (token := self._peek()) is not None and token.text == "or":
            self._take()
            parts.append(self._and())
        return parts[0] if len(parts) == 1 else (lambda r: any(p(r) for p in parts))

    def _and(self) -> Predicate:
        parts = [self._unary()]
        while (token := self._peek()) is not None and token.text == "and":
            self._take()
            parts.append(self._unary())
        return parts[0] if len(parts) == 1 else (lambda r: all(p(r) for p in parts))

    def _unary(self) -> Predicate:
        token = self._peek()
        if token is not None and token.text == "not":
            self._take()
            inner = self._unary()
            return lambda r: not inner(r)
        if token is not None and token.text == "(":
            self._take("(")
            inner = self._or()
            self._take(")")
            return inner
        return self._primary()

    def _primary(self) -> Predicate:
        name = self._take()
        if name.kind != "name":
            raise FilterError(f"expected a property name, got {name.text!r}")
        if name.text == "Microsoft.Dynamics.CRM.In":
            return self._in()
        if name.text in _STRING_FUNCTIONS:
            return self._string_function(name.text)
        operator = self._take()
        if operator.text not in _OPERATORS:
            raise FilterError(f"expected a comparison operator, got {operator.text!r}")
        value = literal_value(self._take())
        self.comparisons.append(Comparison(name.text, operator.text, value))
        attribute = name.text
        return lambda r: _compare(r.get(attribute), operator.text, value)

    def _in(self) -> Predicate:
        self._take("(")
        arguments: dict[str, Any] = {}
        while True:
            key = self._take().text
            self._take("=")
            if self._peek() is not None and self._peek().text == "[":  # type: ignore[union-attr]
                self._take("[")
                values = []
                while self._peek() is not None and self._peek().text != "]":  # type: ignore[union-attr]
                    values.append(literal_value(self._take()))
                    if self._peek() is not None and self._peek().text == ",":  # type: ignore[union-attr]
                        self._take(",")
                self._take("]")
                arguments[key] = values
            else:
                arguments[key] = literal_value(self._take())
            if self._peek() is not None and self._peek().text == ",":  # type: ignore[union-attr]
                self._take(",")
                continue
            break
        self._take(")")
        attribute = str(arguments.get("PropertyName"))
        wanted = {str(v).lower() for v in arguments.get("PropertyValues", [])}
        for value in wanted:
            self.comparisons.append(Comparison(str(attribute), "in", value))
        return lambda r: str(r.get(attribute)).lower() in wanted

    def _string_function(self, function: str) -> Predicate:
        """contains / startswith / endswith, with Dataverse's wildcard characters inside
        the value (`%`, `_`, `[...]`, `[^...]`, as in SQL LIKE), case-insensitive."""
        self._take("(")
        attribute = self._take().text
        self._take(",")
        value = literal_value(self._take())
        self._take(")")
        if not isinstance(value, str):
            raise FilterError(f"{function} expects a string literal")
        self.comparisons.append(Comparison(attribute, function, value))
        lead, tail = _STRING_FUNCTIONS[function]
        pattern = re.compile(lead + _like_regex(value) + tail, re.IGNORECASE | re.DOTALL)
        return lambda r: isinstance(r.get(attribute), str) and bool(pattern.fullmatch(r[attribute]))


_STRING_FUNCTIONS = {"contains": (".*", ".*"), "startswith": ("", ".*"), "endswith": (".*", "")}


def _like_regex(value: str) -> str:
    parts, position = [], 0
    while position < len(value):
        char = value[position]
        if char == "%":
            parts.append(".*")
        elif char == "_":
            parts.append(".")
        elif char == "[" and "]" in value[position + 1 :]:
            end = value.index("]", position + 1)
            inner = value[position + 1 : end]
            negate = inner.startswith("^")
            body = re.escape(inner[1:] if negate else inner).replace("\\-", "-")
            parts.append(f"[{'^' if negate else ''}{body}]")
            position = end
        else:
            parts.append(re.escape(char))
        position += 1
    return "".join(parts)


def _compare(left: Any, operator: str, right: Any) -> bool:
    if isinstance(left, str) and isinstance(right, str):
        left, right = left.lower(), right.lower()  # Dataverse's collation is case-insensitive
    if operator == "eq":
        return bool(left == right)
    if operator == "ne":
        return bool(left != right)
    if left is None or right is None:
        return False
    return bool(
        {"gt": left > right, "ge": left >= right, "lt": left < right, "le": left <= right}[operator]
    )


def parse_filter(text: str) -> tuple[Predicate, list[Comparison]]:
    parser = FilterParser(text)
    return parser.parse(), parser.comparisons


# ---- the fake service ------------------------------------------------------------------------


def _error(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> Response:
    return (
        status,
        {"Content-Type": "application/json; odata.metadata=minimal", **(headers or {})},
        json.dumps({"error": {"code": code, "message": message}}),
    )


def _json(payload: Any, headers: Mapping[str, str] | None = None) -> Response:
    return (
        200,
        {
            "Content-Type": "application/json; odata.metadata=minimal",
            "OData-Version": "4.0",
            **(headers or {}),
        },
        json.dumps(payload),
    )


def _render(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return value


_REASONS = {
    200: "OK",
    204: "No Content",
    400: "Bad Request",
    404: "Not Found",
    412: "Precondition Failed",
    429: "Too Many Requests",
    500: "Internal Server Error",
}


_CREATABLE = {  # @odata.type -> (AttributeType, AttributeTypeName)
    "Microsoft.Dynamics.CRM.BooleanAttributeMetadata": ("Boolean", "BooleanType"),
    "Microsoft.Dynamics.CRM.PicklistAttributeMetadata": ("Picklist", "PicklistType"),
    "Microsoft.Dynamics.CRM.DateTimeAttributeMetadata": ("DateTime", "DateTimeType"),
    "Microsoft.Dynamics.CRM.StringAttributeMetadata": ("String", "StringType"),
}


@dataclass
class Staged:
    """A canned failure served before the next request(s) are processed."""

    status: int
    retry_after: str | None = None


@dataclass
class FakeDataverse:
    org_url: str = ORG_URL
    api_version: str = "9.2"
    authority_host: str = AUTHORITY_HOST
    tenant_id: str = TENANT_ID
    client_id: str = CLIENT_ID
    client_secret: str = CLIENT_SECRET
    opt_in_choice: bool = False
    change_tracking_enabled: bool = True
    missing_status: int = 412  # what a PATCH with If-Match: * on a missing id answers
    clock: Callable[[], datetime] = field(default=lambda: datetime(2026, 3, 1, 12, 0, tzinfo=UTC))
    batch_delay: float = 0.0  # seconds a $batch takes (only to observe concurrency)

    def __post_init__(self) -> None:
        self.base = f"{self.org_url}/api/data/v{self.api_version}"
        self.attributes = contact_attributes(opt_in_choice=self.opt_in_choice)
        self.records: dict[str, dict[str, Any]] = {}
        self.versions: dict[str, int] = {}
        self.deleted: dict[str, int] = {}
        self.version = 0
        self.min_delta_version = 0  # delta tokens older than this are expired
        self.calls: Counter[str] = Counter()
        self.requests: list[tuple[str, str]] = []  # (kind, url) of every data request
        self.filters: list[list[Comparison]] = []
        self.batch_sizes: list[int] = []
        self.batch_prefer: list[str] = []
        self.patched: list[dict[str, Any]] = []  # bodies of the PATCH operations, in order
        self.staged: deque[Staged] = deque()
        self.valid_tokens: set[str] = set()
        self.token_error: dict[str, Any] | None = None
        self.token_forms: list[dict[str, str]] = []
        self.rejects: dict[str, tuple[int, str, str]] = {}
        self.next_links: list[str] = []  # every @odata.nextLink handed out, in order
        self.accept_new_tokens = True  # False: issued tokens are refused by the API
        #: (SchemaName, MSCRM.SolutionUniqueName header or None) of every column created
        self.created_columns: list[tuple[str, str | None]] = []
        self.column_bodies: list[dict[str, Any]] = []  # every attribute create body received
        self._lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0

    # ---- data ----------------------------------------------------------------------------

    def add_contact(
        self, *, modified: datetime | None = None, record_id: str | None = None, **attributes: Any
    ) -> str:
        record_id = record_id or str(uuid.uuid4())
        for name in attributes:
            if name not in self.attributes:
                raise KeyError(name)
        self.version += 1
        self.records[record_id] = {
            "contactid": record_id,
            "modifiedon": (modified or self.clock()).replace(microsecond=0),
            **attributes,
        }
        self.versions[record_id] = self.version
        return record_id

    def add_contacts(
        self, count: int, *, modified: datetime | None = None, **attributes: Any
    ) -> list[str]:
        """`count` contacts with numbered ids (sortable), sharing `attributes`."""
        ids = []
        for n in range(count):
            record_id = str(uuid.UUID(int=n + 1))
            ids.append(
                self.add_contact(
                    record_id=record_id,
                    modified=modified,
                    mobilephone=f"+4915100{n:06d}",
                    fullname=f"Contact {n}",
                    **attributes,
                )
            )
        return ids

    def touch(self, record_id: str, when: datetime, **attributes: Any) -> None:
        """Someone edits a record in the CRM at `when`."""
        self.version += 1
        self.records[record_id].update(attributes)
        self.records[record_id]["modifiedon"] = when.replace(microsecond=0)
        self.versions[record_id] = self.version

    def delete(self, record_id: str) -> None:
        self.version += 1
        del self.records[record_id]
        self.deleted[record_id] = self.version

    def stage(self, *failures: Staged) -> None:
        self.staged.extend(failures)

    def throttle(self, *retry_after: int | str) -> None:
        """The next requests answer 429 with these Retry-After values, one each."""
        self.stage(*(Staged(429, str(value)) for value in retry_after))

    def expire_tokens(self) -> None:
        self.valid_tokens.clear()

    # ---- wiring -----------------------------------------------------------------------------

    def install(self, mock: responses.RequestsMock) -> FakeDataverse:
        base = re.escape(self.base)
        authority = re.escape(self.authority_host.rstrip("/"))
        mock.add_callback(
            responses.GET,
            re.compile(authority + r"/[^/]+/v2\.0/\.well-known/openid-configuration"),
            callback=self._openid_configuration,
        )
        mock.add_callback(
            responses.POST,
            re.compile(authority + r"/[^/]+/oauth2/v2\.0/token"),
            callback=self._token,
        )
        mock.add_callback(
            responses.GET,
            re.compile(base + r"/EntityDefinitions.*"),
            callback=self._guarded("metadata", self._metadata),
        )
        mock.add_callback(
            responses.POST,
            re.compile(base + r"/EntityDefinitions\(LogicalName='[^']*'\)/Attributes$"),
            callback=self._guarded("metadata", self._create_attribute),
        )
        mock.add_callback(
            responses.GET,
            re.compile(base + r"/contacts(\?.*)?$"),
            callback=self._guarded("query", self._query),
        )
        mock.add_callback(
            responses.POST,
            re.compile(base + r"/\$batch$"),
            callback=self._guarded("batch", self._batch),
        )
        return self

    def token_for_tests(self) -> str:
        token = f"static-{uuid.uuid4()}"
        self.valid_tokens.add(token)
        return token

    # ---- identity ---------------------------------------------------------------------------

    def _openid_configuration(self, request: Any) -> Response:
        self.calls["openid"] += 1
        tenant = urlsplit(request.url).path.split("/")[1]
        root = f"{self.authority_host.rstrip('/')}/{tenant}"
        return _json(
            {
                "token_endpoint": f"{root}/oauth2/v2.0/token",
                "authorization_endpoint": f"{root}/oauth2/v2.0/authorize",
                "issuer": f"{root}/v2.0",
                "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt"],
            }
        )

    def _token(self, request: Any) -> Response:
        self.calls["token"] += 1
        form = dict(
            parse_qsl(request.body if isinstance(request.body, str) else request.body.decode())
        )
        self.token_forms.append(form)
        correlation = str(uuid.uuid4())
        if self.token_error is not None:
            return (
                401,
                {"Content-Type": "application/json"},
                json.dumps({**self.token_error, "correlation_id": correlation}),
            )
        if (
            form.get("grant_type") != "client_credentials"
            or form.get("client_id") != self.client_id
        ):
            return (
                400,
                {"Content-Type": "application/json"},
                json.dumps(
                    {
                        "error": "unauthorized_client",
                        "error_description": "AADSTS700016: unknown app",
                        "correlation_id": correlation,
                    }
                ),
            )
        if form.get("scope") != f"{self.org_url}/.default":
            return (
                400,
                {"Content-Type": "application/json"},
                json.dumps(
                    {
                        "error": "invalid_scope",
                        "error_description": f"AADSTS70011: {form.get('scope')}",
                        "correlation_id": correlation,
                    }
                ),
            )
        secret_ok = form.get("client_secret") == self.client_secret
        assertion_ok = (
            form.get("client_assertion_type")
            == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
            and form.get("client_assertion", "").count(".") == 2
        )
        if not (secret_ok or assertion_ok):
            return (
                401,
                {"Content-Type": "application/json"},
                json.dumps(
                    {
                        "error": "invalid_client",
                        "error_description": "AADSTS7000215: Invalid client secret provided.",
                        "error_codes": [7000215],
                        "correlation_id": correlation,
                    }
                ),
            )
        token = f"token-{self.calls['token']}-{uuid.uuid4().hex[:8]}"
        if self.accept_new_tokens:
            self.valid_tokens.add(token)
        return (
            200,
            {"Content-Type": "application/json"},
            json.dumps(
                {
                    "token_type": "Bearer",
                    "expires_in": 3599,
                    "ext_expires_in": 3599,
                    "access_token": token,
                }
            ),
        )

    # ---- request guard: auth, staged failures, concurrency ---------------------------------

    def _guarded(self, kind: str, handler: Callable[[Any], Response]) -> Callable[[Any], Response]:
        def callback(request: Any) -> Response:
            with self._lock:
                self.calls[kind] += 1
                self.calls["api"] += 1
                self.requests.append((kind, request.url))
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                header = request.headers.get("Authorization", "")
                if not header.startswith("Bearer ") or header[7:] not in self.valid_tokens:
                    return (401, {"WWW-Authenticate": 'Bearer error="invalid_token"'}, "")
                with self._lock:
                    staged = self.staged.popleft() if self.staged else None
                if staged is not None:
                    extra = {"Retry-After": staged.retry_after} if staged.retry_after else {}
                    if staged.status == 429:
                        return _error(
                            429,
                            "0x80072322",
                            "Number of requests exceeded the limit "
                            "of 6000 over time window of 300 seconds.",
                            extra,
                        )
                    return _error(staged.status, "0x80040216", "Unavailable", extra)
                if kind == "batch" and self.batch_delay:
                    time.sleep(self.batch_delay)
                return handler(request)
            finally:
                with self._lock:
                    self.in_flight -= 1

        return callback

    # ---- metadata ---------------------------------------------------------------------------

    def _entities(self) -> list[dict[str, Any]]:
        return [
            {
                "LogicalName": "contact",
                "EntitySetName": "contacts",
                "PrimaryIdAttribute": "contactid",
                "PrimaryNameAttribute": "fullname",
                "ChangeTrackingEnabled": self.change_tracking_enabled,
            },
            {
                "LogicalName": "account",
                "EntitySetName": "accounts",
                "PrimaryIdAttribute": "accountid",
                "PrimaryNameAttribute": "name",
                "ChangeTrackingEnabled": True,
            },
        ]

    def _metadata(self, request: Any) -> Response:
        parts = urlsplit(request.url)
        path = unquote(parts.path)[len(urlsplit(self.base).path) :]
        params = dict(parse_qsl(parts.query, keep_blank_values=True))
        if path == "/EntityDefinitions":
            rows = self._entities()
            if "$filter" in params:
                try:
                    predicate, comparisons = parse_filter(params["$filter"])
                except FilterError as exc:
                    return _error(400, "0x80060888", str(exc))
                self.filters.append(comparisons)
                rows = [row for row in rows if predicate(row)]
            return _json({"value": [_project(row, params.get("$select")) for row in rows]})
        match = re.fullmatch(
            r"/EntityDefinitions\(LogicalName='((?:[^']|'')*)'\)/Attributes"
            r"(?:/Microsoft\.Dynamics\.CRM\.(\w+)"
            r"|\(LogicalName='((?:[^']|'')*)'\)/Microsoft\.Dynamics\.CRM\.(\w+))?",
            path,
        )
        if match is None or match.group(1).replace("''", "'") != "contact":
            return _error(404, "0x80060888", "Resource not found for the segment")
        select = [s for s in params.get("$select", "").split(",") if s]
        if match.group(2) is None and match.group(3) is None:
            base_properties = {
                "LogicalName",
                "AttributeType",
                "IsValidForUpdate",
                "SchemaName",
                "MetadataId",
                "AttributeTypeName",
                "IsValidForCreate",
            }
            for name in select:
                if name not in base_properties:
                    return _error(
                        400,
                        "0x80060888",
                        f"Could not find a property named '{name}' "
                        "on type 'Microsoft.Dynamics.CRM.AttributeMetadata'.",
                    )
            return _json(
                {
                    "value": [
                        _project(
                            {
                                "LogicalName": a.name,
                                "AttributeType": a.type,
                                "IsValidForUpdate": a.updatable,
                                "SchemaName": a.name,
                                "MetadataId": str(uuid.uuid5(uuid.NAMESPACE_URL, a.name)),
                                "@odata.type": f"#Microsoft.Dynamics.CRM.{a.metadata}",
                            },
                            params.get("$select"),
                        )
                        for a in self.attributes.values()
                    ]
                }
            )
        if match.group(2) is not None:
            return _json(
                {
                    "value": [
                        _project(
                            {"LogicalName": a.name, "MaxLength": a.max_length},
                            params.get("$select"),
                        )
                        for a in self.attributes.values()
                        if a.metadata == match.group(2)
                    ]
                }
            )
        attribute = self.attributes.get(match.group(3).replace("''", "'"))
        if attribute is None or attribute.metadata != match.group(4):
            return _error(404, "0x80060888", "Resource not found for the segment")
        if params.get("$expand") != "OptionSet($select=Options)":
            return _error(400, "0x80060888", "unexpected $expand")
        return _json(
            {
                "LogicalName": attribute.name,
                "OptionSet": {
                    "Options": [
                        {"Value": value, "Label": {"UserLocalizedLabel": {"Label": label}}}
                        for value, label in attribute.options
                    ]
                },
            }
        )

    # ---- attribute creation (POST .../EntityDefinitions(LogicalName='contact')/Attributes) --

    def _create_attribute(self, request: Any) -> Response:
        """As Dataverse answers it: 204 with OData-EntityId for a new column; 400
        DuplicateAttributeSchemaName (0x80047013) when the name exists (case-insensitive);
        400 for a body that is not a well-formed attribute definition."""
        table = re.search(r"LogicalName='([^']*)'", unquote(request.url))
        if table is None or table.group(1) != "contact":
            return _error(404, "0x80060888", "Resource not found for the segment")
        try:
            body = json.loads(request.body)
        except (TypeError, ValueError):
            return _error(400, "0x80048d19", "Error identified in Payload provided by the user")
        self.column_bodies.append(body)
        kind = _CREATABLE.get(str(body.get("@odata.type", "")).lstrip("#"))
        schema = body.get("SchemaName")
        labels = (body.get("DisplayName") or {}).get("LocalizedLabels") or []
        if (
            kind is None
            or not isinstance(schema, str)
            or not re.fullmatch(r"[A-Za-z][A-Za-z0-9]{1,7}_\w+", schema)
            or not labels
            or body.get("AttributeType") != kind[0]
            or (body.get("AttributeTypeName") or {}).get("Value") != kind[1]
        ):
            return _error(400, "0x80048d19", "Error identified in Payload provided by the user")
        name = schema.lower()
        if name in self.attributes:
            return _error(
                400,
                "0x80047013",
                f"The schema name {schema} for type Attribute is "
                f"not unique. An Attribute with same name already exists.",
            )
        options: tuple[tuple[int, str], ...] = ()
        if kind[0] == "Picklist":
            options = tuple(
                (int(o["Value"]), o["Label"]["LocalizedLabels"][0]["Label"])
                for o in body["OptionSet"]["Options"]
            )
        if kind[0] == "String" and not isinstance(body.get("MaxLength"), int):
            return _error(400, "0x80048d19", "MaxLength is required for a String attribute")
        self.attributes[name] = FakeAttribute(
            name, kind[0], max_length=body.get("MaxLength"), options=options
        )
        self.created_columns.append((schema, request.headers.get("MSCRM.SolutionUniqueName")))
        attribute_id = uuid.uuid5(uuid.NAMESPACE_URL, name)
        return (
            204,
            {
                "OData-Version": "4.0",
                "OData-EntityId": (
                    f"{self.base}/EntityDefinitions(LogicalName='contact')/Attributes({attribute_id})"
                ),
            },
            "",
        )

    # ---- queries ------------------------------------------------------------------------------

    def _query(self, request: Any) -> Response:
        parts = urlsplit(request.url)
        params = dict(parse_qsl(parts.query, keep_blank_values=True))
        prefer = {p.strip() for p in request.headers.get("Prefer", "").split(",") if p.strip()}
        page_size = 5000
        for item in prefer:
            if item.startswith("odata.maxpagesize="):
                page_size = max(1, min(5000, int(item.split("=", 1)[1])))
        select = [s for s in params.get("$select", "").split(",") if s]
        for name in select:
            if name not in self.attributes:
                return _error(
                    400,
                    "0x80060888",
                    f"Could not find a property named '{name}' on "
                    "type 'Microsoft.Dynamics.CRM.contact'.",
                )
        cookie = _cookie(params.get("$skiptoken"))
        delta_token = params.get("$deltatoken")
        track = "odata.track-changes" in prefer or delta_token is not None
        snapshot = int(cookie.get("snapshot", self.version))
        rows: Iterator[tuple[str, dict[str, Any] | None]]
        if delta_token is not None:
            since = int(delta_token.split("!", 1)[0])
            if since < self.min_delta_version:
                return _error(410, "0x80044352", "The delta token has expired.")
            changed = [(i, r) for i, r in self.records.items() if self.versions[i] > since]
            gone: list[tuple[str, dict[str, Any] | None]] = [
                (i, None) for i, v in self.deleted.items() if v > since
            ]
            rows = iter(sorted(changed + gone, key=lambda item: item[0]))
        else:
            predicate: Predicate = lambda r: True  # noqa: E731
            if "$filter" in params:
                if track:
                    return _error(
                        400, "0x80060888", "$filter is not supported with change tracking"
                    )
                try:
                    predicate, comparisons = parse_filter(params["$filter"])
                except FilterError as exc:
                    return _error(400, "0x80060888", f"Syntax error: {exc}")
                if "$skiptoken" not in params:
                    self.filters.append(comparisons)
            rows = ((i, r) for i, r in sorted(self.records.items()) if predicate(r))
        after = cookie.get("lastid")
        page: list[dict[str, Any]] = []
        more = False
        for record_id, record in rows:
            if after is not None and record_id <= after:
                continue
            if len(page) == page_size:
                more = True
                break
            if record is None:
                page.append(
                    {
                        "@odata.context": f"{self.base}/$metadata#contacts/$deletedEntity",
                        "id": record_id,
                        "reason": "deleted",
                    }
                )
            else:
                row = {"@odata.etag": f'W/"{self.versions[record_id]}"'}
                row.update({name: _render(record.get(name)) for name in select})
                page.append(row)
        payload: dict[str, Any] = {
            "@odata.context": f"{self.base}/$metadata#contacts({','.join(select)})",
            "value": page,
        }
        headers: dict[str, str] = {}
        if more:
            last = page[-1].get("contactid") or page[-1].get("id")
            token = (
                f'<cookie pagenumber="{int(cookie.get("page", 1)) + 1}" '
                f'lastid="{last}" snapshot="{snapshot}" />'
            )
            kept = "&".join(p for p in parts.query.split("&") if not p.startswith("$skiptoken="))
            payload["@odata.nextLink"] = (
                f"{self.base}/contacts?{kept}&$skiptoken={quote(token, safe='')}"
            )
            self.next_links.append(payload["@odata.nextLink"])
        elif track:
            kept = "&".join(
                p
                for p in parts.query.split("&")
                if not p.startswith(("$skiptoken=", "$deltatoken="))
            )
            stamp = self.clock().strftime("%m/%d/%Y %H:%M:%S")
            payload["@odata.deltaLink"] = (
                f"{self.base}/contacts?{kept}&$deltatoken={quote(f'{snapshot}!{stamp}', safe='')}"
            )
        if track:
            headers["Preference-Applied"] = "odata.track-changes"
        return _json(payload, headers)

    # ---- $batch ---------------------------------------------------------------------------------

    def _batch(self, request: Any) -> Response:
        content_type = request.headers.get("Content-Type", "")
        if not content_type.startswith("multipart/mixed"):
            return _error(400, "0x80048d19", "The $batch needs a multipart/mixed body")
        raw = request.body if isinstance(request.body, bytes) else request.body.encode()
        message = email.message_from_bytes(
            f"Content-Type: {content_type}\r\n\r\n".encode() + raw, policy=email.policy.HTTP
        )
        prefer = request.headers.get("Prefer", "")
        self.batch_prefer.append(prefer)
        continue_on_error = "odata.continue-on-error" in prefer
        units: list[list[tuple[str | None, str]]] = []  # each unit: [(content id, http text)]
        for part in message.iter_parts():
            if part.get_content_type() == "multipart/mixed":
                units.append(
                    [(sub.get("Content-ID"), _payload_text(sub)) for sub in part.iter_parts()]
                )
            else:
                units.append([(part.get("Content-ID"), _payload_text(part))])
        operations = sum(len(unit) for unit in units)
        if operations > 1000:
            return _error(400, "0x80060891", "The maximum batch size is 1000")
        self.batch_sizes.append(operations)
        boundary = f"batchresponse_{uuid.uuid4()}"
        out: list[str] = []
        for unit in units:
            answers = []
            failed: tuple[int, str, str] | None = None
            for content_id, text in unit:
                status, error = self._operation(text)
                if status >= 400:
                    failed = (status, *error)
                    break
                answers.append((content_id, status, text))
            if failed is not None:
                # a failed change set is answered by one bare error part, without Content-ID
                status, code, message_text = failed
                out += [
                    f"--{boundary}",
                    "Content-Type: application/http",
                    "Content-Transfer-Encoding: binary",
                    "",
                    f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
                    "Content-Type: application/json; odata.metadata=minimal",
                    "OData-Version: 4.0",
                    "",
                    json.dumps({"error": {"code": code, "message": message_text}}),
                ]
                if not continue_on_error:
                    break
                continue
            changeset = f"changesetresponse_{uuid.uuid4()}"
            out += [f"--{boundary}", f"Content-Type: multipart/mixed; boundary={changeset}", ""]
            for content_id, status, text in answers:
                target = text.split("\n", 1)[0].split(" ")[1]
                out += [
                    f"--{changeset}",
                    "Content-Type: application/http",
                    "Content-Transfer-Encoding: binary",
                ]
                if content_id is not None:
                    out.append(f"Content-ID: {content_id}")
                out += [
                    "",
                    f"HTTP/1.1 {status} {_REASONS[status]}",
                    "OData-Version: 4.0",
                    f"OData-EntityId: {target}",
                    "",
                    "",
                ]
            out.append(f"--{changeset}--")
        out += [f"--{boundary}--", ""]
        return (
            200,
            {"Content-Type": f"multipart/mixed; boundary={boundary}", "OData-Version": "4.0"},
            "\r\n".join(out),
        )

    def _operation(self, text: str) -> tuple[int, tuple[str, str]]:
        head, _, body = text.replace("\r\n", "\n").partition("\n\n")
        request_line, *header_lines = head.split("\n")
        method, url, _ = request_line.split(" ", 2)
        headers = {
            k.strip().lower(): v.strip()
            for k, _, v in (line.partition(":") for line in header_lines)
        }
        match = re.fullmatch(re.escape(self.base) + r"/contacts\(([0-9a-fA-F-]{36})\)", url)
        if method != "PATCH" or match is None:
            return 400, ("0x80060888", f"unsupported operation {method} {url}")
        record_id = match.group(1).lower()
        try:
            values = json.loads(body) if body.strip() else {}
        except ValueError:
            return 400, ("0x80048d19", "Error identified in Payload provided by the user")
        self.patched.append(values)
        exists = record_id in self.records
        if not exists and headers.get("if-match") == "*":
            return self.missing_status, (
                "0x80040217",
                f"contact With Id = {record_id} Does Not Exist",
            )
        if record_id in self.rejects:
            status, code, message = self.rejects[record_id]
            return status, (code, message)
        for name, value in values.items():
            problem = self._invalid(name, value)
            if problem is not None:
                return 400, problem
        self.version += 1
        record = self.records.setdefault(record_id, {"contactid": record_id})
        for name, value in values.items():
            attribute = self.attributes[name]
            record[name] = (
                datetime.fromisoformat(value.replace("Z", "+00:00"))
                if attribute.type == "DateTime" and value is not None
                else value
            )
        record["modifiedon"] = self.clock().astimezone(UTC).replace(microsecond=0)
        self.versions[record_id] = self.version
        return 204, ("", "")

    def _invalid(self, name: str, value: Any) -> tuple[str, str] | None:
        attribute = self.attributes.get(name)
        if attribute is None:
            return (
                "0x80060888",
                f"Invalid property '{name}' was found in entity 'Microsoft.Dynamics.CRM.contact'.",
            )
        if not attribute.updatable:
            return ("0x80048d19", f"Property '{name}' is read-only")
        if value is None:
            return None
        wrong = (
            "0x80048d19",
            f"Error identified in Payload provided by the user for Entity "
            f":'contacts', Cannot convert the literal '{value}' for '{name}'",
        )
        if attribute.type == "Boolean" and not isinstance(value, bool):
            return wrong
        if attribute.type == "Picklist":
            if not isinstance(value, int) or isinstance(value, bool):
                return wrong
            if value not in {v for v, _ in attribute.options}:
                return ("0x8004431a", f"{value} is not a valid value for {name}")
        if attribute.type == "DateTime" and not (
            isinstance(value, str) and re.fullmatch(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z", value)
        ):
            return wrong
        if attribute.type in ("String", "Memo"):
            if not isinstance(value, str):
                return wrong
            if attribute.max_length is not None and len(value) > attribute.max_length:
                return (
                    "0x80044331",
                    f"A validation error occurred. The length of the '{name}' "
                    f"attribute exceeded the maximum allowed length of "
                    f"'{attribute.max_length}'.",
                )
        return None


def _payload_text(part: Any) -> str:
    payload = part.get_payload(decode=True)
    return payload.decode() if isinstance(payload, bytes) else str(payload)


def _project(row: Mapping[str, Any], select: str | None) -> dict[str, Any]:
    if not select:
        return dict(row)
    names = select.split(",")
    return {k: v for k, v in row.items() if k in names or k.startswith("@")}


def _cookie(skiptoken: str | None) -> dict[str, str]:
    if not skiptoken:
        return {}
    return dict(re.findall(r'(\w+)="([^"]*)"', skiptoken)) | (
        {"page": m.group(1)} if (m := re.search(r'pagenumber="(\d+)"', skiptoken)) else {}
    )


def seconds(n: int) -> timedelta:
    return timedelta(seconds=n)
