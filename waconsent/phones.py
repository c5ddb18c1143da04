"""Phone numbers and WhatsApp ids as match keys: one canonical E.164 key per line.

A CRM number is whatever somebody typed; a `wa_id` is E.164 digits without the
plus. Both become one *match key*, so that the same line matches whatever the
spelling, including WhatsApp's known Brazil (mobile "9") and Mexico ("521")
differences. A `wa_id` is never refused because phonenumbers calls it invalid.
Parsing costs ~20 us, so recent results are cached by the raw string, and the store's
phone index remembers them between runs. The cache is small on purpose: at 200,000
entries it was most of what a million-contact onboarding run needed beyond streaming the
contacts, for almost no hits.
"""

from __future__ import annotations

import re
from functools import lru_cache

import phonenumbers

USER_ID_PREFIX = "uid:"
_DIGITS = re.compile(r"[1-9]\d{6,14}")
_BRAZIL_OLD_MOBILE = re.compile(r"\+55(\d{2})([6-9]\d{7})")
_MEXICO_MOBILE = re.compile(r"\+521(\d{10})")


def canonical(e164: str) -> str:
    """One key per line: Brazil mobiles with the ninth digit, Mexico without the '1'."""
    if e164.startswith("+55"):
        old = _BRAZIL_OLD_MOBILE.fullmatch(e164)
        if old:
            return f"+55{old.group(1)}9{old.group(2)}"
    elif e164.startswith("+521"):
        mexico = _MEXICO_MOBILE.fullmatch(e164)
        if mexico:
            return f"+52{mexico.group(1)}"
    return e164


def wa_id_key(wa_id: str | None) -> str | None:
    """A wa_id is E.164 without the plus; anything but digits (a placeholder) matches nothing."""
    if wa_id is None:
        return None
    digits = wa_id.strip().removeprefix("+")
    if not _DIGITS.fullmatch(digits):
        return None
    return canonical("+" + digits)


def user_id_key(user_id: str | None) -> str | None:
    return f"{USER_ID_PREFIX}{user_id}" if user_id else None


class UnparseablePhone(ValueError):
    """A CRM phone value that is no possible number (kept raw for the report)."""


@lru_cache(maxsize=10_000)
def phone_key(raw: str, default_region: str) -> str:
    """Canonical key of a CRM phone value; raises UnparseablePhone for junk like 'n/a'."""
    # Even a string that looks like E.164 goes through the parser: "+4901512345678" (a
    # trunk 0 typed after the country code) is +491512345678 to WhatsApp.
    text = raw.strip()
    try:
        number = phonenumbers.parse(text, default_region)
    except phonenumbers.NumberParseException as exc:
        raise UnparseablePhone(str(exc)) from None
    e164 = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    possible = (
        phonenumbers.is_possible_number_with_reason(number)
        == phonenumbers.ValidationResult.IS_POSSIBLE
    )
    if not possible and canonical(e164) == e164:
        # a known WhatsApp variant (Mexico's old '1') is kept even though it is no longer
        # a possible number; anything else this short or long is junk
        raise UnparseablePhone("not a possible number for its region")
    return canonical(e164)


#: Digits a stored number is searched by: the last 8 are the same in every spelling the
#: matching accepts (Brazil's ninth digit and Mexico's "1" come before them).
SEARCH_DIGITS = 8


def search_digits(key: str) -> str | None:
    """The digits to look a phone key up by in a CRM's unnormalized phone fields, in
    order, each allowed to stand among any other characters (spaces, dashes, a trunk "(0)");
    None for a user-id key. A search by them finds a superset: confirm by the key."""
    if key.startswith(USER_ID_PREFIX):
        return None
    digits = "".join(ch for ch in key if ch.isdigit())
    return digits[-SEARCH_DIGITS:] or None


def like_pattern(digits: str) -> str:
    """A SQL LIKE pattern matching any text that holds `digits` in order: '%1%2%3%'."""
    return "%" + "%".join(digits) + "%"


def lookup_keys(text: str, default_region: str) -> list[str]:
    """What a person typed to look somebody up (`waconsent proof`, the consent API): a
    number in any spelling, a wa_id (digits without '+'), or a business-scoped user id
    such as US.1234...; ValueError naming the masked input otherwise."""
    value = text.strip()
    candidate = "+" + value if value.isdigit() and not value.startswith("0") else value
    try:
        return [phone_key(candidate, default_region)]
    except UnparseablePhone:
        if "." in value and " " not in value:
            return [user_id_key(value) or value]
        raise ValueError(
            f"{mask(value)} is neither a phone number nor a WhatsApp user id (such as US.1234...)"
        ) from None


_WA_ID_FORM = re.compile(r"[1-9]\d{6,14}")
_LAYOUT = str.maketrans("", "", " -().\u00a0/")


def quick_key(text: str) -> str | None:
    """The key of a number written the way sending tools hold them, without the parser
    (~30 us a number): a wa_id (digits only) or E.164 (a '+', digits, and spaces, dashes,
    dots, slashes or parentheses between them). None for any other form (a national number
    such as 0151 ..., a user id), which `lookup_keys` reads. A misspelt E.164 (a trunk
    "(0)" after the country code) gives a key no record carries: the pre-send check parses
    such a number in full when a record's number ends with the same digits."""
    value = text.strip()
    if value.startswith("+"):
        value = value[1:].translate(_LAYOUT)
    if not _WA_ID_FORM.fullmatch(value):
        return None
    return canonical("+" + value)


def mask(value: str) -> str:
    """Phone numbers in logs and reports keep only the last three characters."""
    text = value.strip()
    if len(text) <= 3:
        return "*" * len(text)
    return "*" * (len(text) - 3) + text[-3:]
