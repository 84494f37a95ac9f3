"""
The ``hostlink-tw`` command (also ``python -m hostlink_tw``).

``hostlink-tw init``
    create this agent's identity: an RSA key (mode 0600) and ``agent.json``,
    written as one change; print the public key the control plane stores and
    a line for the reference control plane's agents file.  A half-made
    identity (only one of the two files) is completed, never replacing an
    existing key.
``hostlink-tw identity show``
    print the existing identity (agent id, public key, agents-file line;
    ``--json`` for one JSON object) without changing anything.
``hostlink-tw status``
    a short summary from a running agent's status endpoint; exit 0 when the
    session is active, 1 when not, 2 when the endpoint cannot be read or is
    not an agent's status page.
``hostlink-tw demo``
    run the reference control plane and an agent against it on 127.0.0.1,
    with a readable live log (see :mod:`hostlink_tw.demo`).
``hostlink-tw task run|list|show|logs|cancel``, ``hostlink-tw agents``
    run commands on agents through a control plane's operator API, and
    look at tasks and agents (see :mod:`hostlink_tw.cli_task`).
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import math
import os
import re
import secrets
import shlex
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any, TextIO

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

from hostlink_tw import __version__
from hostlink_tw.agent.identity import (
    AgentState,
    agent_state_file,
    default_private_key_path,
    identity_show_command,
    init_command,
    load_agent_state,
    load_private_key,
    same_file_problem,
)
from hostlink_tw.cli_task import add_operator_commands, run_interruptible
from hostlink_tw.config import SETTINGS
from hostlink_tw.provisioning import generate_private_key, new_private_key, write_identity
from hostlink_tw.safetext import escape_control
from hostlink_tw.wire.keys import IdentityError, public_key_base64
from hostlink_tw.wire.vocabulary import check_agent_id

__all__ = ["main"]

EXIT_ACTIVE, EXIT_INACTIVE, EXIT_UNREACHABLE = 0, 1, 2
DEFAULT_STATUS_URL = "http://127.0.0.1:9920"
#: The most ``status`` reads of an answer: an agent's /status is well under 4 KiB.
MAX_STATUS_BYTES = 1024 * 1024
# Longest text shown per field: a peer's close reason or error stays one line.
_FIELD_CHARS = 300
#: The largest ``init --bits``: a 16384-bit key already takes minutes to make.
MAX_RSA_BITS = 16384


def _default(env: str) -> str:
    return next(spec.default for spec in SETTINGS if spec.env == env)


def _key_path(args: argparse.Namespace) -> str:
    """The key path the agent would use for these arguments (and environment)."""
    explicit: str | None = args.private_key_path
    return explicit or default_private_key_path(args.state_path)


def _identity_report(
    agent_id: str, state_path: str, key_path: str, key: RSAPrivateKey
) -> dict[str, Any]:
    public = public_key_base64(key)
    return {
        "agent_id": agent_id,
        "agent_state_file": agent_state_file(state_path),
        "private_key_path": key_path,
        "public_key": public,
        "agents_file_entry": {agent_id: public},
    }


def _write_identity_report(out: TextIO, report: dict[str, Any]) -> None:
    out.write(
        f"agent id:    {report['agent_id']}\n"
        f"agent state: {report['agent_state_file']}\n"
        f"private key: {report['private_key_path']} (mode 0600)\n"
        f"public key (base64 PKIX DER, as the control plane stores it):\n"
        f"{report['public_key']}\n"
        f"line for the reference control plane's agents file:\n"
        f"{json.dumps(report['agents_file_entry'])}\n"
    )


def _init(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """
    Create the identity, or complete a half-made one.

    Neither file (or ``--force``): a new key and ``agent.json``, written as
    one change (:func:`write_identity`).  Only the key: ``agent.json`` for
    that key, which is kept.  Only ``agent.json``: a new key for the agent
    id it names (the control plane must be given the new public key).  Both:
    refused without ``--force``.
    """
    state_path: str = args.state_path
    key_path = _key_path(args)
    state_file = agent_state_file(state_path)
    requested: str | None = args.agent_id
    if requested is not None:
        try:
            check_agent_id(requested)
        except ValueError as e:
            err.write(f"hostlink-tw init: {e}\n")
            return 2
    same = same_file_problem(state_path, key_path)
    if same is not None:
        # Written as it is, the state file would replace the new key.
        err.write(f"hostlink-tw init: {same}\n")
        return 2
    has_state, has_key = os.path.lexists(state_file), os.path.lexists(key_path)
    try:
        if args.force or not (has_state or has_key):
            agent_id = requested or _random_agent_id()
            key = new_private_key(args.bits)
            write_identity(state_path, key_path, AgentState(agent_id=agent_id), key)
        elif has_key and not has_state:
            # Half-made: the key may already be registered; never replace it.
            key = load_private_key(key_path, state_path=state_path)
            agent_id = requested or _random_agent_id()
            write_identity(state_path, key_path, AgentState(agent_id=agent_id))
            err.write(f"hostlink-tw init: kept the existing key {key_path}\n")
        elif has_state and not has_key:
            agent_id = load_agent_state(state_path, private_key_path=key_path).agent_id
            if requested is not None and requested != agent_id:
                err.write(
                    f"hostlink-tw init: {state_file} already names agent {agent_id!r}, "
                    f"not {requested!r}; to replace the whole identity run "
                    f"'{init_command(state_path, key_path, force=True)} --agent-id "
                    f"{shlex.quote(requested)}'\n"
                )
                return 1
            key = generate_private_key(key_path, args.bits, overwrite=False)
            err.write(
                f"hostlink-tw init: kept {state_file}; the new key must be given to the "
                f"control plane for agent {agent_id!r}\n"
            )
        else:
            err.write(f"hostlink-tw init: {_refusal(state_path, key_path)}\n")
            return 1
    except IdentityError as e:
        err.write(f"hostlink-tw init: {e}\n")
        return 1
    _write_identity_report(out, _identity_report(agent_id, state_path, key_path, key))
    return 0


def _refusal(state_path: str, key_path: str) -> str:
    """Why init will not replace an existing pair, and the command that helps."""
    state_file = agent_state_file(state_path)
    replace = init_command(state_path, key_path, force=True)
    try:
        load_agent_state(state_path, private_key_path=key_path)
        load_private_key(key_path, state_path=state_path)
    except IdentityError as e:
        # Unusable: 'identity show' would only fail on it too.
        return (
            f"refusing to overwrite this agent's identity ({state_file}, {key_path}), "
            f"which is unusable: {e.problem}; run '{replace}' to replace it"
        )
    return (
        f"refusing to overwrite this agent's identity ({state_file}, {key_path}); run "
        f"'{identity_show_command(state_path, key_path)}' to print its public key, "
        f"or '{replace}' to replace it"
    )


def _random_agent_id() -> str:
    return f"agent-{secrets.token_hex(8)}"


def _identity_show(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Print the existing identity (never writes anything)."""
    key_path = _key_path(args)
    same = same_file_problem(args.state_path, key_path)
    if same is not None:
        err.write(f"hostlink-tw identity show: {same}\n")
        return 2
    try:
        state = load_agent_state(args.state_path, private_key_path=key_path)
        key = load_private_key(key_path, state_path=args.state_path)
    except IdentityError as e:
        err.write(f"hostlink-tw identity show: {e}\n")
        return 1
    report = _identity_report(state.agent_id, args.state_path, key_path, key)
    if args.json:
        out.write(json.dumps(report, indent=2) + "\n")
    else:
        _write_identity_report(out, report)
    return 0


