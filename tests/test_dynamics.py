"""The Dataverse connector against a stateful fake of the Web API and its token endpoint."""

from __future__ import annotations

import logging
import tomllib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
import responses
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fakes.dynamics import (
    AUTHORITY_HOST,
    CLIENT_ID,
    CLIENT_SECRET,
    NOT_SET,
    OPTED_IN,
    OPTED_OUT,
    ORG_URL,
    TENANT_ID,
    FakeDataverse,
    Staged,
    parse_filter,
)
from waconsent.config import LoadedConfig, Secrets, parse
from waconsent.connectors import dynamics_batch as batch
from waconsent.connectors import dynamics_odata as odata
from waconsent.connectors.dynamics import DynamicsConnector
from waconsent.connectors.http import RetryPolicy
from waconsent.domain import WriteRequest
from waconsent.errors import AuthenticationError, ConfigError, ConnectionFailed
from waconsent.logs import fields_of

T0 = datetime(2026, 1, 10, 8, 0, tzinfo=UTC)
PRESET = resources.files("waconsent.config").joinpath("presets/dynamics.toml").read_text("utf-8")


def make_config(
    *,
    auth: str = "client_secret",
    secrets: dict[str, str] | None = None,
    fields: dict[str, str] | None = None,
    phone_fields: list[str] | None = None,
    values: dict[str, int] | None = None,
    url: str = ORG_URL,
    **dynamics: Any,
) -> LoadedConfig:
    raw = tomllib.loads(PRESET)
    raw["dynamics"].update(
        {
            "url": url,
            "tenant_id": TENANT_ID,
            "client_id": CLIENT_ID,
            "auth": auth,
            "authority_host": AUTHORITY_HOST,
            **dynamics,
        }
    )
    if fields is not None:
        raw["mapping"]["fields"] = fields
    if phone_fields is not None:
        raw["mapping"]["phone_fields"] = phone_fields
    if values is not None:
        raw["mapping"]["values"] = values
    default = {"DYNAMICS_CLIENT_SECRET": CLIENT_SECRET}
    return LoadedConfig(parse(raw), Secrets(default if secrets is None else secrets), None)


@pytest.fixture
def mock() -> Iterator[responses.RequestsMock]:
    # Not assert_all_requests_are_fired: the fake registers every route of the service and
    # each test uses a few; call counts are asserted explicitly instead.
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        yield rsps


@pytest.fixture
def strict() -> Iterator[responses.RequestsMock]:
    """For hand-written answers: every one registered must be asked for."""
    with responses.RequestsMock(assert_all_requests_are_fired=True) as rsps:
        yield rsps


@pytest.fixture
def fake(mock: responses.RequestsMock) -> FakeDataverse:
    return FakeDataverse().install(mock)


@pytest.fixture
def waits() -> list[float]:
    return []


@pytest.fixture
def connect(waits: list[float]) -> Iterator[Callable[..., DynamicsConnector]]:
    opened: list[DynamicsConnector] = []

    def _connect(config: LoadedConfig | None = None, **kwargs: Any) -> DynamicsConnector:
        connector = DynamicsConnector.from_config(
            config or make_config(), policy=RetryPolicy(sleep=waits.append), **kwargs
        )
        opened.append(connector)
        return connector

    yield _connect
    for connector in opened:
        connector.close()


def hosts(mock: responses.RequestsMock) -> set[str]:
    return {str(urlsplit(str(call.request.url)).hostname) for call in mock.calls}


# ---- reads ------------------------------------------------------------------------------------


def test_read_all_pages_twelve_thousand_contacts_in_three_pages(
    fake: FakeDataverse, connect: Callable[..., DynamicsConnector]
) -> None:
    """12,000 contacts come back in 3 pages of at most 5,000, following nextLink as given."""
    fake.add_contacts(12_000, modified=T0)
    records = list(connect().read_all())
    assert len({r.record_id for r in records}) == 12_000
    assert fake.calls["query"] == 3
    query_urls = [url for kind, url in fake.requests if kind == "query"]
    assert query_urls[1:] == fake.next_links  # followed exactly, nothing added or rebuilt
    assert records[0].phones == {"mobilephone": "+4915100000000", "telephone1": None}
    assert records[0].modified_at == T0
    assert records[0].name == "Contact 0"


def test_read_selects_only_key_modifiedon_phones_and_mapped_attributes(
    fake: FakeDataverse, mock: responses.RequestsMock, connect: Callable[..., DynamicsConnector]
) -> None:
    """$select names the key, modifiedon, the phones and the mapped attributes, nothing else."""
    fake.add_contact(mobilephone="+4915112345678")
    list(connect().read_all())
    query = dict(parse_qsl(urlsplit(fake.requests[0][1]).query))
    assert set(query["$select"].split(",")) == {
        "contactid",
        "modifiedon",
        "mobilephone",
        "telephone1",
        "fullname",
        "new_whatsappoptin",
        "new_whatsappoptindate",
        "new_whatsappoptinip",
        "new_whatsappoptinsource",
        "new_whatsappoptoutdate",
        "new_whatsapplastinbound",
        "new_whatsappsessionexpires",
        "new_whatsappproofmissing",
        "new_whatsappuserid",
    }
    assert mock.calls[-1].request.headers["Prefer"] == "odata.maxpagesize=5000"


