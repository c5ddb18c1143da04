"""A real `waconsent serve` in a child process, for the tests that need the whole service."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ledger_serve_config(folder: Path, port: int) -> tuple[Path, str]:
    """A config for `serve` on a SQLite ledger in `folder`, with the scheduled incremental
    runs far apart (so what a test sees is the targeted write-back), and the store URL."""
    url = f"sqlite:///{folder / 'serve.db'}"
    cfg = folder / "waconsent.toml"
    cfg.write_text(
        f'[store]\nurl = "{url}"\n[webhook]\nport = {port}\n'
        "[schedule]\nincremental_minutes = 600\n",
        encoding="utf-8",
    )
    return cfg, url


def start_serve(
    cfg: Path, port: int, secrets: Mapping[str, str]
) -> tuple[subprocess.Popen[str], str]:
    """`waconsent --config CFG serve` with the secrets in its environment, and its base URL
    once `/healthz` answers 200 (or after 30 s: the test's own assertions then say why)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "waconsent", "--config", str(cfg), "serve"],
        cwd=ROOT,
        env={**os.environ, **secrets},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.1)
    return process, base
