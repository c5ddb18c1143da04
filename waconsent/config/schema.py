"""The configuration's shape (SPEC section 4), validated by pydantic and frozen after load."""

from __future__ import annotations

from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import phonenumbers
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from waconsent import domain
from waconsent.config.optin import (  # issue 15: the website opt-in
    LOOPBACK_PROXIES,
    OptinConfig,
    proxy_list,
)
from waconsent.config.replies import (  # issue 14: the reply channel
    DEFAULT_GRAPH_API_VERSION,
    DEFAULT_GRAPH_URL,
    BusinessName,
    GraphApiVersion,
    GraphUrl,
    PhoneNumberId,
    RepliesConfig,
)
from waconsent.keywords import normalize_text


class Section(BaseModel):
    """Every section refuses unknown keys (typos surface) and is immutable once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class StoreConfig(Section):
    url: str = "sqlite:///waconsent.db"

    @field_validator("url")
    @classmethod
    def _known_dialect(cls, value: str) -> str:
        if not value.startswith(("sqlite:", "postgresql")):
            raise ValueError("expected a sqlite:/// or postgresql+psycopg:// URL")
        return value


class CrmConfig(Section):
    kind: Literal["salesforce", "dynamics", "ledger"] = "ledger"


class SalesforceConfig(Section):
    instance_url: str | None = None
    api_version: str = "62.0"
    auth: Literal["password", "jwt", "client_credentials", "access_token"] = "jwt"
    username: str | None = None
    consumer_key: str | None = None
    private_key_file: str | None = None
    domain: str = "login"
    bulk_query_threshold: int = Field(default=50_000, ge=1)
    bulk_write_threshold: int = Field(default=10_000, ge=1)


class DynamicsConfig(Section):
    url: str | None = None
    tenant_id: str | None = None
    client_id: str | None = None
    auth: Literal["client_secret", "certificate", "access_token"] = "client_secret"
    authority_host: str = "https://login.microsoftonline.com"
    certificate_thumbprint: str | None = None
    api_version: str = "9.2"
    max_concurrency: int = Field(default=4, ge=1, le=52)
    change_tracking: bool = False
    batch_size: int = Field(default=1000, ge=1, le=1000)  # operations per $batch


class MappingFields(Section):
    """CRM field names for each logical consent field; any may be left out."""

    opt_in: str | None = None
    opt_in_date: str | None = None
    opt_in_ip: str | None = None
    opt_in_source: str | None = None
    opt_out_date: str | None = None
    last_inbound: str | None = None
    session_expires: str | None = None
    proof_missing: str | None = None
    whatsapp_user_id: str | None = None

    def mapped(self) -> dict[str, str]:
        """Logical name -> CRM field name, for the fields that are mapped."""
        return {k: v for k, v in self.model_dump().items() if v}


class MappingValues(Section):
    """Picklist / option-set values that stand for opted in and opted out."""

    opted_in: str | int | None = None
    opted_out: str | int | None = None


class MappingConfig(Section):
    object: str | None = None
    phone_fields: tuple[str, ...] = ("MobilePhone", "Phone")
    default_region: str = "DE"
    fields: MappingFields = MappingFields()
    values: MappingValues = MappingValues()

    @field_validator("default_region")
    @classmethod
    def _known_region(cls, value: str) -> str:
        region = value.upper()
        if region not in phonenumbers.SUPPORTED_REGIONS:
            raise ValueError(f"expected a two-letter region code such as 'DE', got {value!r}")
        return region


def _normalized_words(words: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(normalize_text(w) for w in words)


class WhatsappConfig(Section):
    opt_in_keywords: tuple[str, ...] = ("START",)
    opt_out_keywords: tuple[str, ...] = ("STOP", "UNSUBSCRIBE")
    stop_button_labels: tuple[str, ...] = ("Stop promotions",)
    #: button ids / quick-reply payloads that the business's own opt-in message uses; a
    #: payload is chosen by the business, so it grants consent only when listed here
    opt_in_button_payloads: tuple[str, ...] = ()
    # issue 14: the Cloud API sender of the confirmation replies (the token only from
    # WHATSAPP_ACCESS_TOKEN); graph_url is changed by tests and proxies
    phone_number_id: PhoneNumberId | None = None
    graph_api_version: GraphApiVersion = DEFAULT_GRAPH_API_VERSION
    graph_url: GraphUrl = DEFAULT_GRAPH_URL
    business_name: BusinessName | None = None

    @model_validator(mode="after")
    def _disjoint(self) -> WhatsappConfig:
        both = set(_normalized_words(self.opt_in_keywords)) & set(
            _normalized_words(self.opt_out_keywords)
        )
        if both:
            raise ValueError(f"a keyword cannot both opt in and opt out: {', '.join(sorted(both))}")
        stops = set(_normalized_words(self.opt_in_button_payloads)) & set(
            _normalized_words((*self.opt_out_keywords, *self.stop_button_labels))
        )
        if stops:
            raise ValueError(
                "opt_in_button_payloads: a payload that reads as an opt-out "
                f"keyword or a Stop promotions label would be an opt-out: "
                f"{', '.join(sorted(stops))}"
            )
        return self

    @field_validator("opt_in_button_payloads")
    @classmethod
    def _payload_shape(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        for value in values:
            if not value.strip() or ":" in value or len(value) > 100:
                raise ValueError(
                    "expected button ids / payloads of 1 to 100 characters "
                    f"without ':' (they become part of opt_in_source), got {value!r}"
                )
        return tuple(value.strip() for value in values)


class WebhookConfig(Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    path: str = "/webhooks/whatsapp"
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("expected a path starting with '/'")
        return value


class ScheduleConfig(Section):
    nightly: str = "0 2 * * *"
    timezone: str = "UTC"
    incremental_minutes: int = Field(default=15, ge=1)

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"expected an IANA time zone such as 'Europe/Berlin', got {value!r}"
            ) from None
        return value

    @field_validator("nightly")
    @classmethod
    def _cron(cls, value: str) -> str:
        if len(value.split()) != 5:
            raise ValueError("expected a five-part cron expression such as '0 2 * * *'")
        return value


class SyncConfig(Section):
    lookback_seconds: int = Field(default=120, ge=0)
    read_chunk_size: int = Field(default=2_000, ge=1)


class ApiConfig(Section):
    """The consent API (`/v1/consent/...`, issue 16); on only while WACONSENT_API_TOKEN is set."""

    rate_per_minute: int = Field(default=600, ge=1, le=1_000_000)
    #: proxies whose X-Forwarded-For names the client (addresses or networks); loopback by
    #: default, like `[optin] trusted_proxies`: a proxy on the same host
    trusted_proxies: tuple[str, ...] = LOOPBACK_PROXIES

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return proxy_list(value)


class Settings(Section):
    store: StoreConfig = StoreConfig()
    crm: CrmConfig = CrmConfig()
    salesforce: SalesforceConfig = SalesforceConfig()
    dynamics: DynamicsConfig = DynamicsConfig()
    mapping: MappingConfig = MappingConfig()
    whatsapp: WhatsappConfig = WhatsappConfig()
    webhook: WebhookConfig = WebhookConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    sync: SyncConfig = SyncConfig()
    replies: RepliesConfig = RepliesConfig()  # issue 14
    optin: OptinConfig = OptinConfig()  # issue 15
    api: ApiConfig = ApiConfig()  # issue 16

    def mapped_fields(self) -> dict[str, str]:
        """Logical -> CRM field name; on the ledger every logical field maps to itself."""
        if self.crm.kind == "ledger":
            return {name: name for name in domain.LOGICAL_FIELDS}
        return self.mapping.fields.mapped()

    @property
    def crm_name(self) -> str:
        """Identifies the CRM for the run lock and watermarks: kind plus object."""
        if self.crm.kind == "salesforce":
            return f"salesforce:{self.salesforce.instance_url}:{self.mapping.object}"
        if self.crm.kind == "dynamics":
            return f"dynamics:{self.dynamics.url}:{self.mapping.object}"
        return "ledger"