def test_read_changed_since_filters_modifiedon_ge_and_keeps_the_boundary(
    fake: FakeDataverse, connect: Callable[..., DynamicsConnector]
) -> None:
    """Incremental reads send `modifiedon ge <since>`; a record at exactly `since` is kept."""
    ids = fake.add_contacts(50, modified=T0)
    since = T0 + timedelta(hours=1)
    fake.touch(ids[3], since)
    fake.touch(ids[7], since + timedelta(seconds=1))
    changed = list(connect().read_changed_since(since))
    assert sorted(r.record_id for r in changed) == sorted([ids[3], ids[7]])
    [comparisons] = fake.filters
    assert [(c.attribute, c.operator, c.value) for c in comparisons] == [
        ("modifiedon", "ge", since)
    ]


def test_read_by_ids_goes_in_chunks_and_skips_missing_and_non_guid_ids(
    fake: FakeDataverse, connect: Callable[..., DynamicsConnector]
) -> None:
    """450 ids -> 3 queries of at most 200; missing ids are absent; non-GUIDs never reach a URL."""
    ids = fake.add_contacts(400, modified=T0)
    wanted = [
        *ids,
        *[f"00000000-0000-0000-0000-{n:012d}" for n in range(9000, 9050)],
        "not-a-guid' or contactid ne null or 'x",
    ]
    found = list(connect().read_by_ids(wanted))
    assert sorted(r.record_id for r in found) == sorted(ids)
    assert fake.calls["query"] == 3
    assert [len(f) for f in fake.filters] == [200, 200, 50]
    assert all(c.attribute == "contactid" and c.operator == "eq" for f in fake.filters for c in f)


def test_injected_record_id_never_changes_a_filter(
    fake: FakeDataverse, connect: Callable[..., DynamicsConnector]
) -> None:
    """A record id carrying quotes and OData operators is not a GUID: no query is sent."""
    fake.add_contacts(3, modified=T0)
    assert list(connect().read_by_ids(["x' or contactid ne null or 'y", "1 eq 1"])) == []
    assert fake.calls["query"] == 0


NASTY = [
    "O'Brien",
    "' or 1 eq 1 or name eq '",
    "x') or (contactid ne null",
    "a&$filter=x",
    "50% + 1 #hash",
    "''",
    "'",
    "Müller eq 'x'",
    "a,b) and not (c",
]


@pytest.mark.parametrize("value", NASTY)
def test_quoted_string_filter_matches_only_the_exact_value(fake: FakeDataverse, value: str) -> None:
    """A string literal with quotes or operators stays one literal in one comparison."""
    target = fake.add_contact(fullname=value)
    fake.add_contact(fullname="Someone else")
    query = odata.query_string({"$filter": odata.eq("fullname", value)})
    [(key, sent)] = parse_qsl(query)  # what the server decodes from the URL
    predicate, comparisons = parse_filter(sent)
    assert key == "$filter"
    assert [(c.attribute, c.operator, c.value) for c in comparisons] == [("fullname", "eq", value)]
    assert [i for i, r in fake.records.items() if predicate(r)] == [target]


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=40))
def test_any_string_survives_quoting_and_url_encoding(value: str) -> None:
    """For any text, the server parses back exactly one comparison with exactly that value."""
    query = odata.query_string({"$filter": odata.eq("fullname", value)})
    [(_, sent)] = parse_qsl(query, keep_blank_values=True)
    _, comparisons = parse_filter(sent)
    assert [(c.attribute, c.operator, c.value) for c in comparisons] == [("fullname", "eq", value)]


def test_entity_set_with_quotes_is_refused_before_any_request(
    fake: FakeDataverse, mock: responses.RequestsMock
) -> None:
    """mapping.object must be a plain entity set name; an injected one is a ConfigError."""
    raw = tomllib.loads(PRESET)
    raw["dynamics"].update({"url": ORG_URL, "authority_host": AUTHORITY_HOST})
    raw["mapping"]["object"] = "contacts' or LogicalName eq 'account"
    config = LoadedConfig(parse(raw), Secrets({"DYNAMICS_CLIENT_SECRET": CLIENT_SECRET}), None)
    with pytest.raises(ConfigError, match=r"mapping\.object"):
        DynamicsConnector.from_config(config)
    assert len(mock.calls) == 0