class StatusError(Exception):
    """``status`` cannot show this endpoint; the message is one line."""


def status_url_from_listen(description: str) -> str:
    """
    The URL of a status page served on a Twisted server endpoint description
    (``HOSTLINK_WS_STATUS_LISTEN``): ``tcp:9920:interface=127.0.0.1`` gives
    ``http://127.0.0.1:9920``, ``ssl:…`` gives ``https://…``, and a wildcard
    interface is reached on loopback.

    :raises StatusError: a UNIX socket, port 0 or an unparsable description.
    """
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.testing import MemoryReactor

    try:
        endpoint = serverFromString(MemoryReactor(), description)  # type: ignore[no-untyped-call]
    except Exception as e:  # noqa: BLE001 - any parse problem: say so in one line
        ipv6 = _unescaped_ipv6_interface(description)
        if ipv6 is not None:
            # Twisted splits the description at every ':'; the agent refuses it too.
            raise StatusError(
                f"it is not a server endpoint: the colons of the IPv6 interface {ipv6} "
                f"must be escaped, e.g. interface={ipv6.replace(':', chr(92) + ':')}"
            ) from None
        raise StatusError(f"it is not a server endpoint ({escape_control(str(e), 100)})") from None
    port = getattr(endpoint, "_port", None)
    interface = getattr(endpoint, "_interface", None)
    if not isinstance(port, int) or not isinstance(interface, str):
        raise StatusError("it is not a TCP endpoint")
    if port == 0:
        raise StatusError("it asks for any free port (0)")
    if interface in ("", "0.0.0.0"):  # noqa: S104 - reaching it, not binding it
        interface = "127.0.0.1"
    elif interface == "::":
        interface = "::1"
    host = f"[{interface}]" if ":" in interface else interface
    scheme = "https" if "SSL" in type(endpoint).__name__ else "http"
    return f"{scheme}://{host}:{port}"


