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
    session is active, 1 when not, 2 when the endpoint cannot be reached.
``hostlink-tw demo``
    run the reference control plane and an agent against it on 127.0.0.1,
    with a readable live log (see :mod:`hostlink_tw.demo`).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import secrets
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any, TextIO

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

from hostlink_tw.config import SETTINGS
from hostlink_tw.identity import (
    AgentState,
    IdentityError,
    agent_state_file,
    check_agent_id,
    default_private_key_path,
    generate_private_key,
    load_agent_state,
    load_private_key,
    new_private_key,
    public_key_base64,
    write_identity,
)

__all__ = ["main"]

EXIT_ACTIVE, EXIT_INACTIVE, EXIT_UNREACHABLE = 0, 1, 2
DEFAULT_STATUS_URL = "http://127.0.0.1:9920"


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
    has_state, has_key = os.path.lexists(state_file), os.path.lexists(key_path)
    try:
        if args.force or not (has_state or has_key):
            agent_id = requested or _random_agent_id()
            key = new_private_key(args.bits)
            write_identity(state_path, key_path, AgentState(agent_id=agent_id), key)
        elif has_key and not has_state:
            # Half-made: the key may already be registered; never replace it.
            key = load_private_key(key_path)
            agent_id = requested or _random_agent_id()
            write_identity(state_path, key_path, AgentState(agent_id=agent_id))
            err.write(f"hostlink-tw init: kept the existing key {key_path}\n")
        elif has_state and not has_key:
            agent_id = load_agent_state(state_path).agent_id
            if requested is not None and requested != agent_id:
                err.write(
                    f"hostlink-tw init: {state_file} already names agent {agent_id!r}, "
                    f"not {requested!r}; pass --force to replace the whole identity\n"
                )
                return 1
            key = generate_private_key(key_path, args.bits, overwrite=False)
            err.write(
                f"hostlink-tw init: kept {state_file}; the new key must be given to the "
                f"control plane for agent {agent_id!r}\n"
            )
        else:
            err.write(
                f"hostlink-tw init: refusing to overwrite this agent's identity "
                f"({state_file}, {key_path}); pass --force to replace it, or run "
                f"'hostlink-tw identity show' to print its public key\n"
            )
            return 1
    except IdentityError as e:
        err.write(f"hostlink-tw init: {e}\n")
        return 1
    _write_identity_report(out, _identity_report(agent_id, state_path, key_path, key))
    return 0


def _random_agent_id() -> str:
    return f"agent-{secrets.token_hex(8)}"


def _identity_show(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Print the existing identity (never writes anything)."""
    key_path = _key_path(args)
    try:
        state = load_agent_state(args.state_path)
        key = load_private_key(key_path)
    except IdentityError as e:
        err.write(f"hostlink-tw identity show: {e}\n")
        return 1
    report = _identity_report(state.agent_id, args.state_path, key_path, key)
    if args.json:
        out.write(json.dumps(report, indent=2) + "\n")
    else:
        _write_identity_report(out, report)
    return 0


def _fetch_status(url: str, timeout: float) -> dict[str, Any]:
    with urllib.request.urlopen(url.rstrip("/") + "/status", timeout=timeout) as response:  # noqa: S310 - the operator's own endpoint
        data = json.loads(response.read().decode("utf-8"))
    if not isinstance(data, dict):
        raise ValueError("status endpoint did not answer a JSON object")
    return data


def _status(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    try:
        state = _fetch_status(args.url, args.timeout)
    except (OSError, ValueError, http.client.HTTPException) as e:
        # Anything but a JSON answer from the endpoint: not an agent there.
        err.write(f"hostlink-tw status: cannot read {args.url}/status: {e!r}\n")
        return EXIT_UNREACHABLE
    active = bool(state.get("active"))
    lines = [
        f"session:         {'active' if active else 'inactive'} ({state.get('state', '?')})",
        f"agent id:        {state.get('agent_id')}",
        f"url:             {state.get('url')}",
        f"connected since: {state.get('connected_since')}",
        f"last ack at:     {state.get('last_ack_at')}",
        f"attempts:        {state.get('attempts')}",
        f"last failure:    {state.get('last_failure')}",
        f"next retry at:   {state.get('next_retry_at')}",
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
        prog="hostlink-tw", description="Hostlink agent uplink: identity, status and demo."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    init = commands.add_parser(
        "init", help="create this agent's key and agent.json (or complete a half-made pair)"
    )
    _identity_paths(init)
    init.add_argument("--agent-id", help="the agent id (default: a random agent-<hex>)")
    init.add_argument("--bits", type=int, default=2048, help="RSA key size (default 2048)")
    init.add_argument("--force", action="store_true", help="replace an existing identity")
    init.set_defaults(run=_init)

    identity = commands.add_parser("identity", help="inspect this agent's identity")
    identity_commands = identity.add_subparsers(dest="identity_command", required=True)
    show = identity_commands.add_parser(
        "show", help="print the agent id, public key and agents-file line (changes nothing)"
    )
    _identity_paths(show)
    show.add_argument("--json", action="store_true", help="print one JSON object")
    show.set_defaults(run=_identity_show)

    status = commands.add_parser("status", help="summary from a running agent's status endpoint")
    status.add_argument("--url", default=DEFAULT_STATUS_URL, help="status endpoint base URL")
    status.add_argument("--timeout", type=float, default=5.0, help="seconds to wait")
    status.set_defaults(run=_status)

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
        default=6.0,
        help="restart the control plane once after this many seconds active",
    )
    demo.set_defaults(run=_demo)
    return parser


def main(
    argv: Sequence[str] | None = None, out: TextIO = sys.stdout, err: TextIO = sys.stderr
) -> int:
    """Run the command; returns its exit status."""
    args = _parser().parse_args(argv)
    status: int = args.run(args, out, err)
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
