"""The long-running commands: the receiver alone, and `serve`."""

from __future__ import annotations

import click

from waconsent.cli.base import config_of, guarded, main


@main.command()
@click.pass_context
@guarded
def webhook(ctx: click.Context) -> None:
    """Serve the WhatsApp webhook alone (handshake + signed deliveries)."""
    from waconsent.server import serve

    serve(config_of(ctx))


@main.command()
@click.pass_context
@guarded
def serve(ctx: click.Context) -> None:
    """Webhook receiver plus scheduler (nightly full, incremental every N minutes); a
    revocation arriving by webhook is written back to every record of its number at once."""
    from waconsent.service import serve as serve_all

    serve_all(config_of(ctx))
