"""Tokens for the Dataverse Web API: msal client credentials, or a token handed in.

`client_secret` and `certificate` use one long-lived msal
ConfidentialClientApplication, so its token cache serves every request until the
token nears expiry. msal answers failures as a dict (`error`,
`error_description`, `correlation_id`); they become AuthenticationError carrying
what Azure said, never the secret. For an authority host that is not one of
Microsoft's, instance discovery is switched off so msal never asks
login.microsoftonline.com to vouch for it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

import requests

from waconsent import logs
from waconsent.errors import AuthenticationError, ConfigError, ConnectionFailed, RetryableError

if TYPE_CHECKING:
    from waconsent.config import Secrets
    from waconsent.config.schema import DynamicsConfig
    from waconsent.connectors.http import RetryPolicy

log = logging.getLogger(__name__)

# Hosts msal itself knows as Microsoft's (public and sovereign clouds).
MICROSOFT_AUTHORITY_HOSTS = frozenset(
    {
        "login.microsoftonline.com",
        "login.microsoft.com",
        "login.windows.net",
        "sts.windows.net",
        "login.chinacloudapi.cn",
        "login.partner.microsoftonline.cn",
        "login.microsoftonline.us",
        "login-us.microsoftonline.com",
        "login.usgovcloudapi.net",
        "login.microsoftonline.de",
    }
)

# Domains under which Dynamics 365 / Dataverse organizations live (commercial, GCC,
# GCC High, DoD, China, the retired Germany cloud).
DYNAMICS_DOMAINS = (
    "dynamics.com",
    "dynamics.cn",
    "microsoftdynamics.us",
    "appsplatform.us",
    "microsoftdynamics.de",
)


# OAuth errors that say "try again later" rather than "these credentials are wrong".
_TRANSIENT_ERRORS = frozenset({"temporarily_unavailable", "server_error"})


def is_dynamics_host(host: str) -> bool:
    host = host.lower().rstrip(".")
    return any(host == domain or host.endswith("." + domain) for domain in DYNAMICS_DOMAINS)


def warn_unless_dynamics_host(url: str) -> bool:
    """Log a warning when the org URL's host is not under a known Dynamics domain."""
    host = urlsplit(url).hostname or ""
    if is_dynamics_host(host):
        return True
    logs.event(
        log,
        "dynamics.url_not_dynamics",
        logging.WARNING,
        host=host,
        known=", ".join(DYNAMICS_DOMAINS),
        hint="dynamics.url is not under a known Dynamics 365 domain; check the "
        "organization URL (Settings > Advanced settings > Customizations > "
        "Developer Resources shows it)",
    )
    return False


class TokenProvider(Protocol):
    """Hands out bearer tokens; `renew` is called after the API refused `stale` (401)."""

    def token(self) -> str: ...

    def renew(self, stale: str) -> str: ...


class StaticToken:
    """auth = "access_token": DYNAMICS_ACCESS_TOKEN, as `az account get-access-token` prints it."""

    def __init__(self, token: str, resource: str) -> None:
        self._token = token.strip()
        self._resource = resource

    def token(self) -> str:
        return self._token

    def renew(self, stale: str) -> str:
        raise AuthenticationError(
            "Dataverse refused DYNAMICS_ACCESS_TOKEN (expired or for another resource); get a "
            f"fresh one with `az account get-access-token --resource {self._resource}` "
            "and run again"
        )


def describe_msal_error(result: Mapping[str, Any], secrets: tuple[str, ...] = ()) -> str:
    """`error: description (correlation id ...)` with any secret blanked out."""
    error = str(result.get("error") or "unknown_error")
    description = str(result.get("error_description") or "").strip()
    correlation = result.get("correlation_id")
    text = f"{error}: {description}" if description else error
    if correlation:
        text += f" (correlation id {correlation})"
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    return text


