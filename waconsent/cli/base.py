"""The `waconsent` command: thin shells over sync and store, mapping errors to exit codes.

Exit codes (SPEC section 3): 0 done; 1 usage or configuration error (also: an input
file had parts that were skipped; click's own usage errors, which it exits with 2, are
mapped here); 2 the run finished but some writes failed (they stay queued) or some
records could not be decided; 3 the run could not proceed (authentication, connection,
lock held, the store busy or read-only, an unexpected error). No error path prints an
exception's message unless it is one of ours: others are named by type and code.
"""

from __future__ import annotations

import functools
import logging
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.text import Text
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from waconsent import __version__, config, logs
from waconsent.config import LoadedConfig
from waconsent.errors import ConfigError, FatalError, InputError, WaconsentError, describe
from waconsent.store.engine import open_engine, store_failure

EXIT_OK, EXIT_USAGE, EXIT_WRITES_FAILED, EXIT_CANNOT_PROCEED = 0, 1, 2, 3
# markup off: what is printed quotes file names and CSV cells, whose "[" is no style
out = Console(highlight=False, soft_wrap=True, markup=False)
err = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)
F = TypeVar("F", bound=Callable[..., Any])


class Failed(click.exceptions.Exit):
    """Leave with an exit code after the message was printed."""


_EXITING_1: dict[type[click.UsageError], type[click.UsageError]] = {}


def _usage_exit_1(exc: click.UsageError) -> click.UsageError:
    """The same usage error (its text, its way of showing itself), exiting 1."""
    kind = type(exc)
    if kind.exit_code != EXIT_USAGE:
        if kind not in _EXITING_1:
            _EXITING_1[kind] = type(kind.__name__, (kind,), {"exit_code": EXIT_USAGE})
        exc.__class__ = _EXITING_1[kind]
    return exc


class Group(click.Group):
    """click exits 2 on a usage error, which SPEC section 3 gives to "some writes failed";
    here a usage error exits 1, like any other error in how the command was called."""

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except click.UsageError as exc:
            raise _usage_exit_1(exc) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:  # raised while parsing a subcommand's arguments
            raise _usage_exit_1(exc) from None


def fail(message: str, code: int) -> Failed:
    err.print(Text.assemble(("error: ", "bold red"), message))
    return Failed(code)


def _internal(exc: BaseException) -> Failed:
    """An error outside the tree (a bug, or a store error that is not about the store's
    state): its type and where it happened, never its message, which may quote SQL
    parameters or payload values."""
    frames = traceback.extract_tb(exc.__traceback__)[-4:]
    where = " < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))
    return fail(
        f"internal error: {describe(exc)} at {where} (its message is withheld: it "
        "may hold personal data)",
        EXIT_CANNOT_PROCEED,
    )


def guarded(fn: F) -> F:
    """Map the exception tree to exit codes, once, for every command."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ConfigError as exc:
            raise fail(str(exc), EXIT_USAGE) from None
        except InputError as exc:
            raise fail(str(exc), EXIT_USAGE) from None
        except FatalError as exc:
            raise fail(
                f"{exc} (nothing queued was lost; run again when resolved)", EXIT_CANNOT_PROCEED
            ) from None
        except WaconsentError as exc:
            raise fail(str(exc), EXIT_CANNOT_PROCEED) from None
        except DBAPIError as exc:  # the store busy, read-only, gone: a sentence, exit 3
            failure = store_failure(exc)
            if failure is None:
                raise _internal(exc) from None
            raise fail(
                f"{failure} (nothing queued was lost; run again when resolved)", EXIT_CANNOT_PROCEED
            ) from None
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as exc:  # noqa: BLE001 - the last net: a bug becomes exit 70 with a trace, not a crash
            raise _internal(exc) from None

    return wrapper  # type: ignore[return-value]


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Configuration file (else $WACONSENT_CONFIG, else ./waconsent.toml).",
)
@click.option("-v", "--verbose", is_flag=True, help="Log progress to standard error.")
@click.version_option(__version__, prog_name="waconsent")
@click.pass_context
def main(ctx: click.Context, config_path: str | None, verbose: bool) -> None:
    """Keep WhatsApp consent in the CRM true and provable."""
    # the receiver and `serve` always log their events; other commands on -v
    service = ctx.invoked_subcommand in ("webhook", "serve")
    logs.configure(logging.INFO if verbose or service else logging.WARNING)
    ctx.obj = config_path


def config_of(ctx: click.Context) -> LoadedConfig:
    root = ctx.find_root()
    return config.load(root.obj)


def _remember_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    """`--config` given after a command word: the same file as before it. Both, naming
    different files, is a usage error rather than a guess."""
    if value is None:
        return
    root = ctx.find_root()
    if root.obj is not None and root.obj != value:
        raise click.UsageError(f"--config given twice: {root.obj} and {value}; pass it once")
    root.obj = value


def accept_config_everywhere(group: click.Group) -> None:
    """Every command and sub-command takes `--config PATH` after its own name too
    (`waconsent sync --config prod.toml`), as README promises; added here, once, so no
    command can forget it."""
    for command in group.commands.values():
        command.params.append(
            click.Option(
                ["--config", "config_after_command"],
                type=click.Path(dir_okay=False),
                expose_value=False,
                callback=_remember_config,
                help="Configuration file (else $WACONSENT_CONFIG, else ./waconsent.toml).",
            )
        )
        if isinstance(command, click.Group):
            accept_config_everywhere(command)


def engine_of(loaded: LoadedConfig) -> Engine:
    try:
        return open_engine(loaded.settings.store.url)
    except ConfigError as exc:  # a store.url the ledger cannot use: name the file too
        raise ConfigError(exc.problems, source=exc.source or str(loaded.path or "")) from None


def now() -> datetime:
    return datetime.now(UTC)
