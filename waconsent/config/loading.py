"""Reading the TOML file and the environment into frozen, validated Settings.

Every problem is collected and reported at once, each naming the file, the key
path and what was expected, so an admin fixes the file in one pass.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import ValidationError

from waconsent.config import optin as optin_config
from waconsent.config import replies as replies_config
from waconsent.config.schema import Settings
from waconsent.errors import ConfigError

CONFIG_ENV = "WACONSENT_CONFIG"
DEFAULT_PATH = Path("waconsent.toml")

SECRET_VARIABLES = (
    "SALESFORCE_PASSWORD",
    "SALESFORCE_SECURITY_TOKEN",
    "SALESFORCE_CONSUMER_SECRET",
    "SALESFORCE_ACCESS_TOKEN",
    "DYNAMICS_CLIENT_SECRET",
    "DYNAMICS_CERTIFICATE_FILE",
    "DYNAMICS_ACCESS_TOKEN",
    "WHATSAPP_APP_SECRET",
    "WHATSAPP_VERIFY_TOKEN",
    "WHATSAPP_ACCESS_TOKEN",  # issue 14: the system-user token the replies are sent with
    "WACONSENT_API_TOKEN",  # the consent API and server-side opt-in requests (web_guard)
)

# key (last path part) -> the environment variable that must carry it instead
_SECRET_KEYS = {
    ("salesforce", "password"): "SALESFORCE_PASSWORD",
    ("salesforce", "security_token"): "SALESFORCE_SECURITY_TOKEN",
    ("salesforce", "consumer_secret"): "SALESFORCE_CONSUMER_SECRET",
    ("salesforce", "client_secret"): "SALESFORCE_CONSUMER_SECRET",
    ("salesforce", "access_token"): "SALESFORCE_ACCESS_TOKEN",
    ("salesforce", "private_key"): "a key file named by salesforce.private_key_file",
    ("dynamics", "client_secret"): "DYNAMICS_CLIENT_SECRET",
    ("dynamics", "access_token"): "DYNAMICS_ACCESS_TOKEN",
    ("dynamics", "certificate"): "DYNAMICS_CERTIFICATE_FILE",
    ("dynamics", "private_key"): "DYNAMICS_CERTIFICATE_FILE",
    ("whatsapp", "app_secret"): "WHATSAPP_APP_SECRET",
    ("whatsapp", "verify_token"): "WHATSAPP_VERIFY_TOKEN",
    ("webhook", "app_secret"): "WHATSAPP_APP_SECRET",
    ("webhook", "verify_token"): "WHATSAPP_VERIFY_TOKEN",
    ("whatsapp", "access_token"): "WHATSAPP_ACCESS_TOKEN",  # issue 14
    ("replies", "access_token"): "WHATSAPP_ACCESS_TOKEN",  # issue 14
}
#: keys whose names look like a secret's but are not one
_NOT_SECRETS = frozenset({("optin", "token_ttl_hours")})  # issue 15: a duration
_SECRET_WORDS = re.compile(r"(password|passwd|secret|token|api_key|apikey|private_key$)", re.I)


@dataclass(frozen=True)
class Secrets:
    """Secrets read from the environment at load time; never printed."""

    values: Mapping[str, str] = field(default_factory=dict, repr=False)

    def get(self, name: str) -> str | None:
        return self.values.get(name) or None

    def require(self, name: str, purpose: str) -> str:
        value = self.get(name)
        if value is None:
            raise ConfigError(
                [
                    f"{purpose} needs the environment variable {name}; "
                    f"set it (export {name}=...) and run again"
                ]
            )
        return value

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Secrets:
        env = os.environ if environ is None else environ
        return cls({name: env[name] for name in SECRET_VARIABLES if env.get(name)})


@dataclass(frozen=True)
class LoadedConfig:
    settings: Settings
    secrets: Secrets
    path: Path | None


def resolve_path(
    explicit: str | os.PathLike[str] | None, environ: Mapping[str, str] | None = None
) -> Path:
    """`--config`, then $WACONSENT_CONFIG, then ./waconsent.toml (SPEC section 3)."""
    env = os.environ if environ is None else environ
    if explicit:
        return Path(explicit)
    if env.get(CONFIG_ENV):
        return Path(env[CONFIG_ENV])
    return DEFAULT_PATH


def load(
    explicit: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None
) -> LoadedConfig:
    path = resolve_path(explicit, environ)
    if not path.exists():
        raise ConfigError(
            [
                f"no configuration file at {path}; create one with "
                f"`waconsent init --path {path}` (or pass --config PATH)"
            ]
        )
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"not valid TOML: {exc}"], source=str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"cannot read the file: {exc}"], source=str(path)) from None
    settings = parse(raw, source=str(path))
    return LoadedConfig(settings, Secrets.from_environment(environ), path)


def parse(raw: Mapping[str, Any], source: str = "<config>") -> Settings:
    """Validate a decoded TOML document; raise one ConfigError listing every problem."""
    problems = list(_secret_problems(raw))
    settings: Settings | None = None
    try:
        settings = Settings.model_validate(raw)
    except ValidationError as exc:
        problems.extend(_describe(error) for error in exc.errors())
    if settings is not None:
        problems.extend(_cross_checks(settings))
    if problems:
        raise ConfigError(problems, source=source)
    assert settings is not None
    return settings


def _walk(
    node: Mapping[str, Any], prefix: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], Any]]:
    for key, value in node.items():
        path = (*prefix, str(key))
        if isinstance(value, Mapping):
            yield from _walk(value, path)
        else:
            yield path, value


def _secret_problems(raw: Mapping[str, Any]) -> Iterator[str]:
    for path, value in _walk(raw):
        dotted = ".".join(path)
        if path[-1].endswith(("_file", "_thumbprint")):
            pass
        elif (path[0], path[-1]) in _SECRET_KEYS:
            target = _SECRET_KEYS[(path[0], path[-1])]
            yield (
                f"{dotted}: secrets must not stand in the file; remove it and set "
                f"{target} in the environment instead"
                if target.isupper()
                else f"{dotted}: secrets must not stand in the file; use {target} instead"
            )
            continue
        elif (
            _SECRET_WORDS.search(path[-1])
            and path[:2] != ("mapping", "fields")
            and path not in _NOT_SECRETS
        ):
            yield (
                f"{dotted}: looks like a secret; secrets come only from the environment "
                f"({', '.join(SECRET_VARIABLES)})"
            )
            continue
        if isinstance(value, str) and "-----BEGIN" in value:
            yield (
                f"{dotted}: holds key material; keep the key in a file and name the file "
                "(salesforce.private_key_file or DYNAMICS_CERTIFICATE_FILE)"
            )
        elif path == ("store", "url") and isinstance(value, str) and urlsplit(value).password:
            yield (
                "store.url: holds a password; remove it from the URL and set PGPASSWORD "
                "in the environment (or use ~/.pgpass)"
            )


def _describe(error: Mapping[str, Any]) -> str:
    location = ".".join(str(part) for part in error["loc"]) or "(top level)"
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"{location}: unknown key (check its spelling against the README's reference)"
    if kind == "literal_error":
        expected = error.get("ctx", {}).get("expected", "")
        return f"{location}: expected one of {expected}, got {error.get('input')!r}"
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{location}: {message}"


def _cross_checks(settings: Settings) -> Iterator[str]:
    """Problems that involve more than one key: what each CRM kind and auth mode needs."""
    kind = settings.crm.kind
    if kind in ("salesforce", "dynamics"):
        if not settings.mapping.object:
            example = "Contact" if kind == "salesforce" else "contacts"
            yield f"mapping.object: required for crm.kind = {kind!r} (for example {example!r})"
        mapped = settings.mapping.fields.mapped()
        for logical in ("opt_in", "opt_in_date", "opt_out_date"):
            if logical not in mapped:
                yield (
                    f"mapping.fields.{logical}: required: the consent rules cannot decide or "
                    f"record a revocation without it; name the CRM field that holds it"
                )
        if not settings.mapping.phone_fields:
            yield "mapping.phone_fields: expected at least one phone field"
    if kind == "salesforce":
        yield from _salesforce_checks(settings)
    if kind == "dynamics":
        yield from _dynamics_checks(settings)
    yield from replies_config.cross_checks(settings)  # issue 14
    yield from optin_config.cross_checks(settings)  # issue 15


def _salesforce_checks(settings: Settings) -> Iterator[str]:
    sf = settings.salesforce
    needs = {
        "password": ("username",),
        "jwt": ("username", "consumer_key", "private_key_file"),
        "client_credentials": ("consumer_key", "instance_url"),
        "access_token": ("instance_url",),
    }[sf.auth]
    for key in needs:
        if not getattr(sf, key):
            yield f"salesforce.{key}: required for salesforce.auth = {sf.auth!r}"
    if sf.instance_url and not sf.instance_url.startswith("https://"):
        yield f"salesforce.instance_url: expected an https:// URL, got {sf.instance_url!r}"


def _dynamics_checks(settings: Settings) -> Iterator[str]:
    dyn = settings.dynamics
    if not dyn.url:
        yield "dynamics.url: required (for example 'https://acme.crm4.dynamics.com')"
    elif urlsplit(dyn.url).scheme != "https" or not urlsplit(dyn.url).hostname:
        yield f"dynamics.url: expected an https:// organization URL, got {dyn.url!r}"
    if dyn.auth != "access_token":
        for key in ("tenant_id", "client_id"):
            if not getattr(dyn, key):
                yield f"dynamics.{key}: required for dynamics.auth = {dyn.auth!r}"
    if dyn.auth == "certificate" and not dyn.certificate_thumbprint:
        yield "dynamics.certificate_thumbprint: required for dynamics.auth = 'certificate'"