def test_next_link_that_repeats_stops_the_read(
    strict: responses.RequestsMock, waits: list[float]
) -> None:
    """A server that hands out the same nextLink twice cannot make the read spin, and the
    read fails instead of ending short (a short read would look complete)."""
    base = f"{ORG_URL}/api/data/v9.2"
    loop = f"{base}/contacts?$select=x&$skiptoken=same"
    row = {
        "contactid": "00000000-0000-0000-0000-000000000001",
        "modifiedon": "2026-01-01T00:00:00Z",
    }
    strict.add(responses.GET, f"{base}/contacts", json={"value": [row], "@odata.nextLink": loop})
    config = make_config(auth="access_token", secrets={"DYNAMICS_ACCESS_TOKEN": "t"})
    connector = DynamicsConnector.from_config(config, policy=RetryPolicy(sleep=waits.append))
    records = []
    with pytest.raises(ConnectionFailed, match="repeated"):
        records.extend(connector.read_all())
    assert len(strict.calls) == 2  # the first page and the link once; not a third time
    assert len(records) == 2


def test_next_link_to_another_host_is_refused(
    strict: responses.RequestsMock, waits: list[float]
) -> None:
    """The bearer token never follows a nextLink off the organization's host."""
    base = f"{ORG_URL}/api/data/v9.2"
    strict.add(
        responses.GET,
        f"{base}/contacts",
        json={"value": [], "@odata.nextLink": "https://collector.example/api/data/v9.2/contacts"},
    )
    config = make_config(auth="access_token", secrets={"DYNAMICS_ACCESS_TOKEN": "t"})
    connector = DynamicsConnector.from_config(config, policy=RetryPolicy(sleep=waits.append))
    with pytest.raises(ConnectionFailed, match="outside"):
        list(connector.read_all())
    assert hosts(strict) == {"acme.crm4.dynamics.com"}


# ---- writes -----------------------------------------------------------------------------------


def test_three_hundred_changes_go_in_one_batch_with_only_changed_attributes(
    fake: FakeDataverse, connect: Callable[..., DynamicsConnector]
) -> None:
    """300 writes -> one $batch of 300 PATCHes carrying only the changed attributes."""
    ids = fake.add_contacts(
        300, modified=T0, new_whatsappoptin=True, new_whatsappoptinsource="web form"
    )
    stop = datetime(2026, 2, 1, 9, 30, 15, 999_000, tzinfo=UTC)
    results = connect().write(
        [WriteRequest(i, {"opt_in": False, "opt_out_date": stop}) for i in ids]
    )
    assert [r.ok for r in results] == [True] * 300
    assert [r.record_id for r in results] == ids
    assert fake.calls["batch"] == 1 and fake.batch_sizes == [300]
    assert all(
        body == {"new_whatsappoptin": False, "new_whatsappoptoutdate": "2026-02-01T09:30:15Z"}
        for body in fake.patched
    )
    assert "odata.continue-on-error" in fake.batch_prefer[0]
    record = fake.records[ids[0]]
    assert record["new_whatsappoptin"] is False
    assert record["new_whatsappoptinsource"] == "web form"  # untouched
    assert record["modifiedon"] == fake.clock().replace(microsecond=0)


def test_one_bad_record_in_a_batch_fails_alone(
    fake: FakeDataverse, connect: Callable[..., DynamicsConnector]
) -> None:
    """A record a plugin rejects fails permanently with its code; its neighbours are written."""
    ids = fake.add_contacts(10, modified=T0)
    fake.rejects[ids[4]] = (400, "0x80040265", "Plugin: contact is locked for compliance review")
    results = connect().write([WriteRequest(i, {"proof_missing": True}) for i in ids])
    assert [r.ok for r in results] == [i != 4 for i in range(10)]
    bad = results[4]
    assert (bad.record_id, bad.code, bad.permanent) == (ids[4], "0x80040265", True)
    assert "locked for compliance review" in bad.error
    assert fake.calls["batch"] == 1
    assert [fake.records[i].get("new_whatsappproofmissing") for i in ids] == [
        None if n == 4 else True for n in range(10)
    ]


def test_missing_record_fails_permanently_and_is_never_created(
    fake: FakeDataverse, connect: Callable[..., DynamicsConnector]
) -> None:
    """If-Match: * turns a PATCH on a missing id into 412, a permanent failure, not an insert."""
    [present] = fake.add_contacts(1, modified=T0)
    ghost = "0bad0bad-0000-4000-8000-000000000000"
    results = connect().write(
        [
            WriteRequest(ghost, {"proof_missing": True}),
            WriteRequest(present, {"proof_missing": True}),
        ]
    )
    assert (results[0].ok, results[0].permanent, results[0].code) == (False, True, "0x80040217")
    assert results[1].ok
    assert ghost not in fake.records


@pytest.mark.parametrize("status", [404, 412])
def test_record_missing_status_is_permanent(
    status: int, mock: responses.RequestsMock, connect: Callable[..., DynamicsConnector]
) -> None:
    """Whether Dataverse says 404 or 412 for a missing record, it is a permanent failure."""
    fake = FakeDataverse(missing_status=status).install(mock)
    ghost = "0bad0bad-0000-4000-8000-000000000000"
    [result] = connect().write([WriteRequest(ghost, {"proof_missing": True})])
    assert (result.ok, result.permanent) == (False, True)
    assert fake.calls["batch"] == 1


