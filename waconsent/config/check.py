"""Checking a mapping against the CRM's own field metadata (`waconsent check`), as pure data.

Vendors name their types differently (Salesforce `boolean`, Dataverse `Boolean`,
`Picklist`, `DateTime`, ...); each logical field lists the type names that can hold it.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from waconsent import domain
from waconsent.domain import FieldDescription

_TEXT = frozenset({"string", "textarea", "memo", "text", "url", "email", "phone"})
FITTING_TYPES: Mapping[str, frozenset[str]] = {
    **{name: frozenset({"datetime"}) for name in domain.DATETIME_FIELDS},
    domain.OPT_IN: frozenset({"boolean", "picklist", "choice", "state", "status"}),
    domain.PROOF_MISSING: frozenset({"boolean"}),
    domain.OPT_IN_IP: _TEXT,
    domain.OPT_IN_SOURCE: _TEXT,
    domain.WHATSAPP_USER_ID: _TEXT,
}
PHONE_TYPES = _TEXT


@dataclass(frozen=True, slots=True)
class FieldCheck:
    logical: str  # a logical field name, or "phone" for a phone field
    crm_field: str
    problem: str | None  # None when the field is fine
    crm_type: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None


def _suggest(name: str, known: Sequence[str]) -> str:
    by_lower = {k.lower(): k for k in known}
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=3, cutoff=0.6)
    return f"; did you mean {', '.join(by_lower[c] for c in close)}?" if close else ""


def check_mapping(mapped: Mapping[str, str], phone_fields: Sequence[str],
                  described: Mapping[str, FieldDescription]) -> list[FieldCheck]:
    """One line per mapped field: exists, type fits, updateable (phones need only exist)."""
    names = list(described)
    checks = []
    for logical, crm_field in [*mapped.items(), *(("phone", f) for f in phone_fields)]:
        field = described.get(crm_field)
        if field is None:
            checks.append(FieldCheck(logical, crm_field, "no such field on the object"
                                     + _suggest(crm_field, names)))
            continue
        kind = field.type.lower()
        fitting = PHONE_TYPES if logical == "phone" else FITTING_TYPES.get(logical, _TEXT)
        if kind not in fitting:
            problem: str | None = (f"type {field.type} cannot hold {logical} "
                                   f"(expected {' or '.join(sorted(fitting))})")
        elif logical != "phone" and not field.updateable:
            problem = "not updateable by the integration user"
        else:
            problem = None
        checks.append(FieldCheck(logical, crm_field, problem, field.type))
    return checks