def _unescaped_ipv6_interface(description: str) -> str | None:
    """The IPv6 address after ``interface=`` written with bare colons, if any."""
    match = re.search(r"(?:^|:)interface=((?:[0-9A-Fa-f]*:){2,}[0-9A-Fa-f.]*)(?::|$)", description)
    if match is None or "\\" in description:
        return None
    address = match.group(1)
    try:
        ipaddress.IPv6Address(address)
    except ValueError:
        # Greedy: the port may follow (interface=::1:9920 is not how it is written,
        # but try without the last field before giving up).
        address = address.rsplit(":", 1)[0]
        try:
            ipaddress.IPv6Address(address)
        except ValueError:
            return None
    return escape_control(address, 60)


def _default_status_url(environ: Mapping[str, str]) -> str:
    listen = environ.get("HOSTLINK_WS_STATUS_LISTEN", "").strip()
    if not listen:
        return DEFAULT_STATUS_URL
    try:
        return status_url_from_listen(listen)
    except StatusError as e:
        raise StatusError(
            f"cannot derive the status URL from HOSTLINK_WS_STATUS_LISTEN="
            f"{escape_control(listen, 100)!r}: {e}; pass --url"
        ) from None


def _describe_fetch_error(error: BaseException, timeout: float) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {escape_control(str(error.reason), 100)}"
    if isinstance(error, urllib.error.URLError):
        if not isinstance(error.reason, BaseException):
            return escape_control(str(error.reason), 200)
        error = error.reason
    if isinstance(error, (socket.timeout, TimeoutError)):
        return f"no answer within {timeout:g}s"
    if isinstance(error, http.client.HTTPException):
        return "the answer is not HTTP"
    if isinstance(error, OSError) and error.strerror:
        return escape_control(error.strerror, 200)
    return escape_control(str(error) or type(error).__name__, 200)


def _fetch_status(url: str, timeout: float) -> dict[str, Any]:
    target = url.rstrip("/") + "/status"
    shown = escape_control(target, 200)
    try:
        with urllib.request.urlopen(target, timeout=timeout) as response:  # noqa: S310 - the operator's own endpoint
            body = response.read(MAX_STATUS_BYTES + 1)
    except (OSError, ValueError, http.client.HTTPException) as e:
        raise StatusError(f"cannot read {shown}: {_describe_fetch_error(e, timeout)}") from None
    if len(body) > MAX_STATUS_BYTES:
        raise StatusError(
            f"{shown} answered more than {MAX_STATUS_BYTES // 1024 // 1024} MiB: "
            "not an agent's status page"
        )
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise StatusError(f"{shown} did not answer JSON: not an agent's status page") from None
    if not (
        isinstance(data, dict)
        and isinstance(data.get("active"), bool)
        and isinstance(data.get("state"), str)
    ):
        raise StatusError(
            f"{shown} is not an agent's status page (a control plane's?); point --url at "
            "the agent's HOSTLINK_WS_STATUS_LISTEN"
        )
    return data


