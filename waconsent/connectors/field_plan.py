"""What each mapped consent field should be when waconsent creates it: the one plan that
`waconsent fields` turns into Salesforce metadata and Dataverse column bodies.

Pure: it reads the mapping and returns a `PlannedField` per logical field. The kinds chosen
here are the first entries of the mapping checker's `FITTING_TYPES` for the field, so a field
created from this plan is one `waconsent check` and every preflight accept (a test holds the
two tables together). Lengths leave room: an IPv6 address with a zone fits 45 characters, a
source such as `whatsapp:keyword:START:wamid.HBgL...` fits 255, a business-scoped user id
(`US.13491208655302741918`) fits 64; waconsent never truncates evidence, so a short field
would only turn into per-record errors.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from waconsent import domain


class Kind(enum.Enum):
    """What a field holds, in words both CRMs have a type for."""

    CHECKBOX = "checkbox"  # Salesforce Checkbox, Dataverse Yes/No
    CHOICE = "choice"  # Salesforce Picklist, Dataverse Choice: opt_in with [mapping.values]
    DATETIME = "datetime"  # an instant, stored in UTC
    TEXT = "text"  # single-line text with a maximum length


@dataclass(frozen=True, slots=True)
class PlannedField:
    """One field to create: the mapped name, what it holds, and how an admin sees it."""

    logical: str
    name: str  # the CRM name from [mapping.fields]
    kind: Kind
    label: str
    description: str
    length: int | None = None  # TEXT only
    options: tuple[tuple[str, str], ...] = ()  # CHOICE only: (value, label), opted in first
    pascal: str = ""  # the name's words, for a Dataverse SchemaName (WhatsAppOptIn)


@dataclass(frozen=True, slots=True)
class _Spec:
    kind: Kind
    label: str
    description: str
    length: int | None = None
    pascal: str = ""


_SPECS: Mapping[str, _Spec] = {
    domain.OPT_IN: _Spec(
        Kind.CHECKBOX,
        "WhatsApp Opt-In",
        "Explicit opt-in to business-initiated WhatsApp messages. Kept by waconsent: cleared on "
        "STOP or Stop promotions, set by an opt-in keyword. A customer's own message is never "
        "consent.",
        pascal="WhatsAppOptIn",
    ),
    domain.OPT_IN_DATE: _Spec(
        Kind.DATETIME,
        "WhatsApp Opt-In Date",
        "When the WhatsApp opt-in was given (stored in UTC). Part of the proof of consent; the "
        "newest consent change wins.",
        pascal="WhatsAppOptInDate",
    ),
    domain.OPT_IN_IP: _Spec(
        Kind.TEXT,
        "WhatsApp Opt-In IP",
        "IP address (IPv4 or IPv6) the WhatsApp opt-in was given from. Part of the proof of "
        "consent.",
        45,
        "WhatsAppOptInIP",
    ),
    domain.OPT_IN_SOURCE: _Spec(
        Kind.TEXT,
        "WhatsApp Opt-In Source",
        "Where the WhatsApp opt-in was given: a web form, or whatsapp:keyword:<KEYWORD>:<message "
        "id> for a keyword typed in the chat. Part of the proof of consent.",
        255,
        "WhatsAppOptInSource",
    ),
    domain.OPT_OUT_DATE: _Spec(
        Kind.DATETIME,
        "WhatsApp Opt-Out Date",
        "When WhatsApp consent was revoked (STOP, Stop promotions, a marketing stop), stored in "
        "UTC. Written by waconsent.",
        pascal="WhatsAppOptOutDate",
    ),
    domain.LAST_INBOUND: _Spec(
        Kind.DATETIME,
        "WhatsApp Last Inbound",
        "The customer's newest WhatsApp message (UTC). It opens a 24-hour service window and is "
        "never consent.",
        pascal="WhatsAppLastInbound",
    ),
    domain.SESSION_EXPIRES: _Spec(
        Kind.DATETIME,
        "WhatsApp Session Expires",
        "End of the customer service window (UTC): the newest message plus 24 hours, or a longer "
        "free entry point window.",
        pascal="WhatsAppSessionExpires",
    ),
    domain.PROOF_MISSING: _Spec(
        Kind.CHECKBOX,
        "WhatsApp Consent Proof Missing",
        "Set by waconsent while the contact is opted in but lacks the opt-in date, the source, "
        "or the IP address / WhatsApp message id; cleared once the proof is complete.",
        pascal="WhatsAppProofMissing",
    ),
    domain.WHATSAPP_USER_ID: _Spec(
        Kind.TEXT,
        "WhatsApp User Id",
        "Business-scoped WhatsApp user id (BSUID), written by waconsent once the contact is "
        "matched by number.",
        64,
        "WhatsAppUserId",
    ),
}
OPTED_IN_LABEL, OPTED_OUT_LABEL = "Opted In", "Opted Out"


def plan(
    fields: Mapping[str, str], opted_in: str | int | None = None, opted_out: str | int | None = None
) -> list[PlannedField]:
    """The planned field for every mapped logical field, in [mapping.fields] order.

    An `opt_in` with both [mapping.values] becomes a choice of exactly those two values (the
    mapping reads and writes them); with none it is a checkbox. One value alone is refused by
    the checker anyway, so it plans a checkbox and `check` names the missing value.
    """
    planned = []
    for logical, name in fields.items():
        spec = _SPECS[logical]
        kind = spec.kind
        options: tuple[tuple[str, str], ...] = ()
        if logical == domain.OPT_IN and opted_in is not None and opted_out is not None:
            kind = Kind.CHOICE
            options = ((str(opted_in), OPTED_IN_LABEL), (str(opted_out), OPTED_OUT_LABEL))
        planned.append(
            PlannedField(
                logical, name, kind, spec.label, spec.description, spec.length, options, spec.pascal
            )
        )
    return planned
