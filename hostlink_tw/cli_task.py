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

Each reads ``--operator-url`` and the bearer token as
:mod:`~hostlink_tw.cli_operator` says, which also has their exit statuses.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, TextIO

from hostlink_tw.cli_operator import (
    DEFAULT_OPERATOR_URL,
    EXIT_REFUSED,
    connection_options,
    fail,
    isatty,
    make_client,
    positive_int,
    refused,
    run_interruptible,
    wait_duration,
)
from hostlink_tw.cli_taskrun import (
    EXIT_CANCELLED,
    EXIT_CLI,
    CommandFailedError,
    Follower,
    Terminal,
    describe_end,
    exit_status,
)
from hostlink_tw.duration import format_duration
from hostlink_tw.operatorclient import (
    OperatorClient,
    OperatorError,
    task_path,
)
from hostlink_tw.safetext import escape_control

__all__ = ["DEFAULT_OPERATOR_URL", "DEFAULT_WAIT", "add_operator_commands", "run_interruptible"]

#: ``task run --wait``: how long the agent has to take the task.
DEFAULT_WAIT = 60.0
# Longest text of a table cell (a command, an id).
_CELL = 60


# -- task run --------------------------------------------------------------------------


def _run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    words: list[str] = list(args.words)
    if words and words[0] == "--":
        words = words[1:]
    command = " ".join(words)
    if not command.strip():
        fail(args, err, "no command: hostlink-tw task run --agent ID -- COMMAND…")
        return EXIT_CLI
    client = make_client(args, err)
    if client is None:
        return EXIT_CLI
    terminal = Terminal(out, err, progress=isatty(err) and not args.json,
                        name=f"hostlink-tw {args.command_name}")
    try:
        task = client.request("POST", "/tasks", {"agent_id": args.agent, "command": command})
    except OperatorError as e:
        fail(args, err, str(e))
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
    client = make_client(args, err)
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
        return refused(args, err, e)
    tasks = answer.get("tasks")
    if not isinstance(tasks, list):
        fail(args, err, "the control plane's answer has no task list")
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
    client = make_client(args, err)
    if client is None:
        return EXIT_CLI
    try:
        task = client.request("GET", task_path(args.task_id))
    except OperatorError as e:
        return refused(args, err, e)
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
    client = make_client(args, err)
    if client is None:
        return EXIT_CLI
    terminal = Terminal(out, err, progress=isatty(err) and args.follow and not args.json,
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
    client = make_client(args, err)
    if client is None:
        return EXIT_CLI
    try:
        task = client.request("POST", task_path(args.task_id, "cancel"))
    except OperatorError as e:
        return refused(args, err, e)
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
    client = make_client(args, err)
    if client is None:
        return EXIT_CLI
    try:
        answer = client.request("GET", "/agents")
    except OperatorError as e:
        return refused(args, err, e)
    agents = answer.get("agents")
    if not isinstance(agents, list):
        fail(args, err, "the control plane's answer has no agent list")
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
        "--wait", type=wait_duration, default=DEFAULT_WAIT,
        help=f"how long the agent has to take the task, then it is cancelled and the exit "
        f"status is 2 (default {format_duration(DEFAULT_WAIT)}; 0: no limit)",
    )
    run.add_argument("--json", action="store_true",
                     help="print the API's events as JSON lines instead of the output")
    run.add_argument("words", nargs=argparse.REMAINDER, metavar="-- COMMAND…")
    connection_options(run, "task run")
    run.set_defaults(run=_run)

    listing = sub.add_parser("list", help="tasks, newest first")
    listing.add_argument("--agent", help="only this agent's")
    listing.add_argument("--status", help="only tasks with this status")
    listing.add_argument("--limit", type=positive_int, default=100,
                         help="at most this many (default 100, at most 1000)")
    listing.add_argument("--json", action="store_true", help="print the API's JSON")
    connection_options(listing, "task list")
    listing.set_defaults(run=_list)

    show = sub.add_parser("show", help="one task: status, exit code, times, output")
    show.add_argument("task_id")
    show.add_argument("--json", action="store_true", help="print the API's JSON")
    connection_options(show, "task show")
    show.set_defaults(run=_show)

    logs = sub.add_parser("logs", help="a task's output (stdout here, stderr on stderr)")
    logs.add_argument("task_id")
    logs.add_argument("-f", "--follow", action="store_true", help="follow until the task ends")
    logs.add_argument("--json", action="store_true", help="print the API's events as JSON lines")
    connection_options(logs, "task logs")
    logs.set_defaults(run=_logs)

    cancel = sub.add_parser("cancel", help="cancel a task")
    cancel.add_argument("task_id")
    cancel.add_argument("--json", action="store_true", help="print the task as JSON")
    connection_options(cancel, "task cancel")
    cancel.set_defaults(run=_cancel)

    agents = commands.add_parser("agents", help="agents and their sessions (operator API)")
    agents.add_argument("--json", action="store_true", help="print the API's JSON")
    connection_options(agents, "agents")
    agents.set_defaults(run=_agents)