def _age(seconds: float) -> str:
    seconds = abs(seconds)
    if seconds < 60:
        return f"{seconds:.0f}s"
    units = ((86400, "d", 3600, "h"), (3600, "h", 60, "m"), (60, "m", 1, "s"))
    for size, name, smaller, smaller_name in units:
        if seconds >= size:
            whole, rest = divmod(int(seconds), size)
            return f"{whole}{name} {rest // smaller}{smaller_name}"
    return f"{seconds:.0f}s"  # pragma: no cover - unreachable


def human_time(value: object, now: float) -> str:
    """
    A ``/status`` time as ``2026-04-27 11:03:00 UTC (2m 5s ago)``.

    Takes RFC 3339 text (current agents) or Unix seconds (older ones);
    ``None`` is ``-``; anything else is shown escaped, as given.
    """
    if value is None:
        return "-"
    moment: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        moment = float(value)
    elif isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            parsed = None
        if parsed is not None and parsed.tzinfo is not None:
            moment = parsed.timestamp()
    try:
        when = datetime.fromtimestamp(moment, tz=timezone.utc) if moment is not None else None
    except (OverflowError, OSError, ValueError):
        when = None
    if moment is None or when is None:
        return escape_control(str(value), _FIELD_CHARS)
    delta = moment - now
    relative = "now" if abs(delta) < 0.5 else (
        f"in {_age(delta)}" if delta > 0 else f"{_age(delta)} ago"
    )
    return f"{when:%Y-%m-%d %H:%M:%S} UTC ({relative})"


def _shown(value: object) -> str:
    """A peer's value for the terminal: ``-`` when missing, control characters escaped."""
    if value is None or value == "":
        return "-"
    return escape_control(value if isinstance(value, str) else json.dumps(value), _FIELD_CHARS)


