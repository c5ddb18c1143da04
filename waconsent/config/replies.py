"""The `[replies]` section: the confirmation replies to START and STOP typed in the chat.

Kept beside `schema` rather than in it so the section can grow without touching the
shared file; `schema.Settings` holds one `replies` field of this type. The texts are
checked here, once, at load: every placeholder must be one of `PLACEHOLDERS` (a typo such
as `{busines}` would otherwise fail at the first STOP), and every text, filled in, must
fit a WhatsApp text message.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Annotated
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from waconsent.keywords import normalize_text

if TYPE_CHECKING:
    from waconsent.config.schema import Settings

#: what a text may name; the values come from `whatsapp.business_name` and the first
#: configured keyword of each list
PLACEHOLDERS = ("business", "opt_in_keyword", "opt_out_keyword")
#: Meta's limit for the body of a text message (Cloud API reference, "text object")
MAX_TEXT = 4096

DEFAULT_OPT_IN = (
    "You are subscribed to WhatsApp messages from {business}: news and offers will come to "
    "you here on WhatsApp. To stop them at any time, reply {opt_out_keyword}."
)
DEFAULT_OPT_OUT = (
    "You will no longer receive WhatsApp marketing messages from {business}. "
    "To subscribe again, reply {opt_in_keyword}."
)


#: the newest Graph API version when this was written (v27.0, introduced November 4, 2026:
#: https://developers.facebook.com/docs/graph-api/changelog); pin a newer one in the file
DEFAULT_GRAPH_API_VERSION = "v27.0"
DEFAULT_GRAPH_URL = "https://graph.facebook.com"


def _phone_number_id(value: str) -> str:
    if not re.fullmatch(r"\d{1,40}", value.strip()):
        raise ValueError(
            "expected the numeric id of the business phone number (WhatsApp "
            f"Manager > Phone numbers), not the number itself; got {value!r}"
        )
    return value.strip()


def _graph_api_version(value: str) -> str:
    if not re.fullmatch(r"v\d{1,3}\.\d{1,2}", value):
        raise ValueError(
            f"expected a Graph API version such as {DEFAULT_GRAPH_API_VERSION!r}, got {value!r}"
        )
    return value


def _graph_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("https", "http") or not parts.hostname or parts.query:
        raise ValueError(
            f"expected a URL such as {DEFAULT_GRAPH_URL!r} (another only for a "
            f"proxy or a test), got {value!r}"
        )
    return value.rstrip("/")


def _business_name(value: str) -> str:
    if not value.strip() or len(value) > 200:
        raise ValueError("expected the name your customers know you by (1 to 200 characters)")
    return value.strip()


PhoneNumberId = Annotated[str, AfterValidator(_phone_number_id)]
GraphApiVersion = Annotated[str, AfterValidator(_graph_api_version)]
GraphUrl = Annotated[str, AfterValidator(_graph_url)]
BusinessName = Annotated[str, AfterValidator(_business_name)]


def placeholder_problems(text: str) -> Iterator[str]:
    """Why the text cannot be filled in (nothing when it can)."""
    try:
        fields = [
            name
            for _, name, spec, conv in string.Formatter().parse(text)
            if name is not None or spec or conv
        ]
    except ValueError as exc:  # an unmatched brace
        yield f"{exc} (write a literal brace as {{{{ or }}}})"
        return
    for name in fields:
        if name not in PLACEHOLDERS:
            yield (
                f"unknown placeholder {{{name}}}: expected "
                f"{', '.join('{' + p + '}' for p in PLACEHOLDERS)}"
            )


def fill(text: str, values: Mapping[str, str]) -> str:
    """The text with its placeholders filled in (checked at load by `placeholder_problems`)."""
    return text.format_map(values)


class RepliesConfig(BaseModel):
    """`[replies]`. Same model settings as `schema.Section` (not imported from there:
    `schema` imports this module)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    opt_in: str = DEFAULT_OPT_IN
    opt_out: str = DEFAULT_OPT_OUT
    #: keyword (as configured in [whatsapp], or STOP_PROMOTIONS) -> its own text
    keywords: dict[str, str] = Field(default_factory=dict)
    max_age_minutes: int = Field(default=60, ge=1, le=24 * 60)

    @field_validator("opt_in", "opt_out")
    @classmethod
    def _text(cls, value: str) -> str:
        return _checked(value)

    @field_validator("keywords")
    @classmethod
    def _keyword_texts(cls, value: dict[str, str]) -> dict[str, str]:
        problems = [
            f"{key}: {problem}" for key, text in value.items() for problem in _problems(text)
        ]
        if problems:
            raise ValueError("; ".join(problems))
        return value


def _problems(text: str) -> list[str]:
    if not text.strip():
        return ["expected a text, got an empty one"]
    return list(placeholder_problems(text))


def _checked(text: str) -> str:
    problems = _problems(text)
    if problems:
        raise ValueError("; ".join(problems))
    return text


# ---- checks across sections (called from `loading._cross_checks`) -----------------------

#: the keyword a "Stop promotions" tap is recorded with (see `keywords.KeywordRules.classify`)
STOP_PROMOTIONS = "STOP_PROMOTIONS"


def cross_checks(settings: Settings) -> Iterator[str]:
    """What sending replies needs from other sections, and keyword texts that could never
    be used. Nothing is asked of a configuration with replies off."""
    replies = settings.replies
    if not replies.enabled:
        return
    whatsapp = settings.whatsapp
    if not whatsapp.phone_number_id:
        yield (
            "whatsapp.phone_number_id: required when replies.enabled = true (the id of "
            "the business phone number, WhatsApp Manager > Phone numbers, or the App "
            "Dashboard > WhatsApp > API Setup)"
        )
    texts = {
        "replies.opt_in": replies.opt_in,
        "replies.opt_out": replies.opt_out,
        **{f"replies.keywords.{key}": text for key, text in replies.keywords.items()},
    }
    if not whatsapp.business_name and any("{business}" in text for text in texts.values()):
        yield (
            "whatsapp.business_name: required when replies.enabled = true and a reply "
            "text names {business} (the defaults do): the name your customers know you by"
        )
    known = {
        normalize_text(k)
        for k in (
            *whatsapp.opt_in_keywords,
            *whatsapp.opt_out_keywords,
            *whatsapp.opt_in_button_payloads,
            STOP_PROMOTIONS,
        )
    }
    for key in replies.keywords:
        if normalize_text(key) not in known:
            yield (
                f"replies.keywords.{key}: not a keyword of whatsapp.opt_in_keywords, "
                f"whatsapp.opt_out_keywords or whatsapp.opt_in_button_payloads (nor "
                f"{STOP_PROMOTIONS}), so this text would never be sent"
            )
    values = placeholder_values(settings)
    for where, text in texts.items():
        if len(fill(text, values)) > MAX_TEXT:
            yield f"{where}: longer than {MAX_TEXT} characters once filled in (Meta's limit)"


def placeholder_values(settings: Settings) -> dict[str, str]:
    whatsapp = settings.whatsapp
    return {
        "business": whatsapp.business_name or "",
        "opt_in_keyword": next(iter(whatsapp.opt_in_keywords), "START"),
        "opt_out_keyword": next(iter(whatsapp.opt_out_keywords), "STOP"),
    }
