"""
How ``hostlink-tw task …`` and ``hostlink-tw agents`` reach the control
plane's operator API: the URL and token options, the client they make, the
refusals as one line, and Ctrl-C or a closed stdout without a traceback.

The URL is ``--operator-url``, else ``HOSTLINK_OPERATOR_URL``, else
:data:`DEFAULT_OPERATOR_URL`.  The token is read from
``--operator-token-file``, else taken from ``HOSTLINK_OPERATOR_TOKEN``, else
read from the file ``HOSTLINK_OPERATOR_TOKEN_FILE`` names
(:func:`resolve_token`).  Exit statuses of every command but ``task run``:
0 done, :data:`EXIT_REFUSED` (1) the control plane refused (no such task,
…), 2 it could not be used (unreachable, token refused, not an operator API,
a usage error).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from typing import Any, TextIO

from hostlink_tw.cli_taskrun import EXIT_CANCELLED, EXIT_CLI
from hostlink_tw.controlplane.operatortoken import (
    OperatorTokenError,
    check_token,
    read_token_file,
)
from hostlink_tw.duration import DurationError, parse_go_duration
from hostlink_tw.operatorclient import OperatorClient, OperatorError, check_operator_url
from hostlink_tw.safetext import escape_control

__all__ = [
    "DEFAULT_OPERATOR_URL",
    "EXIT_REFUSED",
    "connection_options",
    "fail",
    "isatty",
    "make_client",
    "positive_int",
    "refused",
    "resolve_token",
    "run_interruptible",
    "wait_duration",
]

DEFAULT_OPERATOR_URL = "http://127.0.0.1:8081"
EXIT_REFUSED = 1


def resolve_token(token_file: str | None, environ: Mapping[str, str]) -> str:
    """
    The bearer token: ``--operator-token-file``, else ``HOSTLINK_OPERATOR_TOKEN``,
    else the file ``HOSTLINK_OPERATOR_TOKEN_FILE`` names.

    :raises OperatorTokenError: None given, or unusable (one line).
    """
    if token_file:
        return read_token_file(token_file)
    token = environ.get("HOSTLINK_OPERATOR_TOKEN", "").strip()
    if token:
        return check_token(token, "HOSTLINK_OPERATOR_TOKEN")
    path = environ.get("HOSTLINK_OPERATOR_TOKEN_FILE", "").strip()
    if path:
        return read_token_file(path)
    raise OperatorTokenError(
        "no operator token: pass --operator-token-file (the control plane writes "
        "operator.token beside its agents file), or set HOSTLINK_OPERATOR_TOKEN_FILE or "
        "HOSTLINK_OPERATOR_TOKEN"
    )


def make_client(
    args: argparse.Namespace, err: TextIO, timeout: float = 10.0
) -> OperatorClient | None:
    """The client these arguments describe, or None after one line on ``err``."""
    try:
        token = resolve_token(args.operator_token_file, os.environ)
    except OperatorTokenError as e:
        err.write(f"hostlink-tw {args.command_name}: {escape_control(str(e), 500)}\n")
        return None
    return OperatorClient(args.operator_url, token, timeout=timeout)


def fail(args: argparse.Namespace, err: TextIO, message: str) -> None:
    """One line on ``err``, naming the command."""
    err.write(f"hostlink-tw {args.command_name}: {message}\n")


def refused(args: argparse.Namespace, err: TextIO, error: OperatorError) -> int:
    """Say why in one line; the exit status: 1 for the API's own refusal, else 2."""
    fail(args, err, str(error))
    if error.status is not None and error.status != 401 and error.code is not None:
        return EXIT_REFUSED
    return EXIT_CLI


def isatty(stream: TextIO) -> bool:
    """Whether ``stream`` is a terminal (False for anything that cannot say)."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def wait_duration(text: str) -> float:
    """``--wait``: a Go duration (``60s``, ``2m``); 0 waits without limit."""
    try:
        seconds = parse_go_duration(text)
    except DurationError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if seconds < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return seconds


def operator_url_option(text: str) -> str:
    """``--operator-url``: an http:// or https:// URL with a host."""
    try:
        return check_operator_url(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def positive_int(text: str) -> int:
    """``--limit``: a whole number from 1 to 1000."""
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= 1000:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from 1 to 1000")
    return int(text)


def connection_options(parser: argparse.ArgumentParser, name: str) -> None:
    """Add ``--operator-url`` and ``--operator-token-file``; ``name`` starts the command's lines."""
    # argparse checks a string default with the option's type too: a bad
    # HOSTLINK_OPERATOR_URL is a usage error naming --operator-url.
    default_url = os.environ.get("HOSTLINK_OPERATOR_URL", "").strip() or DEFAULT_OPERATOR_URL
    parser.add_argument(
        "--operator-url", type=operator_url_option, default=default_url,
        help=f"the control plane's operator listener [env HOSTLINK_OPERATOR_URL; default "
        f"{DEFAULT_OPERATOR_URL}]",
    )
    parser.add_argument(
        "--operator-token-file", default=None,
        help="file holding the operator API's bearer token (the control plane writes "
        "operator.token beside its agents file) [env HOSTLINK_OPERATOR_TOKEN_FILE; or the "
        "token itself in HOSTLINK_OPERATOR_TOKEN]",
    )
    parser.set_defaults(command_name=name, parser=parser)


def run_interruptible(run: Any, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """
    Run one of these commands: Ctrl-C is exit status 130 without a traceback,
    a closed stdout (``| head``) ends quietly.
    """
    try:
        status: int = run(args, out, err)
        return status
    except KeyboardInterrupt:
        err.write("\n")
        return EXIT_CANCELLED
    except BrokenPipeError:
        # Nothing more can be written; keep the interpreter's exit from complaining too.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 141

