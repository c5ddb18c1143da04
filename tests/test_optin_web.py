"""The website opt-in's HTTP surface (issue 15): who may pass `client_ip`, the rate limit,
the size cap, CORS, the QR code, and the page in a real headless Chromium."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, select

from tests.test_optin import API_TOKEN, BUSINESS, optin_config
from tests.test_web import running
from waconsent.optin_page import STYLE_HASH
from waconsent.store.engine import open_engine
from waconsent.store.tables import optin_requests
from waconsent.web import create_app


@pytest.fixture
def sqlite_engine(sqlite_url: str) -> Iterator[Engine]:
    engine = open_engine(sqlite_url)
    yield engine
    engine.dispose()


def serve_optin(engine: Engine, url: str, **optin: Any) -> Any:
    cfg = optin_config(url, **optin)
    return running(create_app(cfg, engine), cfg)


def ips(engine: Engine) -> list[str | None]:
    with engine.connect() as connection:
        return [ip for (ip,) in connection.execute(select(optin_requests.c.client_ip))]


def test_client_ip_only_with_the_api_token(sqlite_engine: Engine, sqlite_url: str) -> None:
    """A server passing `client_ip` must send the API token: none 401, wrong 403, right 201
    with that IP recorded; a malformed address is 400. Nothing is stored for a refusal."""
    with serve_optin(sqlite_engine, sqlite_url) as port:
        url = f"http://127.0.0.1:{port}/optin"
        body = {"form": "checkout", "client_ip": "2001:db8::7"}
        assert httpx.post(url, json=body).status_code == 401
        wrong = httpx.post(url, json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 403
        assert ips(sqlite_engine) == []
        good = httpx.post(url, json=body, headers={"Authorization": f"Bearer {API_TOKEN}"})
        assert good.status_code == 201
        bad = httpx.post(
            url, json={**body, "client_ip": "x"}, headers={"Authorization": f"Bearer {API_TOKEN}"}
        )
        assert bad.status_code == 400
    assert ips(sqlite_engine) == ["2001:db8::7"]


def test_rate_limit_per_client_address(sqlite_engine: Engine, sqlite_url: str) -> None:
    """Over `rate_per_minute` from one address: 429 with Retry-After; another address (behind
    the trusted proxy) is still served."""
    with serve_optin(sqlite_engine, sqlite_url, rate_per_minute=3) as port:
        url = f"http://127.0.0.1:{port}/optin"
        one = {"X-Forwarded-For": "198.51.100.1"}
        assert [httpx.post(url, json={}, headers=one).status_code for _ in range(4)] == [
            201,
            201,
            201,
            429,
        ]
        refused = httpx.post(url, json={}, headers=one)
        assert refused.status_code == 429 and 1 <= int(refused.headers["retry-after"]) <= 60
        other = httpx.post(url, json={}, headers={"X-Forwarded-For": "198.51.100.2"})
        assert other.status_code == 201
    assert len(ips(sqlite_engine)) == 4


def test_body_size_and_type_are_checked(sqlite_engine: Engine, sqlite_url: str) -> None:
    """Bodies over 16 KiB are refused (413), other types 415, malformed ones 400."""
    with serve_optin(sqlite_engine, sqlite_url) as port:
        url = f"http://127.0.0.1:{port}/optin"
        big = httpx.post(url, json={"page": "x" * 17_000})
        assert big.status_code == 413
        assert (
            httpx.post(url, content=b"form=a", headers={"Content-Type": "text/plain"}).status_code
            == 415
        )
        assert (
            httpx.post(
                url, content=b"{not json", headers={"Content-Type": "application/json"}
            ).status_code
            == 400
        )
        assert httpx.post(url, json={"phone": "n/a"}).status_code == 400
        assert httpx.post(url, json={"form": "a:b"}).status_code == 400
    assert ips(sqlite_engine) == []


def test_cors_preflight_for_allowed_and_foreign_origins(
    sqlite_engine: Engine, sqlite_url: str
) -> None:
    """The configured origin gets the CORS headers (preflight and POST); a foreign one none."""
    allowed, foreign = "https://www.acme.example", "https://evil.example"
    with serve_optin(sqlite_engine, sqlite_url, allowed_origins=[allowed]) as port:
        url = f"http://127.0.0.1:{port}/optin"
        asks = {
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        }
        ok = httpx.options(url, headers={"Origin": allowed, **asks})
        assert ok.status_code == 204
        assert ok.headers["access-control-allow-origin"] == allowed
        assert "POST" in ok.headers["access-control-allow-methods"]
        assert "content-type" in ok.headers["access-control-allow-headers"].lower()
        refused = httpx.options(url, headers={"Origin": foreign, **asks})
        assert "access-control-allow-origin" not in refused.headers
        posted = httpx.post(url, json={}, headers={"Origin": allowed})
        assert posted.headers["access-control-allow-origin"] == allowed
        assert (
            "access-control-allow-origin"
            not in httpx.post(url, json={}, headers={"Origin": foreign}).headers
        )


def test_page_headers_and_qr_code(sqlite_engine: Engine, sqlite_url: str) -> None:
    """The page carries a strict CSP (its one style by hash, images from itself only); the
    QR code is served for an open token only."""
    with serve_optin(sqlite_engine, sqlite_url) as port:
        base = f"http://127.0.0.1:{port}"
        page = httpx.get(base + "/optin")
        assert page.status_code == 200
        policy = page.headers["content-security-policy"]
        assert "default-src 'none'" in policy and f"'sha256-{STYLE_HASH}'" in policy
        assert "Acme Shoes" in page.text and "<script" not in page.text
        made = httpx.post(base + "/optin", json={}).json()
        svg = httpx.get(made["qr_svg_url"])
        assert svg.status_code == 200 and svg.headers["content-type"] == "image/svg+xml"
        assert svg.content.lstrip().startswith((b"<?xml", b"<svg"))
        assert httpx.get(base + "/optin/" + "a" * 32 + ".svg").status_code == 404
        assert httpx.get(base + "/optin/..%2Fetc.svg").status_code == 404


def test_page_submitted_in_a_real_browser_shows_link_and_qr(
    browser: Any, sqlite_engine: Engine, sqlite_url: str, tmp_path: Path
) -> None:
    """Headless Chromium: load the page, tick the box, submit; the answer shows the wa.me
    link with the token and the QR image rendered; the console shows no CSP violation."""
    from selenium.webdriver.common.by import By

    with serve_optin(sqlite_engine, sqlite_url) as port:
        browser.get(f"http://127.0.0.1:{port}/optin")
        assert "Acme Shoes" in browser.find_element(By.ID, "wording").text
        browser.find_element(By.ID, "phone").send_keys("0151 23456789")
        browser.find_element(By.ID, "submit").click()  # the box is required: nothing sent
        assert browser.find_elements(By.ID, "whatsapp-link") == []
        browser.find_element(By.ID, "agree").click()
        browser.find_element(By.ID, "submit").click()
        link = browser.find_element(By.ID, "whatsapp-link").get_attribute("href")
        assert link.startswith(f"https://wa.me/{BUSINESS}?text=START%20")
        image = browser.find_element(By.ID, "qr")
        width = browser.execute_script(
            "const i = arguments[0]; return i.complete ? i.naturalWidth : 0;", image
        )
        assert width > 0
        console = [
            entry
            for entry in browser.get_log("browser")
            if (entry["level"] == "SEVERE" or "Content Security" in entry["message"])
            and "favicon.ico" not in entry["message"]
        ]  # the browser's own guess
    assert console == []
    with sqlite_engine.connect() as connection:
        row = connection.execute(select(optin_requests)).one()
    assert row.phone_key == "+4915123456789" and row.form_id == "newsletter"
    assert row.client_ip == "127.0.0.1"
    assert row.page == f"http://127.0.0.1:{port}/optin"  # the page's own Referer (same-origin)
    assert row.user_agent and "Chrome" in row.user_agent


def test_qr_url_names_the_proxy_scheme_only_behind_a_trusted_proxy(
    sqlite_engine: Engine, sqlite_url: str
) -> None:
    """Behind the trusted (loopback) proxy, `qr_svg_url` uses X-Forwarded-Proto and the Host
    the proxy passed; from an untrusted peer those headers are ignored."""
    forwarded = {"X-Forwarded-Proto": "https", "Host": "consent.acme.example"}
    with serve_optin(sqlite_engine, sqlite_url) as port:
        made = httpx.post(f"http://127.0.0.1:{port}/optin", json={}, headers=forwarded).json()
    assert made["qr_svg_url"].startswith("https://consent.acme.example/optin/")
    with serve_optin(sqlite_engine, sqlite_url, trusted_proxies=["10.9.9.9"]) as port:
        made = httpx.post(
            f"http://127.0.0.1:{port}/optin", json={}, headers={"X-Forwarded-Proto": "https"}
        ).json()
    assert made["qr_svg_url"].startswith(f"http://127.0.0.1:{port}/optin/")