def _status(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    try:
        url = args.url if args.url is not None else _default_status_url(os.environ)
        state = _fetch_status(url, args.timeout)
    except StatusError as e:
        err.write(f"hostlink-tw status: {e}\n")
        return EXIT_UNREACHABLE
    active = state["active"]
    name = escape_control(state["state"], 40)
    session = "active" if active else "inactive"
    if name != session:
        session += f" ({name})"
    now = time.time()
    lines = [
        f"session:         {session}",
        f"agent id:        {_shown(state.get('agent_id'))}",
        f"url:             {_shown(state.get('url'))}",
        f"connected since: {human_time(state.get('connected_since'), now)}",
        f"last ack at:     {human_time(state.get('last_ack_at'), now)}",
        f"attempts:        {_shown(state.get('attempts'))}",
        f"last failure:    {_shown(state.get('last_failure'))}",
        f"next retry at:   {human_time(state.get('next_retry_at'), now)}",
    ]
    out.write("\n".join(lines) + "\n")
    return EXIT_ACTIVE if active else EXIT_INACTIVE


def _demo(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from hostlink_tw.demo import run_demo

    return run_demo(
        directory=args.dir,
        duration=args.duration,
        restart_after=args.restart_after,
        out=out,
    )


def _key_bits(text: str) -> int:
    """``--bits``: an integer up to :data:`MAX_RSA_BITS` (the minimum is checked with the key)."""
    try:
        bits = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if bits > MAX_RSA_BITS:
        # Generating a much larger key takes hours of CPU: refuse, do not hang.
        raise argparse.ArgumentTypeError(f"{bits} bits is too large; at most {MAX_RSA_BITS}")
    return bits


def _positive_seconds(text: str) -> float:
    """``--timeout``: a finite number of seconds above 0."""
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(seconds) and seconds > 0):
        raise argparse.ArgumentTypeError(f"{text} is not a number of seconds above 0")
    return seconds


def _status_url(text: str) -> str:
    """``--url``: an http:// or https:// URL with a host (checked before any lookup)."""
    shown = escape_control(text, 100)
    if "://" not in text:
        raise argparse.ArgumentTypeError(f"{shown!r} has no scheme: add http://, e.g. http://{shown}")
    try:
        parts = urllib.parse.urlsplit(text)
    except ValueError as e:  # an unclosed [ of an IPv6 literal
        raise argparse.ArgumentTypeError(f"{shown!r} is not a URL ({e})") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise argparse.ArgumentTypeError(
            f"{shown!r} is not an http:// or https:// URL (the status page is served over HTTP)"
        )
    if not parts.hostname:
        raise argparse.ArgumentTypeError(f"{shown!r} has no host")
    return text


def _identity_paths(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state-path",
        default=os.environ.get("HOSTLINK_STATE_PATH") or _default("HOSTLINK_STATE_PATH"),
        help="state directory for agent.json [env HOSTLINK_STATE_PATH]",
    )
    parser.add_argument(
        "--private-key-path",
        default=os.environ.get("HOSTLINK_PRIVATE_KEY_PATH") or None,
        help="private key file [env HOSTLINK_PRIVATE_KEY_PATH; default STATE_PATH/agent.key, "
        "or the Go agent's /var/lib/hostlink/agent.key when only that exists]",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hostlink-tw",
        description="Hostlink agent uplink: identity, status, demo, and tasks on agents "
        "through a control plane's operator API.",
    )
    parser.add_argument("--version", action="version", version=f"hostlink-tw {__version__}")
    # metavar: a missing command names the choices, not the internal dest.
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="{init,identity,status,demo,task,agents}"
    )

    init = commands.add_parser(
        "init", help="create this agent's key and agent.json (or complete a half-made pair)"
    )
    _identity_paths(init)
    init.add_argument("--agent-id", help="the agent id (default: a random agent-<hex>)")
    init.add_argument(
        "--bits",
        type=_key_bits,
        default=2048,
        help=f"RSA key size (default 2048, at most {MAX_RSA_BITS})",
    )
    init.add_argument("--force", action="store_true", help="replace an existing identity")
    init.set_defaults(run=_init, parser=init)

    identity = commands.add_parser("identity", help="inspect this agent's identity")
    identity.set_defaults(parser=identity)
    identity_commands = identity.add_subparsers(
        dest="identity_command", required=True, metavar="{show}"
    )
    show = identity_commands.add_parser(
        "show", help="print the agent id, public key and agents-file line (changes nothing)"
    )
    _identity_paths(show)
    show.add_argument("--json", action="store_true", help="print one JSON object")
    show.set_defaults(run=_identity_show, parser=show)

    status = commands.add_parser("status", help="summary from a running agent's status endpoint")
    status.add_argument(
        "--url",
        type=_status_url,
        default=None,
        help="status endpoint base URL (default: from HOSTLINK_WS_STATUS_LISTEN, "
        f"else {DEFAULT_STATUS_URL})",
    )
    status.add_argument(
        "--timeout", type=_positive_seconds, default=5.0, help="seconds to wait (default 5)"
    )
    status.set_defaults(run=_status, parser=status)

    demo = commands.add_parser("demo", help="run a control plane and an agent on 127.0.0.1")
    demo.add_argument("--dir", default=".demo", help="where the throwaway identity goes")
    demo.add_argument(
        "--duration",
        type=float,
        default=None,
        help="stop after this many seconds (default: Ctrl-C)",
    )
    demo.add_argument(
        "--restart-after",
        type=float,
        default=1.5,
        help="restart the control plane once, this many seconds after the first task's "
        "first line (default 1.5: in the middle of that task)",
    )
    demo.set_defaults(run=_demo, parser=demo)
    add_operator_commands(commands)
    return parser


def main(
    argv: Sequence[str] | None = None, out: TextIO = sys.stdout, err: TextIO = sys.stderr
) -> int:
    """Run the command; returns its exit status."""
    parser = _parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # An unknown option belongs to the subcommand: show its usage, not the top level's.
        sub: argparse.ArgumentParser = getattr(args, "parser", parser)
        sub.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command in ("task", "agents"):
        return run_interruptible(args.run, args, out, err)
    status: int = args.run(args, out, err)
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