def test_too_long_string_is_reported_never_cut(
    fake: FakeDataverse, connect: Callable[..., DynamicsConnector]
) -> None:
    """A value longer than MaxLength is a permanent per-record error; nothing is sent for it."""
    [record] = fake.add_contacts(1, modified=T0)
    source = "whatsapp:keyword:START:" + "w" * 300
    [result] = connect().write([WriteRequest(record, {"opt_in_source": source})])
    assert (result.ok, result.code, result.permanent) == (False, "STRING_TOO_LONG", True)
    assert "at most 200" in result.error
    assert fake.calls["batch"] == 0
    assert "new_whatsappoptinsource" not in fake.records[record]


def test_datetimes_are_written_in_utc_with_z(
    fake: FakeDataverse, connect: Callable[..., DynamicsConnector]
) -> None:
    """A datetime in another zone is written as its UTC second with a Z."""
    [record] = fake.add_contacts(1, modified=T0)
    local = datetime(2026, 2, 1, 11, 30, 5, 123_456, tzinfo=timezone(timedelta(hours=2)))
    [result] = connect().write([WriteRequest(record, {"last_inbound": local})])
    assert result.ok
    assert fake.patched == [{"new_whatsapplastinbound": "2026-02-01T09:30:05Z"}]


def test_write_of_an_unmapped_field_is_refused_without_a_request(
    fake: FakeDataverse, connect: Callable[..., DynamicsConnector]
) -> None:
    """A logical field the mapping leaves out cannot be written: permanent, nothing sent."""
    [record] = fake.add_contacts(1, modified=T0)
    config = make_config(
        fields={
            "opt_in": "new_whatsappoptin",
            "opt_in_date": "new_whatsappoptindate",
            "opt_out_date": "new_whatsappoptoutdate",
        }
    )
    [result] = connect(config).write([WriteRequest(record, {"opt_in_ip": "192.0.2.1"})])
    assert (result.ok, result.code, result.permanent) == (False, "UNMAPPED_FIELD", True)
    assert fake.calls["batch"] == 0


def test_parallel_batches_stay_within_max_concurrency(
    mock: responses.RequestsMock, connect: Callable[..., DynamicsConnector]
) -> None:
    """Five batches go out through a pool, never more than dynamics.max_concurrency at once."""
    fake = FakeDataverse(batch_delay=0.05).install(mock)
    ids = fake.add_contacts(50, modified=T0)
    connector = connect(make_config(max_concurrency=2, batch_size=10))
    assert connector.batch_size(10_000) == 20
    results = connector.write([WriteRequest(i, {"proof_missing": True}) for i in ids])
    assert all(r.ok for r in results) and [r.record_id for r in results] == ids
    assert fake.calls["batch"] == 5 and fake.batch_sizes == [10] * 5
    assert fake.max_in_flight <= 2


# ---- service protection ------------------------------------------------------------------------


def test_429_storm_waits_exactly_the_retry_after_values(
    fake: FakeDataverse, connect: Callable[..., DynamicsConnector], waits: list[float]
) -> None:
    """Three 429s in a row: the connector sleeps 7, 3 and 11 seconds, then reads."""
    fake.add_contacts(10, modified=T0)
    fake.throttle(7, 3, 11)
    connector = connect()
    records = list(connector.read_all())
    assert len(records) == 10
    assert waits == [7.0, 3.0, 11.0]
    assert fake.calls["query"] == 4
    usage = connector.usage()
    assert (usage["throttled"], usage["api_calls"], usage["query_pages"]) == (3, 4, 4)


def test_throttled_batch_is_resent_after_retry_after(
    fake: FakeDataverse, connect: Callable[..., DynamicsConnector], waits: list[float]
) -> None:
    """A 429 on the $batch itself waits its Retry-After and resends the same batch once."""
    ids = fake.add_contacts(5, modified=T0)
    connector = connect()
    connector.preflight()
    fake.throttle(30)
    results = connector.write([WriteRequest(i, {"proof_missing": True}) for i in ids])
    assert all(r.ok for r in results)
    assert waits == [30.0]
    assert fake.calls["batch"] == 2 and fake.batch_sizes == [5]


def test_503_is_retried_with_backoff(
    fake: FakeDataverse, connect: Callable[..., DynamicsConnector], waits: list[float]
) -> None:
    """503 without Retry-After backs off (bounded, jittered) and then succeeds."""
    fake.add_contacts(3, modified=T0)
    fake.stage(Staged(503), Staged(503))
    assert len(list(connect().read_all())) == 3
    assert len(waits) == 2 and 0 <= waits[0] <= 1.0 and 0 <= waits[1] <= 2.0


