"""Logging in to Salesforce in the four modes of SPEC section 4.

| mode                 | in the file                            | in the environment          |
| -------------------- | -------------------------------------- | --------------------------- |
| `password`           | username, domain (login/test/My Domain) | SALESFORCE_PASSWORD,       |
|                      |                                        | SALESFORCE_SECURITY_TOKEN * |
| `jwt`                | username, consumer_key,                | -                           |
|                      | private_key_file, domain               |                             |
| `client_credentials` | consumer_key, instance_url (My Domain) | SALESFORCE_CONSUMER_SECRET  |
| `access_token`       | instance_url                           | SALESFORCE_ACCESS_TOKEN     |

(*) optional where the org trusts the caller's IP range. With `password` plus a
`consumer_key` and SALESFORCE_CONSUMER_SECRET, the OAuth username-password flow
is used instead of the SOAP `login()` call.

The first three modes can log in again when a session expires; `access_token`
cannot. A refused login says which mode, which user and what Salesforce answered,
and never carries a secret.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import requests
from simple_salesforce.exceptions import SalesforceAuthenticationFailed
from simple_salesforce.login import SalesforceLogin

from waconsent.config.loading import Secrets
from waconsent.config.schema import SalesforceConfig
from waconsent.errors import AuthenticationError, ConfigError, RetryableError

_HINTS = {
    "password": "check salesforce.username, SALESFORCE_PASSWORD and SALESFORCE_SECURITY_TOKEN "
    "(reset under Settings > Reset My Security Token) and salesforce.domain "
    "('test' for a sandbox)",
    "jwt": "check that the connected app holds the certificate of salesforce.private_key_file, "
    "that the user is pre-authorized for the app, and salesforce.domain "
    "('test' for a sandbox)",
    "client_credentials": "check the connected app's client credentials flow, its run-as user "
    "and SALESFORCE_CONSUMER_SECRET",
}


@dataclass(frozen=True)
class SalesforceSession:
    """An access token and the instance it is valid for (`https://host`)."""

    token: str = field(repr=False)
    instance_url: str


def _domain_of(value: str) -> str:
    """'acme.my', 'login' or 'test' from any spelling: 'https://acme.my.salesforce.com', ..."""
    host = urlsplit(value).hostname if "://" in value else value
    return (host or value).strip().strip("/").removesuffix(".salesforce.com")


@dataclass(frozen=True)
class Authenticator:
    """Logs in with the configured mode; `login` can be called again to renew a session."""

    mode: str
    who: str
    _login: Callable[[requests.Session], SalesforceSession] = field(repr=False)
    _secrets: tuple[str, ...] = field(default=(), repr=False)

    @property
    def can_renew(self) -> bool:
        return self.mode != "access_token"

    def login(self, session: requests.Session) -> SalesforceSession:
        try:
            return self._login(session)
        except SalesforceAuthenticationFailed as exc:
            code = exc.code
            if isinstance(code, int) and code >= 500:
                raise RetryableError(
                    f"the Salesforce login endpoint answered {code}", status=code
                ) from None
            answer = self._scrub(f"{code}: {exc.auth_message}" if code else exc.auth_message)
            raise AuthenticationError(
                f"Salesforce refused the {self.mode} login for {self.who}: {answer.strip()}; "
                f"{_HINTS.get(self.mode, '')}"
            ) from None

    def expired(self) -> AuthenticationError:
        """The error for a session Salesforce no longer accepts and that cannot be renewed."""
        if self.can_renew:
            return AuthenticationError(
                f"Salesforce refused the session again right after a fresh {self.mode} login "
                f"for {self.who} (INVALID_SESSION_ID); check the user's session policies"
            )
        return AuthenticationError(
            "Salesforce says the access token has expired or is invalid (INVALID_SESSION_ID); "
            "get a fresh one with `sf org display --target-org <alias>` and set "
            "SALESFORCE_ACCESS_TOKEN again (auth 'access_token' cannot renew by itself)"
        )

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            if secret:
                text = text.replace(secret, "***")
        return text


def _session_from(token: str, instance: str) -> SalesforceSession:
    host = instance.removeprefix("https://").removeprefix("http://").strip("/")
    return SalesforceSession(token, f"https://{host}")


class _Needs:
    """Collects every missing setting of one mode, so one error names them all."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.problems: list[str] = []

    def setting(self, value: str | None, what: str) -> str:
        if not value:
            self.problems.append(f"{what}: required for salesforce.auth = {self.mode!r}")
        return value or ""

    def secret(self, secrets: Secrets, name: str, why: str) -> str:
        value = secrets.get(name)
        if not value:
            self.problems.append(f"{name}: salesforce.auth = {self.mode!r} needs {why}")
        return value or ""

    def check(self) -> None:
        _raise(self.problems)


def _access_token(settings: SalesforceConfig, secrets: Secrets) -> Authenticator:
    needs = _Needs("access_token")
    token = needs.secret(
        secrets,
        "SALESFORCE_ACCESS_TOKEN",
        "the token in the environment (`sf org display` prints it as 'Access Token')",
    )
    instance = needs.setting(settings.instance_url, "salesforce.instance_url")
    needs.check()
    fixed = _session_from(token, instance)
    return Authenticator(
        "access_token",
        f"the token of {urlsplit(instance).hostname}",
        lambda _session: fixed,
        (token,),
    )


