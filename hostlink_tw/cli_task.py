"""
``hostlink-tw task …`` and ``hostlink-tw agents``: the control plane's
operator API from the command line (:func:`add_operator_commands`).

``task run --agent ID [--wait 60s] [--json] -- COMMAND…``
    run a shell command on an agent, like ``ssh host command``: the words
    are joined with spaces and run by ``/bin/sh -c`` on the agent; its
    stdout and stderr arrive on ours as it writes them, and our exit
    status is its exit status (:mod:`~hostlink_tw.cli_taskrun` has the
    table).  Ctrl-C cancels the task.
``task list [--agent ID] [--status S] [--limit N] [--json]``
    the newest tasks first.
``task show TASK_ID [--json]``
    one task: status, exit code, times, attempts, its output.
``task logs TASK_ID [-f] [--json]``
    its stored output (stdout to stdout, stderr to stderr); ``-f`` follows
    it until the task ends.
``task cancel TASK_ID [--json]``
    cancel it (a finished task is left as it is).
``agents [--json]``
    every agent: authorized, its session, whether it takes tasks.

Each reads ``--operator-url`` (``HOSTLINK_OPERATOR_URL``, default
``http://127.0.0.1:8081``) and the bearer token from
``--operator-token-file``, else ``HOSTLINK_OPERATOR_TOKEN``, else the file
named by ``HOSTLINK_OPERATOR_TOKEN_FILE``.  Exit status of all but ``task
run``: 0 done, 1 the control plane refused (no such task, …), 2 it could
not be used (unreachable, token refused, not an operator API, usage).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from typing import Any, TextIO

from hostlink_tw.cli_taskrun import (
    EXIT_CANCELLED,
    EXIT_CLI,
    CommandFailedError,
    Follower,
    Terminal,
    describe_end,
    exit_status,
)
from hostlink_tw.controlplane.operatortoken import (
    OperatorTokenError,
    check_token,
    read_token_file,
)
from hostlink_tw.duration import DurationError, format_duration, parse_go_duration
from hostlink_tw.operatorclient import (
    OperatorClient,
    OperatorError,
    check_operator_url,
    task_path,
)
from hostlink_tw.safetext import escape_control

__all__ = ["DEFAULT_OPERATOR_URL", "DEFAULT_WAIT", "add_operator_commands", "resolve_token"]

DEFAULT_OPERATOR_URL = "http://127.0.0.1:8081"
#: ``task run --wait``: how long the agent has to take the task.
DEFAULT_WAIT = 60.0
EXIT_REFUSED = 1
# Longest text of a table cell (a command, an id).
_CELL = 60


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


def _client(args: argparse.Namespace, err: TextIO, timeout: float = 10.0) -> OperatorClient | None:
    """The client these arguments describe, or None after one line on ``err``."""
    try:
        token = resolve_token(args.operator_token_file, os.environ)
    except OperatorTokenError as e:
        err.write(f"hostlink-tw {args.command_name}: {escape_control(str(e), 500)}\n")
        return None
    return OperatorClient(args.operator_url, token, timeout=timeout)


def _fail(args: argparse.Namespace, err: TextIO, message: str) -> None:
    err.write(f"hostlink-tw {args.command_name}: {message}\n")


def _refused(args: argparse.Namespace, err: TextIO, error: OperatorError) -> int:
    _fail(args, err, str(error))
    if error.status is not None and error.status != 401 and error.code is not None:
        return EXIT_REFUSED
    return EXIT_CLI


# -- task run --------------------------------------------------------------------------


def _run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    words: list[str] = list(args.words)
    if words and words[0] == "--":
        words = words[1:]
    command = " ".join(words)
    if not command.strip():
        _fail(args, err, "no command: hostlink-tw task run --agent ID -- COMMAND…")
        return EXIT_CLI
    client = _client(args, err)
    if client is None:
        return EXIT_CLI
    terminal = Terminal(out, err, progress=_isatty(err) and not args.json,
                        name=f"hostlink-tw {args.command_name}")
    try:
        task = client.request("POST", "/tasks", {"agent_id": args.agent, "command": command})
    except OperatorError as e:
        _fail(args, err, str(e))
        return EXIT_CLI
    follower = Follower(client, task, terminal, json_events=args.json, wait=args.wait)
    try:
        try:
            ended = follower.run()
        except KeyboardInterrupt:
            terminal.clear()
            return _cancel_after_interrupt(client, follower.task_id, terminal)
    except CommandFailedError as e:
        terminal.note(e.message)
        return e.status
    note = describe_end(ended)
    if note is not None and not args.json:
        terminal.note(note)
    return exit_status(ended)


def _cancel_after_interrupt(client: OperatorClient, task_id: str, terminal: Terminal) -> int:
    """Ctrl-C: cancel the task we started (a second Ctrl-C leaves it running)."""
    shown = escape_control(task_id, 80)
    try:
        task = client.with_timeout(5.0).request("POST", task_path(task_id, "cancel"))
    except KeyboardInterrupt:
        terminal.note(f"interrupted; task {shown} was not cancelled")
        return EXIT_CANCELLED
    except OperatorError as e:
        terminal.note(f"interrupted; cancelling task {shown} failed: {e}")
        return EXIT_CANCELLED
    if task.get("status") == "cancelled":
        terminal.note(f"interrupted; task {shown} cancelled")
    else:
        terminal.note(f"interrupted; task {shown} had already ended ({task.get('status')})")
    return EXIT_CANCELLED


# -- task list / show / logs / cancel, agents ---------------------------------------------


def _list(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    client = _client(args, err)
    if client is None:
        return EXIT_CLI
    query = {"limit": str(args.limit)}
    if args.agent:
        query["agent_id"] = args.agent
    if args.status:
        query["status"] = args.status
    try:
        answer = client.request("GET", "/tasks", query=query)
    except OperatorError as e:
        return _refused(args, err, e)
    tasks = answer.get("tasks")
    if not isinstance(tasks, list):
        _fail(args, err, "the control plane's answer has no task list")
        return EXIT_CLI
    if args.json:
        out.write(json.dumps(answer, indent=2) + "\n")
        return 0
    rows = [["TASK", "AGENT", "STATUS", "EXIT", "CREATED", "COMMAND"]]
    for task in tasks:
        if isinstance(task, dict):
            code = task.get("exit_code")
            rows.append([
                _cell(task.get("task_id")), _cell(task.get("agent_id")), _cell(task.get("status")),
                "-" if code is None else _cell(code), _cell(task.get("created_at")),
                _cell(task.get("command")),
            ])
    _table(out, rows)
    total = answer.get("total")
    if isinstance(total, int) and total > len(rows) - 1:
        out.write(f"({len(rows) - 1} newest of {total}; --limit for more)\n")
    return 0


def _show(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    client = _client(args, err)
    if client is None:
        return EXIT_CLI
    try:
        task = client.request("GET", task_path(args.task_id))
    except OperatorError as e:
        return _refused(args, err, e)
    if args.json:
        out.write(json.dumps(task, indent=2) + "\n")
        return 0
    code = task.get("exit_code")
    status = _cell(task.get("status")) + ("" if code is None else f" (exit code {_cell(code)})")
    attempts = task.get("attempts")
    if not isinstance(attempts, list):
        attempts = []
    lines = [
        f"task:      {_cell(task.get('task_id'))}",
        f"agent:     {_cell(task.get('agent_id'))}",
        f"command:   {escape_control(str(task.get('command')), 2000)}",
        f"status:    {status}",
        f"created:   {_cell(task.get('created_at'))}",
        f"started:   {_cell(task.get('started_at'))}",
        f"ended:     {_cell(task.get('ended_at'))}",
        f"attempts:  {len(attempts)}",
        f"truncated: stdout {'yes' if task.get('output_truncated') else 'no'}, "
        f"stderr {'yes' if task.get('error_truncated') else 'no'}",
    ]
    out.write("\n".join(lines) + "\n")
    for stream in ("stdout", "stderr"):
        text = task.get(stream)
        if not isinstance(text, str) or not text:
            continue
        omitted = task.get(f"{stream}_omitted_bytes")
        more = f" (its last part; {omitted} bytes before it: task logs)" if omitted else ""
        out.write(f"--- {stream}{more} ---\n")
        Terminal(out, err, progress=False).write("stdout", text if text.endswith("\n")
                                                 else text + "\n")
    return 0


def _logs(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    client = _client(args, err)
    if client is None:
        return EXIT_CLI
    terminal = Terminal(out, err, progress=_isatty(err) and args.follow and not args.json,
                        name=f"hostlink-tw {args.command_name}")
    task = {"task_id": args.task_id}
    follower = Follower(client, task, terminal, follow=args.follow, json_events=args.json,
                        refused_status=EXIT_REFUSED)
    try:
        follower.run()
    except CommandFailedError as e:
        terminal.note(e.message)
        return e.status
    return 0


def _cancel(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    client = _client(args, err)
    if client is None:
        return EXIT_CLI
    try:
        task = client.request("POST", task_path(args.task_id, "cancel"))
    except OperatorError as e:
        return _refused(args, err, e)
    if args.json:
        out.write(json.dumps(task, indent=2) + "\n")
    elif task.get("status") == "cancelled":
        out.write(f"task {_cell(task.get('task_id'))} cancelled\n")
    else:
        code = task.get("exit_code")
        out.write(f"task {_cell(task.get('task_id'))} had already ended: "
                  f"{_cell(task.get('status'))}{'' if code is None else f' (exit code {code})'}\n")
    return 0


def _agents(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    client = _client(args, err)
    if client is None:
        return EXIT_CLI
    try:
        answer = client.request("GET", "/agents")
    except OperatorError as e:
        return _refused(args, err, e)
    agents = answer.get("agents")
    if not isinstance(agents, list):
        _fail(args, err, "the control plane's answer has no agent list")
        return EXIT_CLI
    if args.json:
        out.write(json.dumps(answer, indent=2) + "\n")
        return 0
    rows = [["AGENT", "AUTHORIZED", "SESSION", "TAKES TASKS", "UNFINISHED", "SINCE", "REMOTE"]]
    for agent in agents:
        if not isinstance(agent, dict):
            continue
        session = agent.get("session") if isinstance(agent.get("session"), dict) else None
        state = "none" if session is None else ("active" if session.get("active") else "opening")
        rows.append([
            _cell(agent.get("agent_id")), "yes" if agent.get("authorized") else "no", state,
            "yes" if agent.get("accepts_tasks") else "no", _cell(agent.get("unfinished_tasks")),
            _cell(None if session is None else session.get("connected_since")),
            _cell(None if session is None else session.get("remote")),
        ])
    _table(out, rows)
    return 0


# -- output helpers ----------------------------------------------------------------------


def _cell(value: object) -> str:
    if value is None or value == "":
        return "-"
    return escape_control(value if isinstance(value, str) else json.dumps(value), _CELL)


def _table(out: TextIO, rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        out.write("  ".join(cells).rstrip() + "\n")


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


# -- the parsers -----------------------------------------------------------------------


def _wait(text: str) -> float:
    """``--wait``: a Go duration (``60s``, ``2m``); 0 waits without limit."""
    try:
        seconds = parse_go_duration(text)
    except DurationError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if seconds < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return seconds


def _operator_url(text: str) -> str:
    try:
        return check_operator_url(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive_int(text: str) -> int:
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= 1000:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from 1 to 1000")
    return int(text)


def _connection_options(parser: argparse.ArgumentParser, name: str) -> None:
    # argparse checks a string default with the option's type too: a bad
    # HOSTLINK_OPERATOR_URL is a usage error naming --operator-url.
    default_url = os.environ.get("HOSTLINK_OPERATOR_URL", "").strip() or DEFAULT_OPERATOR_URL
    parser.add_argument(
        "--operator-url", type=_operator_url, default=default_url,
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


def add_operator_commands(commands: Any) -> None:
    """Add ``task`` and ``agents`` to the ``hostlink-tw`` subcommands."""
    task = commands.add_parser("task", help="run, list, show, follow or cancel tasks on agents")
    task.set_defaults(parser=task)
    sub = task.add_subparsers(
        dest="task_command", required=True, metavar="{run,list,show,logs,cancel}"
    )

    run = sub.add_parser(
        "run", help="run a command on an agent; its output and exit status are ours",
        description="Run COMMAND (its words joined with spaces, run by /bin/sh -c) on the "
        "agent and stream its stdout and stderr here; exit with its exit status (130 "
        "cancelled, 137 killed by a signal or timeout, 143 interrupted, 2 hostlink-tw's "
        "own errors). Ctrl-C cancels the task.",
    )
    run.add_argument("--agent", required=True, help="the agent's id")
    run.add_argument(
        "--wait", type=_wait, default=DEFAULT_WAIT,
        help=f"how long the agent has to take the task, then it is cancelled and the exit "
        f"status is 2 (default {format_duration(DEFAULT_WAIT)}; 0: no limit)",
    )
    run.add_argument("--json", action="store_true",
                     help="print the API's events as JSON lines instead of the output")
    run.add_argument("words", nargs=argparse.REMAINDER, metavar="-- COMMAND…")
    _connection_options(run, "task run")
    run.set_defaults(run=_run)

    listing = sub.add_parser("list", help="tasks, newest first")
    listing.add_argument("--agent", help="only this agent's")
    listing.add_argument("--status", help="only tasks with this status")
    listing.add_argument("--limit", type=_positive_int, default=100,
                         help="at most this many (default 100, at most 1000)")
    listing.add_argument("--json", action="store_true", help="print the API's JSON")
    _connection_options(listing, "task list")
    listing.set_defaults(run=_list)

    show = sub.add_parser("show", help="one task: status, exit code, times, output")
    show.add_argument("task_id")
    show.add_argument("--json", action="store_true", help="print the API's JSON")
    _connection_options(show, "task show")
    show.set_defaults(run=_show)

    logs = sub.add_parser("logs", help="a task's output (stdout here, stderr on stderr)")
    logs.add_argument("task_id")
    logs.add_argument("-f", "--follow", action="store_true", help="follow until the task ends")
    logs.add_argument("--json", action="store_true", help="print the API's events as JSON lines")
    _connection_options(logs, "task logs")
    logs.set_defaults(run=_logs)

    cancel = sub.add_parser("cancel", help="cancel a task")
    cancel.add_argument("task_id")
    cancel.add_argument("--json", action="store_true", help="print the task as JSON")
    _connection_options(cancel, "task cancel")
    cancel.set_defaults(run=_cancel)

    agents = commands.add_parser("agents", help="agents and their sessions (operator API)")
    agents.add_argument("--json", action="store_true", help="print the API's JSON")
    _connection_options(agents, "agents")
    agents.set_defaults(run=_agents)


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

