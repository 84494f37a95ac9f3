"""
The ``hostlink-tw`` command (also ``python -m hostlink_tw``).

``hostlink-tw init``
    create this agent's identity: an RSA key (mode 0600) and ``agent.json``;
    print the public key the control plane stores and a line for the
    reference control plane's agents file.
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

from hostlink_tw import __version__
from hostlink_tw.config import SETTINGS
from hostlink_tw.identity import (
    AgentState,
    IdentityError,
    agent_state_file,
    check_agent_id,
    generate_private_key,
    public_key_base64,
    write_agent_state,
)

__all__ = ["main"]

EXIT_ACTIVE, EXIT_INACTIVE, EXIT_UNREACHABLE = 0, 1, 2
DEFAULT_STATUS_URL = "http://127.0.0.1:9920"


def _default(env: str) -> str:
    return next(spec.default for spec in SETTINGS if spec.env == env)


def _init(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    state_path: str = args.state_path
    key_path: str = args.private_key_path or os.path.join(state_path, "agent.key")
    agent_id: str = args.agent_id or f"agent-{secrets.token_hex(8)}"
    try:
        check_agent_id(agent_id)
    except ValueError as e:
        err.write(f"hostlink-tw init: {e}\n")
        return 2
    existing = [p for p in (agent_state_file(state_path), key_path) if os.path.lexists(p)]
    if existing and not args.force:
        err.write(
            f"hostlink-tw init: refusing to overwrite this agent's identity "
            f"({', '.join(existing)}); pass --force to replace it\n"
        )
        return 1
    try:
        key = generate_private_key(key_path, args.bits)
        write_agent_state(state_path, AgentState(agent_id=agent_id))
    except IdentityError as e:
        err.write(f"hostlink-tw init: {e}\n")
        return 1
    public = public_key_base64(key)
    out.write(
        f"agent id:    {agent_id}\n"
        f"agent state: {agent_state_file(state_path)}\n"
        f"private key: {key_path} (mode 0600)\n"
        f"public key (base64 PKIX DER, as the control plane stores it):\n{public}\n"
        f"line for the reference control plane's agents file:\n"
        f"{json.dumps({agent_id: public})}\n"
    )
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hostlink-tw", description="Hostlink agent uplink: identity, status and demo."
    )
    parser.add_argument("--version", action="version", version=f"hostlink-tw {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    init = commands.add_parser("init", help="create this agent's key and agent.json")
    init.add_argument(
        "--state-path",
        default=os.environ.get("HOSTLINK_STATE_PATH") or _default("HOSTLINK_STATE_PATH"),
        help="state directory for agent.json [env HOSTLINK_STATE_PATH]",
    )
    init.add_argument(
        "--private-key-path",
        default=os.environ.get("HOSTLINK_PRIVATE_KEY_PATH") or None,
        help="private key file [env HOSTLINK_PRIVATE_KEY_PATH; default STATE_PATH/agent.key]",
    )
    init.add_argument("--agent-id", help="the agent id (default: a random agent-<hex>)")
    init.add_argument("--bits", type=int, default=2048, help="RSA key size (default 2048)")
    init.add_argument("--force", action="store_true", help="replace an existing identity")
    init.set_defaults(run=_init)

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