def _password(settings: SalesforceConfig, secrets: Secrets) -> Authenticator:
    needs = _Needs("password")
    username = needs.setting(settings.username, "salesforce.username")
    password = needs.secret(secrets, "SALESFORCE_PASSWORD", "the password in the environment")
    token = secrets.get("SALESFORCE_SECURITY_TOKEN") or ""
    consumer_secret = secrets.get("SALESFORCE_CONSUMER_SECRET")
    needs.check()
    domain, version = _domain_of(settings.domain), settings.api_version
    if settings.consumer_key and consumer_secret:
        # OAuth username-password flow (the SOAP login() call is being retired).
        key = settings.consumer_key

        def oauth_password(session: requests.Session) -> SalesforceSession:
            return _session_from(
                *SalesforceLogin(
                    username=username,
                    password=password + token,
                    consumer_key=key,
                    consumer_secret=consumer_secret,
                    domain=domain,
                    sf_version=version,
                    session=session,
                )
            )

        return Authenticator(
            "password", f"user {username}", oauth_password, (password, token, consumer_secret)
        )

    def soap_password(session: requests.Session) -> SalesforceSession:
        return _session_from(
            *SalesforceLogin(
                username=username,
                password=password,
                security_token=token,
                domain=domain,
                sf_version=version,
                session=session,
            )
        )

    return Authenticator("password", f"user {username}", soap_password, (password, token))


def _private_key(key_file: str) -> str:
    try:
        private_key = Path(key_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            [f"salesforce.private_key_file: cannot read {key_file}: {exc.__class__.__name__}"]
        ) from None
    if "PRIVATE KEY" not in private_key:
        raise ConfigError(
            [
                f"salesforce.private_key_file: {key_file} holds no PEM private "
                "key (expected '-----BEGIN PRIVATE KEY-----')"
            ]
        )
    return private_key


def _jwt(settings: SalesforceConfig, _secrets: Secrets) -> Authenticator:
    needs = _Needs("jwt")
    username = needs.setting(settings.username, "salesforce.username")
    key = needs.setting(settings.consumer_key, "salesforce.consumer_key")
    key_file = needs.setting(settings.private_key_file, "salesforce.private_key_file")
    needs.check()
    private_key = _private_key(key_file)
    domain, version = _domain_of(settings.domain), settings.api_version

    def jwt_bearer(session: requests.Session) -> SalesforceSession:
        return _session_from(
            *SalesforceLogin(
                username=username,
                consumer_key=key,
                privatekey=private_key,
                domain=domain,
                sf_version=version,
                session=session,
            )
        )

    return Authenticator("jwt", f"user {username}", jwt_bearer, ())


def _client_credentials(settings: SalesforceConfig, secrets: Secrets) -> Authenticator:
    """The token endpoint of the org's My Domain."""
    needs = _Needs("client_credentials")
    key = needs.setting(settings.consumer_key, "salesforce.consumer_key")
    consumer_secret = needs.secret(
        secrets,
        "SALESFORCE_CONSUMER_SECRET",
        "the connected app's consumer secret in the environment",
    )
    my_domain = _my_domain(settings.domain) or _my_domain(settings.instance_url or "")
    if not my_domain:
        needs.problems.append(
            "salesforce.instance_url: the client credentials flow needs the "
            "org's My Domain, such as 'https://acme.my.salesforce.com'"
        )
    needs.check()
    version = settings.api_version

    def client_credentials(session: requests.Session) -> SalesforceSession:
        return _session_from(
            *SalesforceLogin(
                consumer_key=key,
                consumer_secret=consumer_secret,
                domain=my_domain,
                sf_version=version,
                session=session,
            )
        )

    return Authenticator(
        "client_credentials",
        f"the run-as user of consumer key {key[:8]}…",
        client_credentials,
        (consumer_secret,),
    )


_MODES: dict[str, Callable[[SalesforceConfig, Secrets], Authenticator]] = {
    "access_token": _access_token,
    "password": _password,
    "jwt": _jwt,
    "client_credentials": _client_credentials,
}


def authenticator(settings: SalesforceConfig, secrets: Secrets) -> Authenticator:
    """The login of `salesforce.auth`; raises ConfigError naming what is missing."""
    return _MODES[settings.auth](settings, secrets)


def _my_domain(value: str) -> str | None:
    """The My Domain part ('acme.my') of a domain setting or URL; None for login/test/other."""
    if not value:
        return None
    if "://" in value:
        host = urlsplit(value).hostname or ""
        if not host.endswith(".salesforce.com"):
            return None
    else:  # simple-salesforce's sense of `domain`: 'acme.my' stands for acme.my.salesforce.com
        host = value.strip().strip("/")
    domain = host.removesuffix(".salesforce.com")
    return None if domain in ("login", "test", "") else domain


def _raise(problems: Iterable[str]) -> None:
    listed = list(problems)
    if listed:
        raise ConfigError(listed)
