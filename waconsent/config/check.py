"""The one mapping checker: does each mapped CRM field exist, fit its logical field, and take
writes? Pure: it reads a connector's `describe_fields()` and the mapping, and returns verdicts.

`waconsent check` prints these verdicts and every connector's `preflight()` raises them, both
through the connector's `mapping_verdicts()`, so the two cannot disagree. Vendors name their
types differently; `FITTING_TYPES` is the one table of which vendor types can hold each
logical field, and each entry is there because the connector reads and writes that type
correctly (the reasons stand beside the rows). What only one vendor has stays in its module
and is appended there as one more verdict (Dataverse change tracking).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from difflib import SequenceMatcher
from typing import Literal

from waconsent import domain
from waconsent.domain import FieldDescription
from waconsent.errors import ConfigError

CrmKind = Literal["salesforce", "dynamics", "ledger"]
#: the checker's name for a field listed in `mapping.phone_fields`
PHONE = "phone"
TypeColumn = Mapping[CrmKind, tuple[str, ...]]

# Consent is a yes/no: a checkbox, or one option of a single-choice list naming both answers
# in [mapping.values]. Refused: a multi-select picklist (a write replaces every selected
# value, and a record with two selected reads as unknown), Dataverse State / Status
# (`statecode` deactivates the whole record, and a `statuscode` must belong to the record's
# state; neither takes the plain option value the connector PATCHes, which writes only
# Boolean and Picklist), and free text (whatever a user types but true / false reads as
# unknown, and the Dataverse connector reads any non-empty text as true).
_CONSENT: TypeColumn = {
    "salesforce": ("boolean", "picklist"),
    "dynamics": ("Boolean", "Picklist"),
    "ledger": ("boolean",),
}
_FLAG: TypeColumn = {"salesforce": ("boolean",), "dynamics": ("Boolean",), "ledger": ("boolean",)}
# Newest wins compares instants to the second. A date-only field cannot order a STOP and a
# re-subscription of the same day, and reads back as midnight, so every run would see a
# change and write again: dates are refused.
_MOMENT: TypeColumn = {
    "salesforce": ("datetime",),
    "dynamics": ("DateTime",),
    "ledger": ("datetime",),
}
# Evidence text (IP, source) is written and read back whole. Salesforce `encryptedstring`
# (classic encrypted text, at most 175 characters) takes writes like any text; the
# integration user needs "View Encrypted Data" to read it unmasked. A URL field takes any
# text through the API. Refused: email (Salesforce validates the address, so every write
# fails INVALID_EMAIL_ADDRESS) and phone (an IP or source in a phone field is a mis-mapping).
_EVIDENCE: TypeColumn = {
    "salesforce": ("string", "textarea", "encryptedstring", "url"),
    "dynamics": ("String", "Memo"),
    "ledger": ("string",),
}
# The user id is also searched by value (SOQL `=`, OData `eq`) in targeted runs: single-line text
# only, since neither a long text area nor a classic encrypted field can be filtered.
_KEY: TypeColumn = {"salesforce": ("string",), "dynamics": ("String",), "ledger": ("string",)}
# A phone field is only read, and searched with LIKE / contains() for numbers no sync has
# indexed yet: single-line text or Salesforce's phone type. It need not be updateable.
_PHONE: TypeColumn = {
    "salesforce": ("phone", "string"),
    "dynamics": ("String",),
    "ledger": ("string",),
}

#: logical field (or PHONE) -> CRM kind -> the types, in the CRM's own spelling, that hold it
FITTING_TYPES: Mapping[str, TypeColumn] = {
    domain.OPT_IN: _CONSENT,
    domain.PROOF_MISSING: _FLAG,
    **{name: _MOMENT for name in sorted(domain.DATETIME_FIELDS)},
    domain.OPT_IN_IP: _EVIDENCE,
    domain.OPT_IN_SOURCE: _EVIDENCE,
    domain.WHATSAPP_USER_ID: _KEY,
    PHONE: _PHONE,
}
#: the opt-in types whose values are options: they need both [mapping.values], because a
#: revocation can only be written when the option meaning "opted out" is known
OPTION_TYPES: Mapping[CrmKind, tuple[str, ...]] = {
    "salesforce": ("picklist",),
    "dynamics": ("Picklist",),
    "ledger": (),
}


@dataclass(frozen=True, slots=True)
class Crm:
    """How one CRM speaks in messages, and which column of the type table is its own."""

    kind: CrmKind
    noun: str  # what the CRM calls a field
    read_only: str  # why it says a field cannot be updated, in its words


SALESFORCE = Crm(
    "salesforce", "field", "not updateable for this user: a formula field, or field-level security"
)
DATAVERSE = Crm("dynamics", "attribute", "IsValidForUpdate is false")
LEDGER = Crm("ledger", "column", "the ledger maintains it itself")


@dataclass(frozen=True, slots=True)
class MappingUnderCheck:
    """The mapping as one connector holds it, and where it points."""

    crm: Crm
    where: str  # the object, as messages name it: "object Contact"
    fields: Mapping[str, str]  # logical -> CRM field name
    phone_fields: Sequence[str]
    opted_in: str | int | None = None
    opted_out: str | int | None = None


@dataclass(frozen=True, slots=True)
class Verdict:
    """The checker's word on one configuration key: fine, or every problem with it.

    `key` is the key path an admin edits (`mapping.fields.opt_in`, `mapping.phone_fields`,
    `mapping.values.opted_out`, `dynamics.change_tracking`); each problem says what is
    wrong and what is expected, and reads after `key: `.
    """

    key: str
    crm_field: str
    crm_type: str | None = None
    problems: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems


def problem_lines(verdicts: Iterable[Verdict]) -> list[str]:
    """`key: problem`, one line per problem, in verdict order: what ConfigError lists."""
    return [f"{verdict.key}: {problem}" for verdict in verdicts for problem in verdict.problems]


def require_fit(verdicts: Iterable[Verdict], source: str) -> None:
    """Raise one ConfigError listing every problem; return when there is none."""
    lines = problem_lines(verdicts)
    if lines:
        raise ConfigError(lines, source=source)


def near_names(
    name: str, known: Iterable[str], *, cutoff: float = 0.75, margin: float = 0.05, limit: int = 3
) -> list[str]:
    """The known names an admin most likely meant by `name`, best first.

    A name that differs only in case is the answer alone. Otherwise the nearest name above
    `cutoff`, and those about as near (within `margin`): one name when one is clearly
    meant, the few candidates when the CRM's names share a long prefix and it is a guess.
    """
    by_lower = {candidate.lower(): candidate for candidate in known}
    lowered = name.lower()
    if lowered in by_lower:
        return [by_lower[lowered]]
    matcher = SequenceMatcher(b=lowered)
    scored = []
    for candidate in by_lower:
        matcher.set_seq1(candidate)
        if matcher.real_quick_ratio() >= cutoff and matcher.quick_ratio() >= cutoff:
            ratio = matcher.ratio()
            if ratio >= cutoff:
                scored.append((ratio, candidate))
    scored.sort(key=lambda item: (-item[0], item[1]))
    best = scored[0][0] if scored else 0.0
    return [by_lower[candidate] for ratio, candidate in scored[:limit] if ratio >= best - margin]


def _did_you_mean(name: str, known: Iterable[str]) -> str:
    """` (did you mean 'A' or 'B'?)`, or nothing when no name is near."""
    near = near_names(name, known)
    if not near:
        return ""
    quoted = [repr(n) for n in near]
    listed = quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"
    case = " the case matters" if near[0].lower() == name.lower() else ""
    return f" (did you mean {listed}?{case})"


def check_mapping(
    mapping: MappingUnderCheck, described: Mapping[str, FieldDescription]
) -> list[Verdict]:
    """One verdict per mapped field and phone field, then one per [mapping.values] entry
    when the opt-in holds options. Fields must exist under their exact name (the
    connectors read and write by it), fit `FITTING_TYPES`, and take updates (phone fields
    are only read)."""
    verdicts = [
        _field(mapping, f"mapping.fields.{logical}", logical, name, described)
        for logical, name in mapping.fields.items()
    ]
    verdicts += [
        _field(mapping, "mapping.phone_fields", PHONE, name, described)
        for name in mapping.phone_fields
    ]
    return verdicts + _option_values(mapping, described)


def _field(
    mapping: MappingUnderCheck,
    key: str,
    logical: str,
    name: str,
    described: Mapping[str, FieldDescription],
) -> Verdict:
    crm = mapping.crm
    field = described.get(name)
    if field is None:
        return Verdict(
            key,
            name,
            None,
            (f"{mapping.where} has no {crm.noun} {name!r}" + _did_you_mean(name, described),),
        )
    problems = []
    fitting = FITTING_TYPES[logical][crm.kind]
    if field.type not in fitting:
        what = "a phone number" if logical == PHONE else logical
        problems.append(
            f"{name!r} is {_article(field.type)} {field.type} {crm.noun}; "
            f"expected {' or '.join(fitting)} for {what}"
        )
    if logical != PHONE and not field.updateable:
        problems.append(f"{name!r} cannot be updated ({crm.read_only})")
    return Verdict(key, name, field.type, tuple(problems))


def _article(word: str) -> str:
    """'an email field', 'an Integer attribute', 'a url field', 'a String attribute'."""
    return "an" if word[:1].lower() in ("a", "e", "i", "o") else "a"


def _option_values(
    mapping: MappingUnderCheck, described: Mapping[str, FieldDescription]
) -> list[Verdict]:
    """[mapping.values] must name options the opt-in field has, both of them: reading
    compares with them, and a revocation is written as the "opted out" one."""
    name = mapping.fields.get(domain.OPT_IN)
    field = described.get(name) if name else None
    if field is None or field.type not in OPTION_TYPES[mapping.crm.kind]:
        return []
    listed = ", ".join(field.options)
    verdicts = []
    for which, value in (("opted_in", mapping.opted_in), ("opted_out", mapping.opted_out)):
        problem: str | None = None
        if value is None:
            problem = (
                f"required when mapping.fields.opt_in is the {field.type} "
                f"{mapping.crm.noun} {field.name!r}: the option that means "
                f"{which.replace('_', ' ')} (one of {listed})"
            )
        elif str(value) not in field.options:
            problem = (
                f"{value!r} is not an option value of {field.name!r} (expected one of {listed})"
            )
        verdicts.append(
            Verdict(
                f"mapping.values.{which}", field.name, field.type, (problem,) if problem else ()
            )
        )
    return verdicts
