"""The one mapping checker (waconsent/config/check.py), as pure rules over field descriptions."""

from __future__ import annotations

from waconsent.config.check import (
    DATAVERSE,
    LEDGER,
    SALESFORCE,
    MappingUnderCheck,
    check_mapping,
    near_names,
    problem_lines,
)
from waconsent.domain import FieldDescription

SALESFORCE_NAMES = (
    "Id",
    "Name",
    "MobilePhone",
    "Phone",
    "Email",
    "WhatsApp_Opt_In__c",
    "WhatsApp_Opt_In_Date__c",
    "WhatsApp_Opt_In_IP__c",
    "WhatsApp_Opt_In_Source__c",
    "WhatsApp_Opt_Out_Date__c",
)


def test_check_mapping_names_bad_fields_and_suggests() -> None:
    """The field check names a missing field with a near name, a wrong type and a read-only one."""
    described = {
        "WhatsApp_Opt_In__c": FieldDescription("WhatsApp_Opt_In__c", "boolean"),
        "WhatsApp_Opt_Out_Date__c": FieldDescription("WhatsApp_Opt_Out_Date__c", "string"),
        "Source__c": FieldDescription("Source__c", "string", updateable=False),
        "MobilePhone": FieldDescription("MobilePhone", "phone"),
    }
    mapping = MappingUnderCheck(
        SALESFORCE,
        "object Contact",
        {
            "opt_in": "WhatsApp_Opt_In__c",
            "opt_in_date": "WhatsApp_Opt_In_Dte__c",
            "opt_out_date": "WhatsApp_Opt_Out_Date__c",
            "opt_in_source": "Source__c",
        },
        ["MobilePhone", "Fax"],
    )
    verdicts = {v.crm_field: v.problems for v in check_mapping(mapping, described)}
    assert verdicts["WhatsApp_Opt_In__c"] == () and verdicts["MobilePhone"] == ()
    assert (
        "did you mean 'WhatsApp_Opt_In__c' or 'WhatsApp_Opt_Out_Date__c'?"
        in verdicts["WhatsApp_Opt_In_Dte__c"][0]
    )
    assert verdicts["WhatsApp_Opt_Out_Date__c"] == (
        "'WhatsApp_Opt_Out_Date__c' is a string field; expected datetime for opt_out_date",
    )
    assert verdicts["Source__c"] == (
        "'Source__c' cannot be updated (not updateable for this "
        "user: a formula field, or field-level security)",
    )
    assert verdicts["Fax"] == ("object Contact has no field 'Fax'",)


def test_near_names_give_one_clear_match_or_the_tied_few() -> None:
    """One name when one is clearly meant, a case-only difference alone, ties together."""
    assert near_names("WhatsApp_OptIn_Date__c", SALESFORCE_NAMES) == ["WhatsApp_Opt_In_Date__c"]
    assert near_names("mobilephone", SALESFORCE_NAMES) == ["MobilePhone"]
    assert near_names("WhatsApp_Opt_Out__c", SALESFORCE_NAMES) == [
        "WhatsApp_Opt_Out_Date__c",
        "WhatsApp_Opt_In__c",
    ]
    assert near_names("Fax", SALESFORCE_NAMES) == []


def test_a_case_only_difference_is_named_as_such() -> None:
    """A name right but for its case is refused (the connectors match exactly) with the fix."""
    mapping = MappingUnderCheck(DATAVERSE, "the contact entity", {}, ["MobilePhone"])
    [verdict] = check_mapping(mapping, {"mobilephone": FieldDescription("mobilephone", "String")})
    assert verdict.problems == (
        "the contact entity has no attribute 'MobilePhone' "
        "(did you mean 'mobilephone'? the case matters)",
    )


def test_an_option_opt_in_needs_both_values_among_its_options() -> None:
    """A picklist / Choice opt-in needs opted_in and opted_out, each one of its options."""
    choice = FieldDescription("new_optin", "Picklist", options=("100000000", "100000001"))
    mapping = MappingUnderCheck(
        DATAVERSE,
        "the contact entity",
        {"opt_in": "new_optin"},
        [],
        opted_in=100000000,
        opted_out=None,
    )
    assert problem_lines(check_mapping(mapping, {"new_optin": choice})) == [
        "mapping.values.opted_out: required when mapping.fields.opt_in is the Picklist "
        "attribute 'new_optin': the option that means opted out (one of 100000000, 100000001)"
    ]
    wrong = MappingUnderCheck(
        DATAVERSE,
        "the contact entity",
        {"opt_in": "new_optin"},
        [],
        opted_in="100000000",
        opted_out=7,
    )
    assert problem_lines(check_mapping(wrong, {"new_optin": choice})) == [
        "mapping.values.opted_out: 7 is not an option value of 'new_optin' "
        "(expected one of 100000000, 100000001)"
    ]


def test_values_are_not_checked_for_a_checkbox_opt_in() -> None:
    """[mapping.values] matters only when the opt-in holds options; a checkbox ignores it."""
    mapping = MappingUnderCheck(LEDGER, "the ledger", {"opt_in": "opt_in"}, [], opted_in="x")
    verdicts = check_mapping(mapping, {"opt_in": FieldDescription("opt_in", "boolean")})
    assert [(v.key, v.ok) for v in verdicts] == [("mapping.fields.opt_in", True)]