def test_endless_throttling_gives_up_with_connection_failed(
    fake: FakeDataverse, connect: Callable[..., DynamicsConnector], waits: list[float]
) -> None:
    """When 429s never stop, the shared policy's attempt limit ends the run cleanly."""
    fake.throttle(*([5] * 10))
    with pytest.raises(ConnectionFailed, match="still refused"):
        list(connect().read_all())
    assert waits == [5.0] * 5


def test_token_expiry_mid_run_renews_the_token_once(
    fake: FakeDataverse, mock: responses.RequestsMock, connect: Callable[..., DynamicsConnector]
) -> None:
    """After a 401 the connector gets a new token from msal once and carries on."""
    fake.add_contacts(12_000, modified=T0)
    pages = connect().read_all()
    first = [next(pages) for _ in range(5000)]
    assert fake.calls["token"] == 1
    fake.expire_tokens()
    rest = list(pages)
    assert len(first) + len(rest) == 12_000
    assert fake.calls["token"] == 2
    assert fake.calls["query"] == 4  # page 2 was refused once with 401, then sent again
    statuses = [
        c.response.status_code
        for c in mock.calls  # type: ignore[union-attr]
        if "/contacts" in str(c.request.url)
    ]
    assert statuses == [200, 401, 200, 200]


def test_a_second_401_after_renewal_is_an_authentication_error(
    fake: FakeDataverse, connect: Callable[..., DynamicsConnector]
) -> None:
    """A renewed token that is refused too stops the run instead of looping."""
    fake.accept_new_tokens = False
    with pytest.raises(AuthenticationError, match="application user"):
        list(connect().read_all())
    assert fake.calls["token"] == 2 and fake.calls["query"] == 2


# ---- authentication ----------------------------------------------------------------------------


def test_msal_reuses_one_token_and_never_asks_microsofts_authority(
    fake: FakeDataverse, mock: responses.RequestsMock, connect: Callable[..., DynamicsConnector]
) -> None:
    """One OpenID discovery and one token serve many requests; login.microsoftonline.com unseen."""
    ids = fake.add_contacts(20, modified=T0)
    connector = connect()
    connector.preflight()
    list(connector.read_all())
    list(connector.read_by_ids(ids[:3]))
    connector.write([WriteRequest(ids[0], {"proof_missing": True})])
    assert fake.calls["openid"] == 1 and fake.calls["token"] == 1
    assert hosts(mock) == {"login.fake-sovereign.test", "acme.crm4.dynamics.com"}
    [form] = fake.token_forms
    assert form["scope"] == f"{ORG_URL}/.default"
    assert form["grant_type"] == "client_credentials"


def test_msal_error_dict_becomes_authentication_error_without_the_secret(
    fake: FakeDataverse, connect: Callable[..., DynamicsConnector]
) -> None:
    """Azure's error, description and correlation id are kept; the secret is not."""
    wrong = "wrong~secret~value-123"
    connector = connect(make_config(secrets={"DYNAMICS_CLIENT_SECRET": wrong}))
    with pytest.raises(AuthenticationError) as caught:
        list(connector.read_all())
    message = str(caught.value)
    assert "invalid_client" in message and "AADSTS7000215" in message
    assert "correlation id " in message
    correlation = message.rsplit("correlation id ", 1)[1].rstrip(")")
    assert len(correlation) == 36
    assert wrong not in message and CLIENT_SECRET not in message
    assert fake.calls["query"] == 0


def test_a_secret_echoed_by_the_identity_provider_is_redacted(
    fake: FakeDataverse, connect: Callable[..., DynamicsConnector]
) -> None:
    """Even if the error description repeated the secret, the message would not carry it."""
    fake.token_error = {
        "error": "invalid_request",
        "error_description": f"AADSTS900144: bad value {CLIENT_SECRET} in body",
    }
    with pytest.raises(AuthenticationError) as caught:
        list(connect().read_all())
    assert CLIENT_SECRET not in str(caught.value)
    assert "AADSTS900144" in str(caught.value) and "[redacted]" in str(caught.value)


def test_certificate_auth_signs_a_client_assertion(
    fake: FakeDataverse, connect: Callable[..., DynamicsConnector], tmp_path: Path
) -> None:
    """auth = certificate sends a signed JWT assertion (no secret) and gets a token."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "waconsent-test")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(datetime(2026, 1, 1, tzinfo=UTC))
        .not_valid_after(datetime(2036, 1, 1, tzinfo=UTC))
        .sign(key, hashes.SHA256())
    )
    pem = tmp_path / "waconsent.pem"
    pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        + cert.public_bytes(serialization.Encoding.PEM)
    )
    thumbprint = cert.fingerprint(hashes.SHA1()).hex().upper()
    fake.add_contacts(2, modified=T0)
    config = make_config(
        auth="certificate",
        certificate_thumbprint=thumbprint,
        secrets={"DYNAMICS_CERTIFICATE_FILE": str(pem)},
    )
    assert len(list(connect(config).read_all())) == 2
    [form] = fake.token_forms
    assert "client_secret" not in form
    assert form["client_assertion"].count(".") == 2


def test_certificate_with_a_different_thumbprint_is_a_config_error(
    fake: FakeDataverse, tmp_path: Path
) -> None:
    """A thumbprint that is not the certificate's is caught before any request."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "waconsent-test")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(datetime(2026, 1, 1, tzinfo=UTC))
        .not_valid_after(datetime(2036, 1, 1, tzinfo=UTC))
        .sign(key, hashes.SHA256())
    )
    pem = tmp_path / "waconsent.pem"
    pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        + cert.public_bytes(serialization.Encoding.PEM)
    )
    config = make_config(
        auth="certificate",
        certificate_thumbprint="AB" * 20,
        secrets={"DYNAMICS_CERTIFICATE_FILE": str(pem)},
    )
    with pytest.raises(ConfigError, match="certificate_thumbprint"):
        DynamicsConnector.from_config(config)
    assert fake.calls["token"] == 0


