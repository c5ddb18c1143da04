"""`waconsent optin purge`: deletes the website opt-in requests never confirmed (issue 15).

`serve` does the same every hour; this command is for setups that run only `webhook`.
"""

from __future__ import annotations

import click

from waconsent.cli.base import config_of, engine_of, guarded, main, now, out
from waconsent.store import optin as optin_store


@main.group()
def optin() -> None:
    """Website opt-in requests (the form's date and IP, confirmed in the chat)."""


@optin.command(name="purge")
@click.pass_context
@guarded
def purge(ctx: click.Context) -> None:
    """Delete requests never confirmed whose link expired more than 30 days ago."""
    engine = engine_of(config_of(ctx))
    try:
        with engine.begin() as connection:
            deleted = optin_store.purge(connection, now())
    finally:
        engine.dispose()
    out.print(
        f"{deleted} unconfirmed opt-in requests deleted (expired more than "
        f"{optin_store.KEEP_UNCONFIRMED.days} days ago)"
    )
