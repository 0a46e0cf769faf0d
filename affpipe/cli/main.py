"""The ``affpipe`` command group and its one error handler.

Every subcommand turns its flags into a frozen config and calls one library function. Errors
that bad input or the environment cause (``ValueError``, ``OSError`` and its kin —
``FileNotFoundError``, ``FileExistsError``, ``PermissionError``, a full disk —, a missing
optional package, a failed ``RuntimeError`` such as offline weights) become one
``Error: ...`` line on stderr and exit status 1; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import logging

import click

from affpipe import __version__

HANDLED = (ValueError, OSError, ImportError, RuntimeError)
_MAX_MESSAGE = 2000  # a message quoting a huge input line is cut, not echoed whole


class _Group(click.Group):
    """A click group whose subcommands' expected errors print one line, not a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise  # click's own control flow (Exit and Abort are RuntimeErrors)
        except HANDLED as exc:
            if ctx.params.get("debug"):
                raise
            close_progress_bars()
            click.echo(f"Error: {error_message(exc)}", err=True)
            ctx.exit(1)


def close_progress_bars() -> None:
    """Close the progress bars an error left open mid-line (a bar closes when its loop's frame is
    freed, after the handler), so that the ``Error:`` line starts a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        with contextlib.suppress(Exception):  # a bar that cannot redraw must not hide the error
            bar.close()


def error_message(exc: BaseException) -> str:
    """One line (or a few) saying what went wrong, cut to a readable length."""
    msg = str(exc).strip() or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename is not None and str(exc.filename) not in msg:
        msg = f"{exc.filename}: {msg}"
    if isinstance(exc, OSError | RuntimeError | ImportError) and not isinstance(exc, FileNotFoundError | FileExistsError | PermissionError):
        msg = msg if msg.startswith(type(exc).__name__) else f"{msg} ({type(exc).__name__})"
    if len(msg) > _MAX_MESSAGE:
        msg = msg[:_MAX_MESSAGE] + f"... [{len(msg) - _MAX_MESSAGE} more characters]"
    return msg


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="affpipe")
@click.option("-v", "--verbose", count=True, help="More logging (-v info is default, -vv debug).")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error.")
def main(verbose: int, debug: bool) -> None:
    """affpipe: Aff-Wild2 at full scale — index, shard, stream, train, evaluate, benchmark."""
    logging.basicConfig(
        level=logging.DEBUG if verbose > 1 or debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from tqdm.contrib.logging import logging_redirect_tqdm

    # Log lines go through tqdm.write while a command runs: a progress bar and a log line never
    # share a line (the bar is redrawn below the message).
    click.get_current_context().with_resource(logging_redirect_tqdm())