def test_access_token_mode_uses_the_token_and_cannot_renew_it(
    fake: FakeDataverse, connect: Callable[..., DynamicsConnector]
) -> None:
    """DYNAMICS_ACCESS_TOKEN is sent as is; when refused, the error says how to get a new one."""
    fake.add_contacts(2, modified=T0)
    token = fake.token_for_tests()
    config = make_config(auth="access_token", secrets={"DYNAMICS_ACCESS_TOKEN": token})
    connector = connect(config)
    assert len(list(connector.read_all())) == 2
    fake.expire_tokens()
    with pytest.raises(AuthenticationError, match="az account get-access-token"):
        list(connector.read_all())
    assert fake.calls["token"] == 0 and fake.calls["openid"] == 0


def test_missing_secret_is_a_config_error_naming_the_variable() -> None:
    """auth = client_secret without DYNAMICS_CLIENT_SECRET names the variable to set."""
    with pytest.raises(ConfigError, match="DYNAMICS_CLIENT_SECRET"):
        DynamicsConnector.from_config(make_config(secrets={}))


# ---- preflight and metadata --------------------------------------------------------------------


def test_preflight_passes_for_the_preset_mapping_in_three_metadata_calls(
    fake: FakeDataverse, connect: Callable[..., DynamicsConnector]
) -> None:
    """The preset's attributes exist on the fake contact: entity, attributes, string lengths."""
    connector = connect()
    connector.preflight()
    assert fake.calls["metadata"] == 3
    assert connector.usage()["metadata_calls"] == 3
    described = connector.describe_fields()
    assert described["new_whatsappoptinip"].length == 45
    assert described["new_whatsappoptin"].type == "Boolean"  # Dataverse's own spelling
    assert described["modifiedon"].updateable is False


def test_preflight_names_every_unknown_attribute_and_the_entity(
    fake: FakeDataverse, connect: Callable[..., DynamicsConnector]
) -> None:
    """Unknown mapped and phone attributes are all listed, with the entity and near names."""
    config = make_config(
        fields={
            "opt_in": "new_whatsappoptinn",
            "opt_in_date": "new_whatsappoptindate",
            "opt_out_date": "new_whatsappoptoutdate",
            "opt_in_ip": "new_consentip",
        },
        phone_fields=["MobilePhone", "telephone1"],
    )
    with pytest.raises(ConfigError) as caught:
        connect(config).preflight()
    problems = caught.value.problems
    assert len(problems) == 3
    text = str(caught.value)
    assert "'new_whatsappoptinn'" in text and "did you mean 'new_whatsappoptin'" in text
    assert "'new_consentip'" in text
    assert "'MobilePhone'" in text and "did you mean 'mobilephone'" in text
    assert "the contact entity (entity set 'contacts')" in text


def test_preflight_refuses_wrong_types_and_read_only_attributes(
    fake: FakeDataverse, connect: Callable[..., DynamicsConnector]
) -> None:
    """A text column mapped as a date, and a read-only column, are configuration errors."""
    config = make_config(
        fields={
            "opt_in": "new_whatsappoptin",
            "opt_in_date": "new_whatsappoptinsource",
            "opt_out_date": "new_whatsappoptoutdate",
            "opt_in_source": "fullname",
        }
    )
    with pytest.raises(ConfigError) as caught:
        connect(config).preflight()
    text = str(caught.value)
    assert "mapping.fields.opt_in_date: 'new_whatsappoptinsource' is a String attribute" in text
    assert "mapping.fields.opt_in_source: 'fullname' cannot be updated" in text


def test_unknown_entity_set_is_a_config_error(
    fake: FakeDataverse, connect: Callable[..., DynamicsConnector]
) -> None:
    """An entity set Dataverse does not have is named in the error."""
    raw = tomllib.loads(PRESET)
    raw["dynamics"].update(
        {
            "url": ORG_URL,
            "tenant_id": TENANT_ID,
            "client_id": CLIENT_ID,
            "authority_host": AUTHORITY_HOST,
        }
    )
    raw["mapping"]["object"] = "contact"
    config = LoadedConfig(parse(raw), Secrets({"DYNAMICS_CLIENT_SECRET": CLIENT_SECRET}), None)
    with pytest.raises(ConfigError, match="no entity set 'contact'"):
        connect(config).preflight()
    [comparisons] = fake.filters
    assert [(c.attribute, c.value) for c in comparisons] == [("EntitySetName", "contact")]


