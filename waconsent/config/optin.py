"""The `[optin]` section: the website opt-in (issue 15), a form whose request records date
and IP, confirmed by the person sending `<keyword> <token>` from their own WhatsApp.

Kept beside `schema` (like `[replies]`) so the section can grow without touching the shared
file; `schema.Settings` holds one `optin` field of this type. What needs other sections (the
keyword must be an opt-in keyword, the path must not be the webhook's) is checked in
`cross_checks`, called from `loading`.
"""

from __future__ import annotations

import ipaddress
import re
import string
from collections.abc import Iterator
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from waconsent.keywords import normalize_text

if TYPE_CHECKING:
    from waconsent.config.schema import Settings

DEFAULT_WORDING = (
    "Yes, {business} may send me news and offers on WhatsApp. I can withdraw this consent at "
    "any time by replying STOP in the chat."
)
#: what a form id may hold: it becomes part of `opt_in_source`, which is split at ':'
FORM_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAX_WORDING = 2000


#: a proxy on the same host: the default of every `trusted_proxies`
LOOPBACK_PROXIES = ("127.0.0.1/32", "::1/128")


def _form_id(value: str) -> str:
    if not FORM_ID.fullmatch(value):
        raise ValueError(
            "expected 1 to 64 letters, digits, '_', '.' or '-' (it becomes part "
            f"of opt_in_source), got {value!r}"
        )
    return value


class OptinConfig(BaseModel):
    """`[optin]`: off unless enabled; served on the webhook's port by `webhook` and `serve`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    path: str = "/optin"
    business_number: str | None = None  # digits, the number people send the keyword to
    form_id: str = "website"
    wording: str = DEFAULT_WORDING
    keyword: str | None = None  # default: the first of whatsapp.opt_in_keywords
    token_ttl_hours: int = Field(default=72, ge=1, le=24 * 90)
    allowed_origins: tuple[str, ...] = ()
    trusted_proxies: tuple[str, ...] = LOOPBACK_PROXIES
    rate_per_minute: int = Field(default=10, ge=1, le=10_000)

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not re.fullmatch(r"(/[A-Za-z0-9_.~-]+)+", value):
            raise ValueError(f"expected a path such as '/optin' (no trailing '/'), got {value!r}")
        return value

    @field_validator("business_number")
    @classmethod
    def _digits(cls, value: str | None) -> str | None:
        if value is None:
            return None
        digits = value.strip().removeprefix("+")
        if not re.fullmatch(r"[1-9]\d{6,14}", digits):
            raise ValueError(
                "expected the business's WhatsApp number in international form, "
                f"digits only (as in https://wa.me/4915112345678), got {value!r}"
            )
        return digits

    @field_validator("form_id")
    @classmethod
    def _form(cls, value: str) -> str:
        return _form_id(value)

    @field_validator("wording")
    @classmethod
    def _wording(cls, value: str) -> str:
        if not value.strip() or len(value) > MAX_WORDING:
            raise ValueError(f"expected the consent text shown, 1 to {MAX_WORDING} characters")
        names = {name for _, name, _, _ in string.Formatter().parse(value) if name is not None}
        if names - {"business"}:
            raise ValueError(
                f"the only placeholder is {{business}}, got "
                f"{', '.join(sorted('{' + n + '}' for n in names - {'business'}))}"
            )
        return value

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        for value in values:
            parts = urlsplit(value)
            if (
                parts.scheme not in ("https", "http")
                or not parts.hostname
                or parts.path not in ("", "/")
                or parts.query
                or parts.fragment
            ):
                raise ValueError(
                    f"expected origins such as 'https://www.example.com', got {value!r}"
                )
        return tuple(value.rstrip("/") for value in values)

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        return proxy_list(values)


def proxy_list(values: tuple[str, ...]) -> tuple[str, ...]:
    """A `trusted_proxies` setting checked as `web_guard.trusted_networks` will read it
    (`[optin]` and `[api]` alike)."""
    for entry in values:
        try:
            ipaddress.ip_network(entry.strip(), strict=False)
        except ValueError:
            raise ValueError(
                f"expected IP addresses or networks such as '10.0.0.0/8', got {entry!r}"
            ) from None
    return values


def keyword_of(settings: Settings) -> str:
    """The keyword the link prefills: `[optin] keyword`, else the first opt-in keyword."""
    return (
        (settings.optin.keyword or next(iter(settings.whatsapp.opt_in_keywords), "START"))
        .strip()
        .upper()
    )


def business_of(settings: Settings) -> str:
    """What `{business}` reads as: `whatsapp.business_name`, else the number itself."""
    return settings.whatsapp.business_name or f"+{settings.optin.business_number or ''}"


def cross_checks(settings: Settings) -> Iterator[str]:
    """What the opt-in needs from other sections; nothing is asked while it is off."""
    optin = settings.optin
    if not optin.enabled:
        return
    if not optin.business_number:
        yield (
            "optin.business_number: required when optin.enabled = true (the WhatsApp "
            "number people confirm to, digits only, e.g. '4915112345678')"
        )
    keywords = {normalize_text(k) for k in settings.whatsapp.opt_in_keywords}
    if optin.keyword is not None and normalize_text(optin.keyword) not in keywords:
        yield (
            f"optin.keyword: {optin.keyword!r} is not one of whatsapp.opt_in_keywords, so "
            "the confirmation would not count as an opt-in"
        )
    if optin.path == settings.webhook.path or optin.path == "/healthz":
        yield f"optin.path: {optin.path!r} is already the webhook's or the health check's path"
