"""Matching numbers and user ids: E.164 from anything typed, wa_id variants of Brazil and Mexico."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from waconsent.domain import Activity, CrmRecord, Event, EventKind, Signal
from waconsent.phones import UnparseablePhone, mask, phone_key, wa_id_key
from waconsent.sync.matching import event_keys, record_keys
from waconsent.sync.rules import decide


@pytest.mark.parametrize(
    "raw",
    [
        "0151 23456789",
        "+49 (0)151-234 567 89",
        "004915123456789",
        "+4915123456789",
        "0151/23456789",
        "+49 0151 23456789",
        "+49015123456789",
    ],
)
def test_crm_spellings_normalize_to_one_key(raw: str) -> None:
    """Everything people type for one German mobile becomes the same E.164 key."""
    assert phone_key(raw, "DE") == "+4915123456789"


def test_wa_id_is_e164_without_plus() -> None:
    """A wa_id matches the CRM number it stands for."""
    assert wa_id_key("4915123456789") == phone_key("0151 23456789", "DE")


@pytest.mark.parametrize(
    ("wa_id", "crm"),
    [
        ("551187654321", "+55 11 98765 4321"),  # Brazil: wa_id without the ninth digit
        ("5511987654321", "+55 11 8765 4321"),  # and the CRM without it
        ("5215512345678", "+52 55 1234 5678"),  # Mexico: 521 + 10 digits
        ("525512345678", "+52 1 55 1234 5678"),  # and the CRM with the 1
    ],
)
def test_brazil_and_mexico_variants_match(wa_id: str, crm: str) -> None:
    """The known Brazil and Mexico differences still match."""
    assert wa_id_key(wa_id) == phone_key(crm, "DE")


def test_brazil_landline_is_not_rewritten() -> None:
    """Only mobiles gain the ninth digit; a landline (starting 2-5) is left alone."""
    assert wa_id_key("551134567890") == "+551134567890"


def test_wa_id_called_invalid_by_phonenumbers_is_kept() -> None:
    """A wa_id is never rejected for being 'invalid'; only non-digits match nothing."""
    assert wa_id_key("99912345678") == "+99912345678"
    assert wa_id_key("<WHATSAPP_USER_PHONE_NUMBER>") is None


@pytest.mark.parametrize("junk", ["n/a", "call me", "123", ""])
def test_junk_is_unparseable(junk: str) -> None:
    """Junk in a phone field raises UnparseablePhone."""
    with pytest.raises(UnparseablePhone):
        phone_key(junk, "DE")


def test_record_keys_report_problems_masked() -> None:
    """A record's junk phone is reported masked; its good phone and user id still count."""
    keys = record_keys("R1", {"MobilePhone": "0151 23456789", "Phone": "ask Tom"}, "US.5", "DE")
    assert keys.key_set == {"+4915123456789", "uid:US.5"}
    assert keys.problems[0].field == "Phone" and "ask" not in keys.problems[0].masked_value


def test_injection_shaped_phone_is_just_junk() -> None:
    """A value shaped like a query injection is an unparseable phone, nothing more."""
    with pytest.raises(UnparseablePhone):
        phone_key("0151' OR Name != '", "DE")


def test_mask_keeps_last_three() -> None:
    """Masked numbers keep only their last three characters."""
    assert mask("+4915123456789") == "***********789"


# ---- property: a revocation reaches every record carrying the number -------------------------

SPELLINGS = (
    "0151 {a} {b}",
    "+49 151 {a}{b}",
    "0049151{a}{b}",
    "+49 (0)151-{a}-{b}",
    "0151/{a}{b}",
    "+49151{a}{b}",
)
NUMBER_A, NUMBER_B = ("2345", "6789"), ("9876", "5432")


def spelled(number: tuple[str, str], style: int) -> str:
    return SPELLINGS[style % len(SPELLINGS)].format(a=number[0], b=number[1])


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.booleans(), st.integers(0, 5), st.sampled_from(["m", "p"])),
        min_size=1,
        max_size=12,
    )
)
def test_revocation_reaches_every_record_with_the_number(
    shapes: list[tuple[bool, int, str]],
) -> None:
    """Whatever the spelling or phone field, every record with the STOP's number is revoked,
    and no record without it is touched."""
    stop = Event(
        key="msg:wamid.S",
        kind=EventKind.MESSAGE,
        occurred_at=datetime(2026, 11, 27, tzinfo=UTC),
        wa_id="4915123456789",
        message_id="wamid.S",
        signal=Signal.OPT_OUT,
        keyword="STOP",
        opens_session=True,
    )
    stop_keys = set(event_keys(stop))
    for index, (carries, style, field) in enumerate(shapes):
        number = spelled(NUMBER_A if carries else NUMBER_B, style)
        phones = {
            "MobilePhone": number if field == "m" else None,
            "Phone": number if field == "p" else "0170 1112233",
        }
        keys = record_keys(f"R{index}", phones, None, "DE")
        matched = [stop] if keys.key_set & stop_keys else []
        record = CrmRecord(f"R{index}", {"opt_in": True}, phones)
        decision = decide(
            record,
            Activity.of(matched),
            {"opt_in", "opt_out_date"},
            datetime(2026, 11, 28, tzinfo=UTC),
        )
        changes = {c.field: c.new for c in decision.changes}
        assert (changes.get("opt_in") is False) is carries