class MsalTokens:
    """client_secret / certificate through msal's ConfidentialClientApplication."""

    def __init__(
        self,
        *,
        client_id: str,
        tenant_id: str,
        authority_host: str,
        resource: str,
        credential: str | dict[str, Any],
        session: requests.Session,
        retry: Callable[[Callable[[], dict[str, Any]], str], dict[str, Any]],
    ) -> None:
        self._client_id = client_id
        self._authority = f"{authority_host.rstrip('/')}/{tenant_id}"
        self._scope = [f"{resource.rstrip('/')}/.default"]
        self._credential = credential
        self._session = session
        self._retry = retry
        self._lock = threading.Lock()
        self._app: Any = None
        self._current: str | None = None
        host = (urlsplit(authority_host).hostname or "").lower()
        self._microsoft = host in MICROSOFT_AUTHORITY_HOSTS

    def _secrets(self) -> tuple[str, ...]:
        if isinstance(self._credential, str):
            return (self._credential,)
        return tuple(
            str(v) for k, v in self._credential.items() if k in ("private_key", "passphrase")
        )

    def _redact(self, text: str) -> str:
        for secret in self._secrets():
            if secret:
                text = text.replace(secret, "[redacted]")
        return text

    def _application(self) -> Any:
        if self._app is None:
            import msal

            try:
                self._app = self._retry(
                    lambda: msal.ConfidentialClientApplication(
                        self._client_id,
                        client_credential=self._credential,
                        authority=self._authority,
                        http_client=self._session,
                        # Not Microsoft's host (sovereign or test): never ask
                        # login.microsoftonline.com.
                        instance_discovery=None if self._microsoft else False,
                        validate_authority=self._microsoft,
                    ),
                    "token authority discovery",
                )
            except requests.RequestException as exc:
                raise ConnectionFailed(
                    f"cannot read the sign-in configuration of "
                    f"{self._authority}: {type(exc).__name__}"
                ) from None
            except TypeError as exc:  # e.g. an encrypted private key without its passphrase
                said = self._redact(str(exc))
                raise ConfigError(
                    [f"DYNAMICS_CERTIFICATE_FILE: msal cannot use the key: {said}"]
                ) from None
            except ValueError as exc:
                said = self._redact(str(exc))
                raise AuthenticationError(
                    f"msal cannot use the authority {self._authority}: {said}"
                ) from None
        return self._app

    def _acquire(self) -> str:
        app = self._application()

        def attempt() -> dict[str, Any]:
            answer: dict[str, Any] = app.acquire_token_for_client(scopes=self._scope)
            if isinstance(answer, dict) and answer.get("error") in _TRANSIENT_ERRORS:
                raise RetryableError(describe_msal_error(answer, self._secrets()))
            return answer

        result = self._retry(attempt, "token request")
        token = result.get("access_token") if isinstance(result, dict) else None
        if not token:
            raise AuthenticationError(
                "Azure AD refused the token request for Dataverse: "
                + describe_msal_error(result if isinstance(result, dict) else {}, self._secrets())
            )
        self._current = str(token)
        return self._current

    def token(self) -> str:
        with self._lock:
            return self._acquire()

    def renew(self, stale: str) -> str:
        with self._lock:
            if self._current is not None and self._current != stale:
                return self._current  # another thread renewed it already
            self._application().remove_tokens_for_client()
            return self._acquire()


def certificate_credential(path: str, thumbprint: str | None) -> dict[str, Any]:
    """msal's certificate credential from DYNAMICS_CERTIFICATE_FILE (PEM, or .pfx without password).

    A PEM holding the certificate as well as the key lets msal use the SHA-256
    thumbprint and checks the configured thumbprint against it; a key alone uses
    `dynamics.certificate_thumbprint` (SHA-1, as the app registration shows it).
    """
    file = Path(path)
    if file.suffix.lower() in (".pfx", ".p12"):
        if not file.is_file():
            raise ConfigError([f"DYNAMICS_CERTIFICATE_FILE: no file at {path}"])
        return {"private_key_pfx_path": str(file)}
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            [f"DYNAMICS_CERTIFICATE_FILE: cannot read {path}: {type(exc).__name__}"]
        ) from None
    if "PRIVATE KEY-----" not in text:
        raise ConfigError([f"DYNAMICS_CERTIFICATE_FILE: {path} holds no PEM private key"])
    credential: dict[str, Any] = {"private_key": text}
    if "-----BEGIN CERTIFICATE-----" in text:
        certificate = text[text.index("-----BEGIN CERTIFICATE-----") :]
        certificate = certificate[: certificate.index("-----END CERTIFICATE-----") + 25]
        if thumbprint:
            _check_thumbprint(certificate, thumbprint, path)
        credential["public_certificate"] = certificate
    elif thumbprint:
        credential["thumbprint"] = thumbprint.replace(":", "").strip()
    else:
        raise ConfigError(
            [
                "dynamics.certificate_thumbprint: required when "
                "DYNAMICS_CERTIFICATE_FILE holds only the private key"
            ]
        )
    return credential


def _check_thumbprint(certificate_pem: str, thumbprint: str, path: str) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    cert = x509.load_pem_x509_certificate(certificate_pem.encode("ascii"))
    wanted = thumbprint.replace(":", "").strip().lower()
    known = {
        cert.fingerprint(hashes.SHA1()).hex(),  # noqa: S303 - Entra shows SHA-1 thumbprints
        cert.fingerprint(hashes.SHA256()).hex(),
    }
    if wanted not in known:
        raise ConfigError(
            [
                f"dynamics.certificate_thumbprint: {thumbprint} is not the thumbprint "
                f"of the certificate in {path}"
            ]
        )


def token_provider(
    settings: DynamicsConfig, secrets: Secrets, session: requests.Session, policy: RetryPolicy
) -> TokenProvider:
    """The token source for `dynamics.auth`: a fixed token, or msal with a client secret or
    a certificate; ConfigError naming what is missing."""
    if not settings.url:
        raise ConfigError(["dynamics.url: required (for example 'https://acme.crm4.dynamics.com')"])
    if settings.auth == "access_token":
        return StaticToken(
            secrets.require("DYNAMICS_ACCESS_TOKEN", "dynamics.auth = 'access_token'"), settings.url
        )
    if not settings.tenant_id or not settings.client_id:
        raise ConfigError(
            [
                f"dynamics.tenant_id and dynamics.client_id: required for "
                f"dynamics.auth = {settings.auth!r}"
            ]
        )
    credential: str | dict[str, Any]
    if settings.auth == "client_secret":
        credential = secrets.require("DYNAMICS_CLIENT_SECRET", "dynamics.auth = 'client_secret'")
    else:
        credential = certificate_credential(
            secrets.require("DYNAMICS_CERTIFICATE_FILE", "dynamics.auth = 'certificate'"),
            settings.certificate_thumbprint,
        )
    return MsalTokens(
        client_id=settings.client_id,
        tenant_id=settings.tenant_id,
        authority_host=settings.authority_host,
        resource=settings.url,
        credential=credential,
        session=session,
        retry=policy.run,
    )
