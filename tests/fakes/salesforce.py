"""A stateful fake Salesforce org on `responses`: records in memory, SOQL parsed and evaluated.

What it does, true to Salesforce's documented shapes:

- logins: SOAP `login()` (password + token), OAuth token endpoint (username-password,
  JWT bearer verified against the app's public key, client credentials); every login
  issues a new access token; `expire_sessions()` makes every token answer 401
  INVALID_SESSION_ID;
- REST query: SOQL parsed into a tree (SELECT fields | COUNT() FROM obj WHERE ... AND/OR/NOT,
  =, !=, <, <=, >, >=, IN, NOT IN, LIKE; ORDER BY; LIMIT) and evaluated; pages of at most
  2,000 records (Sforce-Query-Options batchSize) linked by `nextRecordsUrl`; a URI above
  16,384 bytes answers 414;
- describe; sObject Collections PATCH (at most 200 records, else 400 EXCEEDED_ID_LIMIT;
  per-record SaveResults in request order, failed ones without `id`);
- Bulk API 2.0 query jobs (state polling, CSV results with Sforce-Locator paging) and
  ingest `update` jobs (CSV upload, UploadComplete, successfulResults/failedResults);
- faults: request-level answers injected by `fail_next` (503 bursts, 403 ...), a daily
  API allowance (403 REQUEST_LIMIT_EXCEEDED when used up), per-record errors (`lock`,
  `reject`); `Sforce-Limit-Info: api-usage=USED/MAX` on every data API answer;
- SystemModstamp set from `clock()` to the second on every write.

Every data API request is logged in `calls` as (method, path) and every parsed SOQL in
`queries`, so tests can assert API call counts and that a literal stayed a literal.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import xml.dom.minidom
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
import requests
import responses

INSTANCE = "https://acme.my.salesforce.com"
API_VERSION = "62.0"
MAX_URI = 16_384
ORG_ID = "00D000000000001"

Answer = tuple[int, dict[str, str], str | bytes]


# ---- schema ---------------------------------------------------------------------------------

# describe's soapType per field type; every text-like type (string, textarea, phone, email,
# url, picklist, multipicklist, encryptedstring, combobox) is xsd:string
_SOAP_TYPES = {
    "boolean": "xsd:boolean",
    "datetime": "xsd:dateTime",
    "date": "xsd:date",
    "time": "xsd:time",
    "int": "xsd:int",
    "double": "xsd:double",
    "currency": "xsd:double",
    "percent": "xsd:double",
    "id": "tns:ID",
    "reference": "tns:ID",
}


@dataclass(frozen=True)
class FakeField:
    name: str
    type: str
    length: int = 0
    updateable: bool = True
    picklist: tuple[str, ...] = ()
    restricted: bool = False

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "label": self.name.replace("__c", "").replace("_", " "),
            "type": self.type,
            "length": self.length,
            "updateable": self.updateable,
            "createable": self.updateable,
            "nillable": self.type != "boolean",
            "filterable": True,
            "restrictedPicklist": self.restricted,
            "picklistValues": [
                {"active": True, "defaultValue": False, "label": v, "value": v, "validFor": None}
                for v in self.picklist
            ],
            "soapType": _SOAP_TYPES.get(self.type, "xsd:string"),
        }


def _standard(*extra: FakeField) -> dict[str, FakeField]:
    base = [
        FakeField("Id", "id", 18, updateable=False),
        FakeField("SystemModstamp", "datetime", updateable=False),
        FakeField("LastModifiedDate", "datetime", updateable=False),
        FakeField("Name", "string", 121, updateable=False),
    ]
    return {f.name: f for f in (*base, *extra)}


CONSENT_FIELDS = (
    FakeField("WhatsApp_Opt_In__c", "boolean"),
    FakeField("WhatsApp_Opt_In_Date__c", "datetime"),
    FakeField("WhatsApp_Opt_In_IP__c", "string", 45),
    FakeField("WhatsApp_Opt_In_Source__c", "string", 255),
    FakeField("WhatsApp_Opt_Out_Date__c", "datetime"),
    FakeField("WhatsApp_Last_Inbound__c", "datetime"),
    FakeField("WhatsApp_Session_Expires__c", "datetime"),
    FakeField("WhatsApp_Consent_Proof_Missing__c", "boolean"),
    FakeField("WhatsApp_User_Id__c", "string", 64),
)
PERSON_FIELDS = (
    FakeField("FirstName", "string", 40),
    FakeField("LastName", "string", 80),
    FakeField("MobilePhone", "phone", 40),
    FakeField("Phone", "phone", 40),
    FakeField("Email", "email", 80),
)
CONSENT_STATUS = ("ExplicitlyOptedIn", "ImplicitlyOptedIn", "OptedOut", "DoublyOptedIn")


def default_schema() -> dict[str, dict[str, FakeField]]:
    """Contact and Lead with the consent fields; MessagingEndUser with custom proof fields."""
    return {
        "Contact": _standard(*PERSON_FIELDS, *CONSENT_FIELDS),
        "Lead": _standard(*PERSON_FIELDS, FakeField("Company", "string", 255), *CONSENT_FIELDS),
        "MessagingEndUser": _standard(
            FakeField("MessagingPlatformKey", "string", 255, updateable=False),
            FakeField(
                "MessageType", "picklist", 255, picklist=("Text", "WhatsApp"), restricted=True
            ),
            FakeField(
                "MessagingConsentStatus", "picklist", 255, picklist=CONSENT_STATUS, restricted=True
            ),
            FakeField("ContactId", "reference", 18),
            *(f for f in CONSENT_FIELDS if f.name != "WhatsApp_Opt_In__c"),
        ),
    }


ID_PREFIX = {"Contact": "003", "Lead": "00Q", "MessagingEndUser": "0PA"}
_ID_SHAPE = re.compile(r"[A-Za-z0-9]{15}(?:[A-Za-z0-9]{3})?")
_DATETIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,3})?(?:Z|[+-]\d\d:?\d\d)")


def sf_datetime(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.000+0000")


def parse_sf_datetime(text: str) -> datetime:
    return (
        datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC).replace(microsecond=0)
    )


# ---- SOQL -----------------------------------------------------------------------------------


class SoqlError(Exception):
    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


_TOKEN = re.compile(
    r"""\s*(?:
    (?P<string>'(?:[^'\\]|\\.)*')
  | (?P<datetime>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:?\d\d))
  | (?P<date>\d{4}-\d\d-\d\d)
  | (?P<number>-?\d+(?:\.\d+)?)
  | (?P<op><=|>=|!=|<>|=|<|>)
  | (?P<punct>[(),])
  | (?P<word>[A-Za-z_][A-Za-z0-9_.]*)
)""",
    re.X,
)
_ESCAPES = {
    "\\": "\\",
    "'": "'",
    '"': '"',
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "b": "\b",
    "f": "\f",
    "%": "\\%",
    "_": "\\_",
}


@dataclass(frozen=True)
class Literal:
    kind: str  # string | datetime | date | number | boolean | null
    value: Any


@dataclass(frozen=True)
class Token:
    kind: str
    text: str
    value: Any = None


def _unescape(body: str) -> str:
    out, i = [], 0
    while i < len(body):
        char = body[i]
        if char == "\\":
            nxt = body[i + 1]
            if nxt not in _ESCAPES:
                raise SoqlError("MALFORMED_QUERY", f"invalid escape sequence \\{nxt}")
            out.append(_ESCAPES[nxt])
            i += 2
        else:
            out.append(char)
            i += 1
    return "".join(out)


def tokenize(soql: str) -> list[Token]:
    tokens, position = [], 0
    while position < len(soql):
        if not soql[position:].strip():
            break
        match = _TOKEN.match(soql, position)
        if not match or match.end() == position:
            raise SoqlError("MALFORMED_QUERY", f"unexpected token at {soql[position:][:20]!r}")
        kind = match.lastgroup or ""
        text = match.group(kind)
        value: Any = None
        if kind == "string":
            value = _unescape(text[1:-1])
        elif kind == "datetime":
            value = parse_sf_datetime(text)
        elif kind == "date":
            value = date.fromisoformat(text)
        elif kind == "number":
            value = float(text)
        tokens.append(Token(kind, text, value))
        position = match.end()
    return tokens


@dataclass
class Query:
    """A parsed SOQL statement: what the fake understood the connector to ask."""

    text: str
    object: str
    fields: tuple[str, ...]
    count: bool = False
    where: Any = None  # ("and"|"or", [..]) | ("not", x) | ("cmp", f, op, Literal) | ("in", ...)
    order_by: tuple[tuple[str, bool], ...] = ()  # (field, descending)
    limit: int | None = None

    @property
    def literals(self) -> list[Literal]:
        """Every literal of the WHERE clause, in order."""
        found: list[Literal] = []
        for leaf in self.conditions:
            if leaf[0] == "cmp":
                found.append(leaf[3])
            elif leaf[0] == "in":
                found.extend(leaf[2])
            elif leaf[0] == "like":
                found.append(leaf[2])
        return found

    @property
    def conditions(self) -> list[tuple[Any, ...]]:
        """The leaf conditions (field, operator, literal(s)) of the WHERE clause."""
        leaves: list[tuple[Any, ...]] = []

        def walk(node: Any) -> None:
            if node is None:
                return
            if node[0] in ("and", "or"):
                for child in node[1]:
                    walk(child)
            elif node[0] == "not":
                walk(node[1])
            else:
                leaves.append(node)

        walk(self.where)
        return leaves


class _Parser:
    def __init__(self, soql: str) -> None:
        self.soql = soql
        self.tokens = tokenize(soql)
        self.i = 0

    def peek(self, offset: int = 0) -> Token | None:
        j = self.i + offset
        return self.tokens[j] if j < len(self.tokens) else None

    def keyword(self, *words: str) -> bool:
        token = self.peek()
        return token is not None and token.kind == "word" and token.text.upper() in words

    def expect_keyword(self, word: str) -> None:
        if not self.keyword(word):
            found = self.peek()
            raise SoqlError(
                "MALFORMED_QUERY",
                f"expected {word}, found {found.text if found else 'end of query'}",
            )
        self.i += 1

    def expect(self, kind: str, text: str | None = None) -> Token:
        token = self.peek()
        if token is None or token.kind != kind or (text is not None and token.text != text):
            raise SoqlError(
                "MALFORMED_QUERY",
                f"expected {text or kind} at {token.text if token else 'end of query'}",
            )
        self.i += 1
        return token

    def parse(self) -> Query:
        self.expect_keyword("SELECT")
        count = False
        fields: list[str] = []
        if self.keyword("COUNT") and self.peek(1) is not None and self.peek(1).text == "(":
            self.i += 1
            self.expect("punct", "(")
            self.expect("punct", ")")
            count = True
        else:
            fields.append(self.expect("word").text)
            while self.peek() is not None and self.peek().text == ",":
                self.i += 1
                fields.append(self.expect("word").text)
        self.expect_keyword("FROM")
        obj = self.expect("word").text
        where = None
        if self.keyword("WHERE"):
            self.i += 1
            where = self.expr()
        order: list[tuple[str, bool]] = []
        if self.keyword("ORDER"):
            self.i += 1
            self.expect_keyword("BY")
            while True:
                name = self.expect("word").text
                descending = False
                if self.keyword("ASC", "DESC"):
                    descending = self.tokens[self.i].text.upper() == "DESC"
                    self.i += 1
                order.append((name, descending))
                if self.peek() is not None and self.peek().text == ",":
                    self.i += 1
                    continue
                break
        limit = None
        if self.keyword("LIMIT"):
            self.i += 1
            limit = int(self.expect("number").value)
        if self.peek() is not None:
            raise SoqlError("MALFORMED_QUERY", f"unexpected token: {self.peek().text}")
        return Query(self.soql, obj, tuple(fields), count, where, tuple(order), limit)

    def expr(self) -> Any:
        parts = [self.and_expr()]
        while self.keyword("OR"):
            self.i += 1
            parts.append(self.and_expr())
        return parts[0] if len(parts) == 1 else ("or", parts)

    def and_expr(self) -> Any:
        parts = [self.unary()]
        while self.keyword("AND"):
            self.i += 1
            parts.append(self.unary())
        return parts[0] if len(parts) == 1 else ("and", parts)

    def unary(self) -> Any:
        if self.keyword("NOT"):
            self.i += 1
            return ("not", self.unary())
        token = self.peek()
        if token is not None and token.text == "(":
            self.i += 1
            inner = self.expr()
            self.expect("punct", ")")
            return inner
        name = self.expect("word").text
        if self.keyword("NOT") and self.peek(1) is not None and self.peek(1).text.upper() == "IN":
            self.i += 2
            return ("in", name, self.literal_list(), True)
        if self.keyword("IN"):
            self.i += 1
            return ("in", name, self.literal_list(), False)
        if self.keyword("LIKE"):
            self.i += 1
            return ("like", name, self.literal())
        op = self.expect("op").text
        return ("cmp", name, "!=" if op == "<>" else op, self.literal())

    def literal_list(self) -> list[Literal]:
        self.expect("punct", "(")
        values = [self.literal()]
        while self.peek() is not None and self.peek().text == ",":
            self.i += 1
            values.append(self.literal())
        self.expect("punct", ")")
        return values

    def literal(self) -> Literal:
        token = self.peek()
        if token is None:
            raise SoqlError("MALFORMED_QUERY", "expected a value, found end of query")
        self.i += 1
        if token.kind in ("string", "datetime", "date", "number"):
            return Literal(token.kind, token.value)
        if token.kind == "word" and token.text.upper() in ("TRUE", "FALSE"):
            return Literal("boolean", token.text.upper() == "TRUE")
        if token.kind == "word" and token.text.upper() == "NULL":
            return Literal("null", None)
        raise SoqlError("MALFORMED_QUERY", f"expected a value, found {token.text}")


def parse_soql(soql: str) -> Query:
    return _Parser(soql).parse()


# ---- fault injection ------------------------------------------------------------------------


@dataclass
class Fault:
    status: int
    body: Any
    times: int
    method: str | None
    path_contains: str | None
    headers: dict[str, str] = field(default_factory=dict)
    disconnect: bool = False

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method == method) and (
            self.path_contains is None or self.path_contains in path
        )


@dataclass
class BulkJob:
    id: str
    kind: str  # query | ingest
    object: str
    operation: str
    state: str
    polls_left: int
    query: Query | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    columns: tuple[str, ...] = ()
    data: str = ""
    successful: list[dict[str, str]] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)


# ---- the org --------------------------------------------------------------------------------


class FakeSalesforce:
    def __init__(
        self,
        *,
        instance: str = INSTANCE,
        api_version: str = API_VERSION,
        clock: Callable[[], datetime] | None = None,
        daily_limit: int = 100_000,
        schema: dict[str, dict[str, FakeField]] | None = None,
    ) -> None:
        self.instance = instance
        self.api_version = api_version
        self.clock = clock or (lambda: datetime.now(UTC))
        self.daily_limit = daily_limit
        self.api_used = 0
        self.schema = schema or default_schema()
        self.records: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in self.schema}
        self.deleted: set[str] = set()
        self.calls: list[tuple[str, str]] = []
        self.queries: list[Query] = []
        self.collection_sizes: list[int] = []
        self.collection_records: list[list[dict[str, Any]]] = []
        self.faults: list[Fault] = []
        self.record_errors: dict[str, list[tuple[str, str]]] = {}
        self.permanent_errors: dict[str, tuple[str, str]] = {}
        self.tokens: set[str] = set()
        self.logins: list[str] = []
        self.users: dict[str, str] = {}  # username -> password + security token
        self.apps: dict[str, str] = {}  # consumer key -> consumer secret
        self.app_keys: dict[str, str] = {}  # consumer key -> PEM public key (JWT)
        self.cursors: dict[str, list[dict[str, Any]]] = {}
        self.jobs: dict[str, BulkJob] = {}
        self.polls_until_done = 1
        self._serial = 0

    # ---- test set-up --------------------------------------------------------------------

    def _next(self) -> int:
        self._serial += 1
        return self._serial

    def add(self, obj: str = "Contact", **values: Any) -> str:
        """Insert a record (values by API name, Python types); returns its 18-character id."""
        record_id = values.pop("Id", None) or f"{ID_PREFIX[obj]}{self._next():012d}AAA"
        fields = self.schema[obj]
        for name in values:
            assert name in fields, f"{obj} has no field {name}"
        stamp = self.clock().astimezone(UTC).replace(microsecond=0)
        record = {name: (False if f.type == "boolean" else None) for name, f in fields.items()}
        record.update(values, Id=record_id, SystemModstamp=stamp, LastModifiedDate=stamp)
        self.records[obj][record_id] = record
        return record_id

    def get(self, record_id: str, obj: str = "Contact") -> dict[str, Any]:
        return self.records[obj][record_id]

    def delete(self, record_id: str, obj: str = "Contact") -> None:
        del self.records[obj][record_id]
        self.deleted.add(record_id)

    def issue_token(self) -> str:
        token = f"{ORG_ID}!AQ.token.{self._next()}"
        self.tokens.add(token)
        return token

    def expire_sessions(self) -> None:
        """Every access token issued so far now answers 401 INVALID_SESSION_ID."""
        self.tokens.clear()

    def fail_next(
        self,
        status: int,
        code: str | None = None,
        message: str = "",
        *,
        times: int = 1,
        method: str | None = None,
        path_contains: str | None = None,
        headers: dict[str, str] | None = None,
        disconnect: bool = False,
    ) -> None:
        """The next `times` matching data API requests get this answer (or a dropped connection)."""
        body: Any = (
            [{"message": message or code or "error", "errorCode": code}]
            if code
            else (message or "<html><body>Service Unavailable</body></html>")
        )
        self.faults.append(
            Fault(status, body, times, method, path_contains, headers or {}, disconnect)
        )

    def lock(self, record_id: str, times: int = 1) -> None:
        """The next `times` writes of this record fail with UNABLE_TO_LOCK_ROW."""
        self.record_errors.setdefault(record_id, []).extend(
            [("UNABLE_TO_LOCK_ROW", "unable to obtain exclusive access to this record")] * times
        )

    def reject(self, record_id: str, code: str, message: str) -> None:
        """Every write of this record fails with this error (a validation rule, say)."""
        self.permanent_errors[record_id] = (code, message)

    def count(self, method: str, path_part: str) -> int:
        return sum(1 for m, p in self.calls if m == method and path_part in p)

    @property
    def query_calls(self) -> int:
        return sum(1 for m, p in self.calls if m == "GET" and "/query" in p and "/jobs/" not in p)

    @property
    def collection_calls(self) -> int:
        return self.count("PATCH", "/composite/sobjects")

    # ---- wiring -------------------------------------------------------------------------

    @contextmanager
    def active(self, rsps: responses.RequestsMock | None = None) -> Iterator[FakeSalesforce]:
        """Route every request to this org; unknown URLs fail as a ConnectionError."""
        if rsps is not None:
            self.register(rsps)
            yield self
            return
        # Routes are catch-all callbacks, so "every route fired" says nothing here; the
        # tests assert exact call counts from `calls` instead.
        with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
            self.register(mock)
            yield self

    def register(self, rsps: responses.RequestsMock) -> None:
        data = re.compile(re.escape(self.instance) + r"/services/data/v[\d.]+/.*")
        for method in ("GET", "POST", "PATCH", "PUT", "DELETE"):
            rsps.add_callback(method, data, callback=self._data)
        rsps.add_callback(
            "POST",
            re.compile(
                r"https://[\w.-]+\.salesforce\.com/services/Soap/u/"
                r"[\d.]+"
            ),
            callback=self._soap_login,
        )
        rsps.add_callback(
            "POST",
            re.compile(
                r"https://[\w.-]+\.salesforce\.com/services/"
                r"oauth2/token"
            ),
            callback=self._oauth_token,
        )

    # ---- logins -------------------------------------------------------------------------

    def _soap_login(self, request: requests.PreparedRequest) -> Answer:
        body = request.body.decode() if isinstance(request.body, bytes) else str(request.body)
        document = xml.dom.minidom.parseString(body)

        def text(tag: str) -> str:
            nodes = document.getElementsByTagName(tag)
            return nodes[0].firstChild.nodeValue if nodes and nodes[0].firstChild else ""

        username, password = text("n1:username"), text("n1:password")
        if self.users.get(username) != password or not username:
            fault = (
                '<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope '
                'xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" '
                'xmlns:sf="urn:fault.partner.soap.sforce.com" '
                'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body>'
                "<soapenv:Fault><faultcode>sf:INVALID_LOGIN</faultcode><faultstring>"
                "INVALID_LOGIN: Invalid username, password, security token; or user locked out."
                '</faultstring><detail><sf:LoginFault xsi:type="sf:LoginFault">'
                "<sf:exceptionCode>INVALID_LOGIN</sf:exceptionCode><sf:exceptionMessage>"
                "Invalid username, password, security token; or user locked out."
                "</sf:exceptionMessage></sf:LoginFault></detail></soapenv:Fault>"
                "</soapenv:Body></soapenv:Envelope>"
            )
            return 500, {"Content-Type": "text/xml;charset=UTF-8"}, fault
        token = self.issue_token()
        self.logins.append("password")
        answer = (
            '<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope '
            'xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" '
            'xmlns="urn:partner.soap.sforce.com"><soapenv:Body><loginResponse><result>'
            f"<metadataServerUrl>{self.instance}/services/Soap/m/{self.api_version}/{ORG_ID}"
            "</metadataServerUrl><passwordExpired>false</passwordExpired><sandbox>false"
            f"</sandbox><serverUrl>{self.instance}/services/Soap/u/{self.api_version}/{ORG_ID}"
            f"</serverUrl><sessionId>{token}</sessionId><userId>005000000000001AAA</userId>"
            "</result></loginResponse></soapenv:Body></soapenv:Envelope>"
        )
        return 200, {"Content-Type": "text/xml;charset=UTF-8"}, answer

    def _oauth_token(self, request: requests.PreparedRequest) -> Answer:
        raw = request.body.decode() if isinstance(request.body, bytes) else str(request.body)
        form = {k: v[0] for k, v in parse_qs(raw).items()}
        grant = form.get("grant_type", "")
        host = urlsplit(request.url or "").hostname or ""
        refused = (
            400,
            {"Content-Type": "application/json"},
            json.dumps({"error": "invalid_grant", "error_description": "authentication failure"}),
        )
        if grant == "password":
            if self.apps.get(form.get("client_id", "")) != form.get(
                "client_secret"
            ) or self.users.get(form.get("username", "")) != form.get("password"):
                return refused
        elif grant == "urn:ietf:params:oauth:grant-type:jwt-bearer":
            try:
                claims = jwt.decode(form.get("assertion", ""), options={"verify_signature": False})
                key = self.app_keys[claims["iss"]]
                jwt.decode(form["assertion"], key, algorithms=["RS256"], audience=f"https://{host}")
            except (KeyError, jwt.PyJWTError):
                return refused
            if claims.get("sub") not in self.users:
                return refused
        elif grant == "client_credentials":
            header = request.headers.get("Authorization", "")
            try:
                key, _, secret = (
                    base64.b64decode(header.removeprefix("Basic ")).decode().partition(":")
                )
            except ValueError:
                return refused
            if not host.endswith(".my.salesforce.com") or self.apps.get(key) != secret:
                return (
                    400,
                    {"Content-Type": "application/json"},
                    json.dumps(
                        {
                            "error": "invalid_client",
                            "error_description": "invalid client credentials",
                        }
                    ),
                )
        else:
            return (
                400,
                {"Content-Type": "application/json"},
                json.dumps(
                    {
                        "error": "unsupported_grant_type",
                        "error_description": "grant type not supported",
                    }
                ),
            )
        self.logins.append(grant)
        token = self.issue_token()
        return (
            200,
            {"Content-Type": "application/json"},
            json.dumps(
                {
                    "access_token": token,
                    "instance_url": self.instance,
                    "id": f"https://login.salesforce.com/id/{ORG_ID}AAA/005000000000001AAA",
                    "token_type": "Bearer",
                    "issued_at": "1769851800000",
                    "signature": "c2lnbmF0dXJl",
                }
            ),
        )

    # ---- the data API -------------------------------------------------------------------

    def _headers(self, content_type: str = "application/json;charset=UTF-8") -> dict[str, str]:
        return {
            "Content-Type": content_type,
            "Sforce-Limit-Info": f"api-usage={self.api_used}/{self.daily_limit}",
        }

    def _error(self, status: int, code: str, message: str) -> Answer:
        return status, self._headers(), json.dumps([{"message": message, "errorCode": code}])

    def _data(self, request: requests.PreparedRequest) -> Answer:
        url = request.url or ""
        parts = urlsplit(url)
        method = request.method or "GET"
        self.calls.append((method, parts.path))
        if len(url) > MAX_URI:
            return 414, {"Content-Type": "text/html"}, "<html>414 URI Too Long</html>"
        authorization = request.headers.get("Authorization", "")
        if authorization.removeprefix("Bearer ") not in self.tokens:
            return self._error(401, "INVALID_SESSION_ID", "Session expired or invalid")
        for fault in self.faults:
            if fault.times > 0 and fault.matches(method, parts.path):
                fault.times -= 1
                if fault.disconnect:
                    raise requests.ConnectionError("connection reset by peer")
                body = fault.body if isinstance(fault.body, str) else json.dumps(fault.body)
                headers = {**self._headers(), **fault.headers}
                if (
                    isinstance(fault.body, list)
                    and fault.body[0].get("errorCode") == "REQUEST_LIMIT_EXCEEDED"
                    and "Sforce-Limit-Info" not in fault.headers
                ):
                    headers["Sforce-Limit-Info"] = (
                        f"api-usage={self.daily_limit}/{self.daily_limit}"
                    )
                return fault.status, headers, body
        if self.api_used >= self.daily_limit:
            return self._error(403, "REQUEST_LIMIT_EXCEEDED", "TotalRequests Limit exceeded.")
        self.api_used += 1
        path = re.sub(r"^/services/data/v[\d.]+/", "", parts.path)
        params = {k: v[0] for k, v in parse_qs(parts.query).items()}
        body = request.body.decode() if isinstance(request.body, bytes) else request.body
        try:
            return self._route(method, path.rstrip("/"), params, body, request)
        except SoqlError as exc:
            return self._error(400, exc.code, str(exc))

    def _route(
        self,
        method: str,
        path: str,
        params: Mapping[str, str],
        body: str | None,
        request: requests.PreparedRequest,
    ) -> Answer:
        if method == "GET" and path == "query":
            size = 2_000
            options = request.headers.get("Sforce-Query-Options", "")
            match = re.search(r"batchSize=(\d+)", options)
            if match:
                size = max(200, min(2_000, int(match.group(1))))
            return self._query(params.get("q", ""), size)
        if method == "GET" and path.startswith("query/"):
            return self._query_more(path.removeprefix("query/"))
        match = re.fullmatch(r"sobjects/(\w+)/describe", path)
        if method == "GET" and match:
            return self._describe(match.group(1))
        if method == "PATCH" and path == "composite/sobjects":
            return self._collections_update(json.loads(body or "{}"))
        if path.startswith("jobs/"):
            return self._bulk(method, path, params, body)
        return self._error(404, "NOT_FOUND", "The requested resource does not exist")

    # ---- query --------------------------------------------------------------------------

    def _resolve(self, obj: str, name: str) -> str:
        fields = {n.lower(): n for n in self.schema[obj]}
        if name.lower() not in fields:
            raise SoqlError(
                "INVALID_FIELD",
                f"No such column '{name}' on entity '{obj}'. If you "
                "are attempting to use a custom field, be sure to append the '__c' "
                "after the custom field name.",
            )
        return fields[name.lower()]

    def _prepare(self, soql: str) -> tuple[Query, list[dict[str, Any]]]:
        query = parse_soql(soql)
        objects = {n.lower(): n for n in self.schema}
        if query.object.lower() not in objects:
            raise SoqlError("INVALID_TYPE", f"sObject type '{query.object}' is not supported.")
        obj = objects[query.object.lower()]
        query.object = obj
        query.fields = tuple(self._resolve(obj, f) for f in query.fields)
        self._check_where(obj, query.where)
        self.queries.append(query)
        rows = [r for r in self.records[obj].values() if self._holds(obj, query.where, r)]
        for name, descending in reversed(query.order_by):
            real = self._resolve(obj, name)
            rows.sort(
                key=lambda r, real=real: (r[real] is not None, r[real] or 0), reverse=descending
            )
        if query.limit is not None:
            rows = rows[: query.limit]
        return query, rows

    def _check_where(self, obj: str, node: Any) -> None:
        if node is None:
            return
        if node[0] in ("and", "or"):
            for child in node[1]:
                self._check_where(obj, child)
        elif node[0] == "not":
            self._check_where(obj, node[1])
        else:
            real = self._resolve(obj, node[1])
            if self.schema[obj][real].type == "id":
                literals = node[2] if node[0] == "in" else [node[-1]]
                for literal in literals:
                    if literal.kind != "string" or not _ID_SHAPE.fullmatch(literal.value):
                        raise SoqlError(
                            "INVALID_QUERY_FILTER_OPERATOR", f"invalid ID field: {literal.value}"
                        )

    def _holds(self, obj: str, node: Any, record: Mapping[str, Any]) -> bool:
        if node is None:
            return True
        kind = node[0]
        if kind == "and":
            return all(self._holds(obj, c, record) for c in node[1])
        if kind == "or":
            return any(self._holds(obj, c, record) for c in node[1])
        if kind == "not":
            return not self._holds(obj, node[1], record)
        real = self._resolve(obj, node[1])
        value = record.get(real)
        if kind == "in":
            found = any(self._equal(real, obj, value, lit) for lit in node[2])
            return found != node[3]
        if kind == "like":
            pattern = re.escape(node[2].value).replace("%", ".*").replace("_", ".")
            return value is not None and re.fullmatch(pattern, str(value), re.I) is not None
        op, literal = node[2], node[3]
        if op == "=":
            return self._equal(real, obj, value, literal)
        if op == "!=":
            return not self._equal(real, obj, value, literal)
        if value is None or literal.value is None:
            return False
        other = literal.value
        if isinstance(value, datetime) and literal.kind != "datetime":
            raise SoqlError(
                "INVALID_FIELD",
                f"value of filter criterion for field '{real}' "
                "must be of type dateTime and should not be enclosed in quotes",
            )
        return {"<": value < other, "<=": value <= other, ">": value > other, ">=": value >= other}[
            op
        ]

    def _equal(self, real: str, obj: str, value: Any, literal: Literal) -> bool:
        if literal.kind == "null":
            return value is None
        if self.schema[obj][real].type == "id":
            return value is not None and str(value)[:15] == str(literal.value)[:15]
        if isinstance(value, str) and isinstance(literal.value, str):
            return value.lower() == literal.value.lower()  # SOQL '=' ignores case on text
        return bool(value == literal.value)

    def _json_record(
        self, obj: str, record: Mapping[str, Any], fields: Sequence[str]
    ) -> dict[str, Any]:
        out: dict[str, Any] = {
            "attributes": {
                "type": obj,
                "url": f"/services/data/v{self.api_version}/sobjects/{obj}/{record['Id']}",
            }
        }
        for name in fields:
            value = record.get(name)
            out[name] = sf_datetime(value) if isinstance(value, datetime) else value
        return out

    def _query(self, soql: str, size: int) -> Answer:
        query, rows = self._prepare(soql)
        if query.count:
            return (
                200,
                self._headers(),
                json.dumps({"totalSize": len(rows), "done": True, "records": []}),
            )
        records = [self._json_record(query.object, r, query.fields) for r in rows]
        cursor = f"01g{self._next():012d}AAA"
        self.cursors[cursor] = records
        return self._page(cursor, 0, size)

    def _page(self, cursor: str, offset: int, size: int) -> Answer:
        records = self.cursors[cursor]
        chunk = records[offset : offset + size]
        done = offset + size >= len(records)
        page: dict[str, Any] = {"totalSize": len(records), "done": done, "records": chunk}
        if not done:
            page["nextRecordsUrl"] = (
                f"/services/data/v{self.api_version}/query/{cursor}-{offset + size}"
            )
        return 200, self._headers(), json.dumps(page)

    def _query_more(self, locator: str) -> Answer:
        cursor, _, offset = locator.partition("-")
        if cursor not in self.cursors:
            return self._error(400, "INVALID_QUERY_LOCATOR", "invalid query locator")
        return self._page(cursor, int(offset), 2_000)

    def _describe(self, obj: str) -> Answer:
        if obj not in self.schema:
            return self._error(404, "NOT_FOUND", "The requested resource does not exist")
        return (
            200,
            self._headers(),
            json.dumps(
                {
                    "name": obj,
                    "label": obj,
                    "custom": False,
                    "queryable": True,
                    "updateable": True,
                    "fields": [f.describe() for f in self.schema[obj].values()],
                }
            ),
        )

    # ---- writes -------------------------------------------------------------------------

    def _convert(self, obj: str, name: str, value: Any, from_csv: bool) -> Any:
        """A written value as stored, or SoqlError(code) for a per-record error."""
        fields = {n.lower(): n for n in self.schema[obj]}
        if name.lower() not in fields:
            raise SoqlError("INVALID_FIELD", f"No such column '{name}' on sobject of type {obj}")
        definition = self.schema[obj][fields[name.lower()]]
        if not definition.updateable:
            raise SoqlError(
                "INVALID_FIELD_FOR_INSERT_UPDATE",
                f"Unable to create/update fields: {definition.name}. Please check "
                "the security settings of this field and verify that it is "
                "read/write for your profile or permission set.",
            )
        if value is None:
            return False if definition.type == "boolean" else None
        if definition.type == "boolean":
            if from_csv and str(value).lower() in ("true", "false"):
                return str(value).lower() == "true"
            if not isinstance(value, bool):
                raise SoqlError(
                    "INVALID_TYPE_ON_FIELD_IN_RECORD",
                    f"{definition.name}: value not of required type: {value}",
                )
            return value
        if definition.type == "datetime":
            if not isinstance(value, str) or not _DATETIME.fullmatch(value):
                raise SoqlError(
                    "INVALID_TYPE_ON_FIELD_IN_RECORD",
                    f"{definition.name}: value not of required type: {value}",
                )
            return parse_sf_datetime(value)
        if not isinstance(value, str):
            raise SoqlError(
                "INVALID_TYPE_ON_FIELD_IN_RECORD",
                f"{definition.name}: value not of required type: {value}",
            )
        if definition.length and len(value) > definition.length:
            raise SoqlError(
                "STRING_TOO_LONG",
                f"{definition.name}: data value too large: "
                f"{value[:20]}... (max length={definition.length})",
            )
        if definition.restricted and value not in definition.picklist:
            raise SoqlError(
                "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST",
                f"{definition.name}: bad value for restricted picklist field: {value}",
            )
        return value

    def _write(
        self, obj: str, record_id: str, values: Mapping[str, Any], from_csv: bool
    ) -> tuple[str, str, list[str]] | None:
        """Apply one record's update; (code, message, fields) if it fails."""
        queued = self.record_errors.get(record_id)
        if queued:
            code, message = queued.pop(0)
            return code, message, []
        if record_id in self.permanent_errors:
            code, message = self.permanent_errors[record_id]
            return code, message, []
        if not _ID_SHAPE.fullmatch(record_id or ""):
            return "MALFORMED_ID", f"{obj} ID: id value of incorrect type: {record_id}", ["Id"]
        if record_id in self.deleted:
            return "ENTITY_IS_DELETED", "entity is deleted", []
        record = self.records[obj].get(record_id)
        if record is None:
            return "INVALID_CROSS_REFERENCE_KEY", "invalid cross reference id", []
        converted = {}
        for name, value in values.items():
            try:
                real = {n.lower(): n for n in self.schema[obj]}.get(name.lower(), name)
                converted[real] = self._convert(obj, name, value, from_csv)
            except SoqlError as exc:
                return exc.code, str(exc), [name]
        record.update(converted)
        stamp = self.clock().astimezone(UTC).replace(microsecond=0)
        record["SystemModstamp"] = record["LastModifiedDate"] = stamp
        return None

    def _collections_update(self, body: Mapping[str, Any]) -> Answer:
        records = body.get("records", [])
        self.collection_sizes.append(len(records))
        self.collection_records.append(records)
        if len(records) > 200:
            return self._error(
                400,
                "EXCEEDED_ID_LIMIT",
                "record limit reached. cannot submit more than 200 records into this call",
            )
        for item in records:  # a dateTime Salesforce cannot read fails the whole request
            obj = item.get("attributes", {}).get("type", "")
            for name, value in item.items():
                definition = self.schema.get(obj, {}).get(name)
                if (
                    definition
                    and definition.type == "datetime"
                    and value is not None
                    and (not isinstance(value, str) or not _DATETIME.fullmatch(value))
                ):
                    return self._error(
                        400,
                        "JSON_PARSER_ERROR",
                        f"Cannot deserialize instance of datetime from VALUE_STRING value {value}",
                    )
        results = []
        for item in records:
            obj = item.get("attributes", {}).get("type", "")
            if obj not in self.schema:
                results.append(
                    {
                        "success": False,
                        "errors": [
                            {
                                "statusCode": "INVALID_TYPE",
                                "message": f"sObject type '{obj}' is not supported",
                                "fields": [],
                            }
                        ],
                    }
                )
                continue
            values = {k: v for k, v in item.items() if k not in ("attributes", "id", "Id")}
            failure = self._write(
                obj, str(item.get("id") or item.get("Id") or ""), values, from_csv=False
            )
            if failure is None:
                results.append({"id": item.get("id"), "success": True, "errors": []})
            else:
                code, message, names = failure
                results.append(
                    {
                        "success": False,
                        "errors": [{"statusCode": code, "message": message, "fields": names}],
                    }
                )
        return 200, self._headers(), json.dumps(results)

    # ---- Bulk API 2.0 -------------------------------------------------------------------

    def _job_info(self, job: BulkJob) -> dict[str, Any]:
        info: dict[str, Any] = {
            "id": job.id,
            "operation": job.operation,
            "object": job.object,
            "createdById": "005000000000001AAA",
            "createdDate": sf_datetime(self.clock()),
            "systemModstamp": sf_datetime(self.clock()),
            "state": job.state,
            "concurrencyMode": "Parallel",
            "contentType": "CSV",
            "apiVersion": float(self.api_version),
            "lineEnding": "LF",
            "columnDelimiter": "COMMA",
        }
        if job.kind == "ingest":
            info["contentUrl"] = f"services/data/v{self.api_version}/jobs/ingest/{job.id}/batches"
        if job.state == "JobComplete":
            info["numberRecordsProcessed"] = (
                len(job.rows) if job.kind == "query" else (len(job.successful) + len(job.failed))
            )
            if job.kind == "ingest":
                info["numberRecordsFailed"] = len(job.failed)
        return info

    def _bulk(self, method: str, path: str, params: Mapping[str, str], body: str | None) -> Answer:
        parts = path.split("/")  # jobs, kind, [id], [what]
        kind = parts[1]
        if len(parts) == 2 and method == "POST":
            spec = json.loads(body or "{}")
            job_id = f"750{self._next():012d}AAA"
            if kind == "query":
                query, rows = self._prepare(spec["query"])
                job = BulkJob(
                    job_id,
                    "query",
                    query.object,
                    "query",
                    "UploadComplete",
                    self.polls_until_done,
                    query=query,
                    rows=[dict(r) for r in rows],
                    columns=query.fields,
                )
            else:
                job = BulkJob(
                    job_id,
                    "ingest",
                    spec["object"],
                    spec["operation"],
                    "Open",
                    self.polls_until_done,
                )
            self.jobs[job_id] = job
            return 200, self._headers(), json.dumps(self._job_info(job))
        job = self.jobs.get(parts[2]) if len(parts) > 2 else None
        if job is None:
            return self._error(404, "NOT_FOUND", "The requested resource does not exist")
        what = parts[3] if len(parts) > 3 else ""
        if method == "GET" and not what:
            if job.state in ("UploadComplete", "InProgress"):
                if job.polls_left > 0:
                    job.polls_left -= 1
                    job.state = "InProgress"
                else:
                    if job.kind == "ingest":
                        self._process_ingest(job)
                    job.state = "JobComplete"
            return 200, self._headers(), json.dumps(self._job_info(job))
        if method == "PUT" and what == "batches":
            if job.state != "Open":
                return self._error(400, "INVALIDJOBSTATE", f"Job state is {job.state}")
            job.data += body or ""
            return 201, self._headers("text/plain"), ""
        if method == "PATCH" and not what:
            job.state = json.loads(body or "{}").get("state", job.state)
            return 200, self._headers(), json.dumps(self._job_info(job))
        if method == "GET" and what == "results":
            return self._query_results(job, params)
        if method == "GET" and what in ("successfulResults", "failedResults"):
            rows = job.successful if what == "successfulResults" else job.failed
            head = [
                "sf__Id",
                "sf__Created" if what == "successfulResults" else "sf__Error",
                *job.columns,
            ]
            return 200, self._headers("text/csv"), _csv(head, rows)
        return self._error(404, "NOT_FOUND", "The requested resource does not exist")

    def _query_results(self, job: BulkJob, params: Mapping[str, str]) -> Answer:
        size = int(params.get("maxRecords", "100000"))
        offset = int(params.get("locator") or "0", 36) if params.get("locator") else 0
        chunk = job.rows[offset : offset + size]
        rows = [{name: _csv_value(record.get(name)) for name in job.columns} for record in chunk]
        following = offset + size
        headers = self._headers("text/csv")
        headers["Sforce-NumberOfRecords"] = str(len(rows))
        headers["Sforce-Locator"] = _base36(following) if following < len(job.rows) else "null"
        return 200, headers, _csv(list(job.columns), rows)

    def _process_ingest(self, job: BulkJob) -> None:
        reader = csv.DictReader(io.StringIO(job.data))
        job.columns = tuple(reader.fieldnames or ())
        for row in reader:
            record_id = row.get("Id", "")
            values = {}
            for name, cell in row.items():
                if name == "Id" or cell == "":
                    continue  # an empty cell leaves the field unchanged
                values[name] = None if cell == "#N/A" else cell
            failure = self._write(job.object, record_id, values, from_csv=True)
            if failure is None:
                job.successful.append({"sf__Id": record_id, "sf__Created": "false", **row})
            else:
                code, message, names = failure
                job.failed.append(
                    {
                        "sf__Id": record_id,
                        "sf__Error": f"{code}:{message}:{','.join(names) or '--'}",
                        **row,
                    }
                )


def _csv_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    return str(value)


def _csv(header: Sequence[str], rows: Sequence[Mapping[str, str]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(
        buffer, fieldnames=list(header), lineterminator="\n", quoting=csv.QUOTE_ALL
    )
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _base36(number: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        number, rest = divmod(number, 36)
        out = digits[rest] + out
        if number == 0:
            return out


class Clock:
    """The fake org's clock: moves only when a test says so."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)