# ---- Choice (option set) opt-in -----------------------------------------------------------------


@pytest.fixture
def choice_fake(mock: responses.RequestsMock) -> FakeDataverse:
    return FakeDataverse(opt_in_choice=True).install(mock)


def test_choice_opt_in_reads_and_writes_option_values(
    choice_fake: FakeDataverse, connect: Callable[..., DynamicsConnector]
) -> None:
    """Option values map to True/False/unknown on read, and True/False to values on write."""
    yes = choice_fake.add_contact(new_whatsappoptin=OPTED_IN)
    no = choice_fake.add_contact(new_whatsappoptin=OPTED_OUT)
    unset = choice_fake.add_contact(new_whatsappoptin=NOT_SET)
    connector = connect(make_config(values={"opted_in": OPTED_IN, "opted_out": OPTED_OUT}))
    connector.preflight()
    assert choice_fake.calls["metadata"] == 4  # the Choice adds one call for its options
    read = {r.record_id: r.get("opt_in") for r in connector.read_all()}
    assert read == {yes: True, no: False, unset: None}
    results = connector.write(
        [WriteRequest(yes, {"opt_in": False}), WriteRequest(unset, {"opt_in": True})]
    )
    assert all(r.ok for r in results)
    assert choice_fake.patched == [
        {"new_whatsappoptin": OPTED_OUT},
        {"new_whatsappoptin": OPTED_IN},
    ]
    assert choice_fake.records[yes]["new_whatsappoptin"] == OPTED_OUT


def test_choice_opt_in_with_a_value_not_in_the_option_set_fails_preflight(
    choice_fake: FakeDataverse, connect: Callable[..., DynamicsConnector]
) -> None:
    """[mapping.values] must name option values the column really has."""
    with pytest.raises(ConfigError) as caught:
        connect(make_config(values={"opted_in": 1, "opted_out": OPTED_OUT})).preflight()
    assert "mapping.values.opted_in: 1 is not an option value" in str(caught.value)
    assert str(OPTED_IN) in str(caught.value)


def test_choice_opt_in_without_values_fails_preflight(
    choice_fake: FakeDataverse, connect: Callable[..., DynamicsConnector]
) -> None:
    """A Choice opt-in needs mapping.values.opted_in."""
    with pytest.raises(ConfigError, match=r"mapping\.values\.opted_in: required"):
        connect().preflight()


# ---- change tracking ---------------------------------------------------------------------------


def test_change_tracking_reads_the_delta_link_instead_of_filtering(
    fake: FakeDataverse, connect: Callable[..., DynamicsConnector]
) -> None:
    """After a full read, incremental reads follow the delta link: changes only, no $filter."""
    ids = fake.add_contacts(30, modified=T0)
    connector = connect(make_config(change_tracking=True))
    assert len(list(connector.read_all())) == 30
    assert connector.delta_link is not None and "$deltatoken=" in connector.delta_link
    first_link = connector.delta_link
    fake.touch(ids[2], T0 + timedelta(hours=1), new_whatsappoptin=False)
    fake.touch(ids[9], T0 + timedelta(hours=2))
    fake.delete(ids[5])
    changed = list(connector.read_changed_since(T0 + timedelta(days=300), connector.next_cursor()))
    assert sorted(r.record_id for r in changed) == sorted([ids[2], ids[9]])
    assert fake.requests[-1][1] == first_link
    assert fake.filters == []
    assert connector.delta_link != first_link
    assert list(connector.read_changed_since(T0, connector.next_cursor())) == []  # nothing new


def test_expired_delta_token_falls_back_to_a_full_read_with_a_warning(
    fake: FakeDataverse, connect: Callable[..., DynamicsConnector], caplog: pytest.LogCaptureFixture
) -> None:
    """A refused delta link is logged as a warning and replaced by a full tracked read."""
    fake.add_contacts(12, modified=T0)
    connector = connect(make_config(change_tracking=True))
    list(connector.read_all())
    fake.min_delta_version = fake.version + 1
    with caplog.at_level(logging.WARNING, logger="waconsent.connectors.dynamics"):
        again = list(connector.read_changed_since(T0, connector.next_cursor()))
    assert len(again) == 12
    assert any(
        r.getMessage() == "dataverse.delta_link_refused" and r.levelno == logging.WARNING
        for r in caplog.records
    )
    assert connector.delta_link is not None
    assert fake.calls["query"] == 3  # full read, refused delta, full read again


def test_without_a_delta_link_change_tracking_reads_by_modifiedon(
    fake: FakeDataverse, connect: Callable[..., DynamicsConnector]
) -> None:
    """Before any full read (no delta link yet) the incremental read filters on modifiedon."""
    fake.add_contacts(5, modified=T0)
    connector = connect(make_config(change_tracking=True))
    assert (
        list(connector.read_changed_since(T0 + timedelta(hours=1), connector.next_cursor())) == []
    )
    [comparisons] = fake.filters
    assert comparisons[0].attribute == "modifiedon"


def test_change_tracking_off_on_the_table_fails_preflight(
    mock: responses.RequestsMock, connect: Callable[..., DynamicsConnector]
) -> None:
    """dynamics.change_tracking on a table without Track changes is a ConfigError."""
    FakeDataverse(change_tracking_enabled=False).install(mock)
    with pytest.raises(ConfigError, match="change tracking is not enabled"):
        connect(make_config(change_tracking=True)).preflight()


# ---- the wire format, against hand-written answers ----------------------------------------------


def test_batch_answers_map_by_content_id_and_by_position_for_bare_errors() -> None:
    """Change-set answers carry Content-ID; a failed change set's bare error maps by position."""
    ops = [
        batch.Operation(str(n), "PATCH", f"{ORG_URL}/api/data/v9.2/contacts(x{n})", {})
        for n in (1, 2, 3)
    ]
    body = "\r\n".join(
        [
            "--batchresponse_aa",
            "Content-Type: multipart/mixed; boundary=changesetresponse_b1",
            "",
            "--changesetresponse_b1",
            "Content-Type: application/http",
            "Content-Transfer-Encoding: binary",
            "Content-ID: 1",
            "",
            "HTTP/1.1 204 No Content",
            "OData-Version: 4.0",
            "",
            "",
            "--changesetresponse_b1--",
            "--batchresponse_aa",
            "Content-Type: application/http",
            "Content-Transfer-Encoding: binary",
            "",
            "HTTP/1.1 400 Bad Request",
            "Content-Type: application/json; odata.metadata=minimal",
            "",
            '{"error":{"code":"0x80040265","message":"no"}}',
            "--batchresponse_aa",
            "Content-Type: multipart/mixed; boundary=changesetresponse_b3",
            "",
            "--changesetresponse_b3",
            "Content-Type: application/http",
            "Content-Transfer-Encoding: binary",
            "Content-ID: 3",
            "",
            "HTTP/1.1 204 No Content",
            "",
            "",
            "--changesetresponse_b3--",
            "--batchresponse_aa--",
            "",
        ]
    )
    groups = batch.parse("multipart/mixed; boundary=batchresponse_aa", body)
    answers = batch.match(ops, groups)
    assert {cid: a.status for cid, a in answers.items()} == {"1": 204, "2": 400, "3": 204}
    assert answers["2"].error() == ("0x80040265", "no")


def test_batch_request_body_has_one_change_set_per_operation() -> None:
    """Each PATCH sits in its own change set with Content-ID, If-Match and a JSON body."""
    ops = [
        batch.Operation(
            str(n), "PATCH", f"{ORG_URL}/api/data/v9.2/contacts({n})", {"a": n}, {"If-Match": "*"}
        )
        for n in (1, 2)
    ]
    content_type, body = batch.build(ops, boundary="batch_x")
    text = body.decode()
    assert content_type == "multipart/mixed; boundary=batch_x"
    assert text.count("Content-Type: multipart/mixed; boundary=changeset_") == 2
    assert text.count("If-Match: *") == 2 and "Content-ID: 2" in text
    assert text.endswith("--batch_x--\r\n")
    assert '\r\n\r\n{"a":1}\r\n' in text


# ---- configuration around the connector ---------------------------------------------------------


def test_unknown_org_host_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    """An org URL outside the Dynamics domains logs a warning; a real one does not."""
    with caplog.at_level(logging.WARNING):
        DynamicsConnector.from_config(make_config(url="https://crm.example.org")).close()
    assert any(
        "not under a known Dynamics 365 domain" in fields_of(r)["hint"] for r in caplog.records
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        for url in (
            ORG_URL,
            "https://contoso.crm.microsoftdynamics.us",
            "https://contoso.crm.dynamics.cn",
            "https://x.crm.appsplatform.us",
        ):
            DynamicsConnector.from_config(make_config(url=url)).close()
    assert not caplog.records


def test_dynamics_preset_is_complete_and_loads() -> None:
    """The shipped preset parses, maps every logical field and names two phone columns."""
    settings_ = parse(tomllib.loads(PRESET), source="presets/dynamics.toml")
    assert settings_.crm.kind == "dynamics"
    assert set(settings_.mapping.fields.mapped()) == {
        "opt_in",
        "opt_in_date",
        "opt_in_ip",
        "opt_in_source",
        "opt_out_date",
        "last_inbound",
        "session_expires",
        "proof_missing",
        "whatsapp_user_id",
    }
    assert all(v.startswith("new_") for v in settings_.mapping.fields.mapped().values())
    assert settings_.mapping.phone_fields == ("mobilephone", "telephone1")
    assert "new_" in PRESET and "prefix" in PRESET
