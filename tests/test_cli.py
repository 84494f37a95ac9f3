"""The hostlink-tw command: init, status, demo."""

from __future__ import annotations

import io
import json
import os
import shlex
import socket
import stat
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from hostlink_tw import cli, provisioning
from hostlink_tw.agent import identity
from hostlink_tw.agent.identity import AgentState, load_agent_state, load_private_key
from hostlink_tw.cli import human_time, main, status_url_from_listen
from hostlink_tw.config import load_settings
from hostlink_tw.protocol import AGENT_ID_RULE
from hostlink_tw.provisioning import generate_private_key, write_agent_state
from hostlink_tw.signing import RequestSigner
from hostlink_tw.wire.keys import load_public_key, public_key_base64


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = main(list(argv), out=out, err=err)
    return status, out.getvalue(), err.getvalue()


def usage_error(case: SynchronousTestCase, *argv: str) -> str:
    """Run a command line argparse refuses: exit status 2; returns what it wrote to stderr."""
    err = io.StringIO()
    case.patch(sys, "stderr", err)
    with case.assertRaises(SystemExit) as raised:
        main(list(argv), out=io.StringIO(), err=io.StringIO())
    case.assertEqual(raised.exception.code, 2)
    return err.getvalue()


class InitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.state = os.path.abspath(self.mktemp())

    def test_creates_identity_and_prints_public_key(self) -> None:
        status, out, err = run("init", "--state-path", self.state, "--agent-id", "agent-7")
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(load_agent_state(self.state).agent_id, "agent-7")
        key_path = os.path.join(self.state, "agent.key")
        self.assertEqual(stat.S_IMODE(os.stat(key_path).st_mode), 0o600)
        key = load_private_key(key_path)
        agents_line = json.loads(out.strip().splitlines()[-1])
        public = load_public_key(agents_line["agent-7"])
        self.assertEqual(public.public_numbers(), key.public_key().public_numbers())
        with open(key_path, "rb") as f:
            self.assertTrue(f.read().startswith(b"-----BEGIN RSA PRIVATE KEY-----"))

    def test_random_agent_id_by_default(self) -> None:
        self.assertEqual(run("init", "--state-path", self.state)[0], 0)
        self.assertTrue(load_agent_state(self.state).agent_id.startswith("agent-"))

    def test_refuses_to_overwrite_without_force(self) -> None:
        self.assertEqual(run("init", "--state-path", self.state, "--agent-id", "a1")[0], 0)
        key_before = open(os.path.join(self.state, "agent.key"), "rb").read()
        status, out, err = run("init", "--state-path", self.state, "--agent-id", "a2")
        self.assertEqual(status, 1)
        self.assertIn("--force", err)
        self.assertEqual(load_agent_state(self.state).agent_id, "a1")
        self.assertEqual(open(os.path.join(self.state, "agent.key"), "rb").read(), key_before)
        status, _, _ = run("init", "--state-path", self.state, "--agent-id", "a2", "--force")
        self.assertEqual(status, 0)
        self.assertEqual(load_agent_state(self.state).agent_id, "a2")
        self.assertNotEqual(open(os.path.join(self.state, "agent.key"), "rb").read(), key_before)

    def test_refusal_names_paths_and_identity_show(self) -> None:
        """A usable pair: the refusal offers identity show and --force, both on these paths."""
        self.assertEqual(run("init", "--state-path", self.state)[0], 0)
        status, _, err = run("init", "--state-path", self.state)
        self.assertEqual(status, 1)
        quoted = shlex.quote(self.state)
        self.assertIn(f"'hostlink-tw identity show --state-path {quoted}'", err)
        self.assertIn(f"'hostlink-tw init --force --state-path {quoted}'", err)
        self.assertEqual(len(err.splitlines()), 1)

    def test_refusal_of_an_unusable_pair_suggests_force_not_identity_show(self) -> None:
        """agent.json {"agent_id": 5} next to a key: identity show would fail too."""
        self.assertEqual(run("init", "--state-path", self.state)[0], 0)
        with open(os.path.join(self.state, "agent.json"), "w") as f:
            f.write('{"agent_id": 5}')
        status, _, err = run("init", "--state-path", self.state)
        self.assertEqual(status, 1)
        self.assertIn("unusable", err)
        self.assertIn(f"'hostlink-tw init --force --state-path {shlex.quote(self.state)}'", err)
        self.assertNotIn("identity show", err)
        self.assertEqual(len(err.splitlines()), 1)

    def test_refuses_key_path_that_is_the_state_file(self) -> None:
        """--private-key-path STATE/agent.json would be overwritten by agent.json itself."""
        same = os.path.join(self.state, "agent.json")
        for command in (("init", "--force"), ("init",), ("identity", "show")):
            with self.subTest(command=command):
                status, out, err = run(
                    *command, "--state-path", self.state, "--private-key-path", same
                )
                self.assertEqual((status, out), (2, ""))
                self.assertIn(f"private key path {same} is the agent state file {same}", err)
                self.assertEqual(len(err.splitlines()), 1)
        self.assertFalse(os.path.exists(same))

    def test_refuses_key_path_that_is_the_state_file_by_inode(self) -> None:
        """A hard link to agent.json is the same file, whatever its name."""
        self.assertEqual(run("init", "--state-path", self.state)[0], 0)
        link = os.path.abspath(self.mktemp())
        os.link(os.path.join(self.state, "agent.json"), link)
        status, _, err = run(
            "init", "--force", "--state-path", self.state, "--private-key-path", link
        )
        self.assertEqual(status, 2)
        self.assertIn(link, err)
        self.assertEqual(load_agent_state(self.state).agent_id[:6], "agent-")

    def test_missing_key_hint_completes_the_pair_here(self) -> None:
        """Only agent.json: the hint is plain init on this state path, which then works."""
        write_agent_state(self.state, AgentState("agt_7"))
        status, _, err = run("identity", "show", "--state-path", self.state)
        self.assertEqual(status, 1)
        hint = f"'hostlink-tw init --state-path {shlex.quote(self.state)}'"
        self.assertIn(hint, err)
        self.assertNotIn("--force", err)
        status, _, err = run(*shlex.split(hint.strip("'"))[1:])
        self.assertEqual(status, 0, err)

    def test_bits_is_bounded(self) -> None:
        """A huge --bits would burn CPU for hours: a usage error instead."""

        def no_key(bits: int) -> None:
            raise AssertionError(f"a {bits}-bit key was being generated")

        self.patch(cli, "new_private_key", no_key)
        err = usage_error(self, "init", "--state-path", self.state, "--bits", "100000000")
        self.assertIn("at most 16384", err)
        self.assertIn("usage: hostlink-tw init", err)
        self.assertFalse(os.path.exists(self.state))

    def test_unknown_option_shows_the_subcommand_usage(self) -> None:
        err = usage_error(self, "init", "--bogus")
        self.assertIn("usage: hostlink-tw init", err)
        self.assertIn("unrecognized arguments: --bogus", err)

    def test_refuses_bad_agent_id(self) -> None:
        for bad in ("bad\nid", "agënt", "a" * 257, "agt\ud800"):
            status, _, err = run("init", "--state-path", self.state, "--agent-id", bad)
            self.assertEqual(status, 2)
            self.assertTrue(err.startswith("hostlink-tw init:"))
            self.assertIn(AGENT_ID_RULE, err)
            self.assertEqual(err.count("\n"), 1)
            self.assertFalse(os.path.exists(self.state))

    # -- issue 10.7: --force never leaves a key nobody registered ------------------

    def files(self) -> dict[str, bytes]:
        """Every file in the state directory, by name (temporary files included)."""
        result = {}
        for name in sorted(os.listdir(self.state)):
            path = os.path.join(self.state, name)
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    result[name] = f.read()
        return result

    def test_force_keeps_old_key_when_agent_json_is_a_directory(self) -> None:
        self.assertEqual(run("init", "--state-path", self.state, "--agent-id", "a1")[0], 0)
        state_file = os.path.join(self.state, "agent.json")
        os.unlink(state_file)
        os.mkdir(state_file)
        before = self.files()
        status, out, err = run("init", "--state-path", self.state, "--agent-id", "a2", "--force")
        self.assertEqual((status, out), (1, ""))
        self.assertIn(f"cannot write agent state file {state_file}", err)
        self.assertEqual(err.count("\n"), 1)
        self.assertEqual(self.files(), before)  # same key bytes, no temporary files
        self.assertTrue(os.path.isdir(state_file))

    def test_force_keeps_old_identity_when_agent_json_write_fails(self) -> None:
        self.assertEqual(run("init", "--state-path", self.state, "--agent-id", "a1")[0], 0)
        before = self.files()
        self.assertEqual(sorted(before), ["agent.json", "agent.key"])

        def failing_rename(source: str, destination: str) -> None:
            if destination.endswith("agent.json"):
                raise PermissionError(13, "Permission denied", destination)
            os.replace(source, destination)

        self.patch(provisioning, "_rename", failing_rename)
        status, _, err = run("init", "--state-path", self.state, "--agent-id", "a2", "--force")
        self.assertEqual(status, 1)
        self.assertIn("permission denied", err)
        self.assertEqual(self.files(), before)  # both files byte for byte, nothing left over
        self.assertEqual(load_agent_state(self.state).agent_id, "a1")

    def test_new_identity_leaves_no_key_when_agent_json_write_fails(self) -> None:
        def failing_rename(source: str, destination: str) -> None:
            if destination.endswith("agent.json"):
                raise PermissionError(13, "Permission denied", destination)
            os.replace(source, destination)

        self.patch(provisioning, "_rename", failing_rename)
        self.assertEqual(run("init", "--state-path", self.state, "--agent-id", "a1")[0], 1)
        self.assertEqual(self.files(), {})  # a rerun needs no --force

    # -- issue 9.10: completing a half-made identity ----------------------------------

    def test_completes_identity_for_an_existing_key(self) -> None:
        key_path = os.path.join(self.state, "agent.key")
        key = generate_private_key(key_path)
        with open(key_path, "rb") as f:
            key_bytes = f.read()
        status, out, err = run("init", "--state-path", self.state, "--agent-id", "agt_9")
        self.assertEqual(status, 0, err)
        self.assertIn("kept the existing key", err)
        with open(key_path, "rb") as f:
            self.assertEqual(f.read(), key_bytes)
        self.assertEqual(load_agent_state(self.state).agent_id, "agt_9")
        self.assertEqual(
            json.loads(out.strip().splitlines()[-1]), {"agt_9": public_key_base64(key)}
        )

    def test_completes_identity_for_an_existing_agent_json(self) -> None:
        write_agent_state(self.state, AgentState("agt_7"))
        status, out, err = run("init", "--state-path", self.state)
        self.assertEqual(status, 0, err)
        self.assertIn("new key", err)
        key = load_private_key(os.path.join(self.state, "agent.key"))
        self.assertEqual(
            json.loads(out.strip().splitlines()[-1]), {"agt_7": public_key_base64(key)}
        )
        self.assertEqual(load_agent_state(self.state).agent_id, "agt_7")

    def test_existing_agent_json_with_another_id_is_refused(self) -> None:
        write_agent_state(self.state, AgentState("agt_7"))
        status, _, err = run("init", "--state-path", self.state, "--agent-id", "agt_8")
        self.assertEqual(status, 1)
        self.assertIn("'agt_7'", err)
        self.assertFalse(os.path.exists(os.path.join(self.state, "agent.key")))

    # -- issue 9.8: init and the agent agree on the key path ----------------------------

    def test_agent_finds_the_key_init_wrote(self) -> None:
        self.patch(identity, "GO_DEFAULT_PRIVATE_KEY_PATH", os.path.abspath(self.mktemp()))
        self.assertEqual(run("init", "--state-path", self.state, "--agent-id", "agt_1")[0], 0)
        settings = load_settings(environ={"HOSTLINK_STATE_PATH": self.state})
        self.assertEqual(settings.private_key_path, os.path.join(self.state, "agent.key"))
        signer = RequestSigner(settings.private_key_path, load_agent_state(self.state).agent_id)
        self.assertEqual(signer.agent_id, "agt_1")

    def test_go_layout_keeps_working(self) -> None:
        go_key = os.path.join(os.path.abspath(self.mktemp()), "agent.key")
        self.patch(identity, "GO_DEFAULT_PRIVATE_KEY_PATH", go_key)
        key = generate_private_key(go_key)
        write_agent_state(self.state, AgentState("agt_go"))
        logged: list[dict[str, Any]] = []
        settings = load_settings(
            environ={"HOSTLINK_STATE_PATH": self.state}, log=Logger(observer=logged.append)
        )
        self.assertEqual(settings.private_key_path, go_key)
        self.assertTrue(any(e.get("path") == go_key for e in logged), logged)
        # init sees the same (complete) identity and leaves it alone...
        status, _, err = run("init", "--state-path", self.state)
        self.assertEqual(status, 1)
        self.assertIn(go_key, err)
        # ...and identity show prints it.
        status, out, _ = run("identity", "show", "--state-path", self.state, "--json")
        self.assertEqual(status, 0)
        self.assertEqual(json.loads(out)["public_key"], public_key_base64(key))
        # An explicit HOSTLINK_PRIVATE_KEY_PATH always wins.
        other = os.path.join(self.state, "other.key")
        settings = load_settings(
            environ={"HOSTLINK_STATE_PATH": self.state, "HOSTLINK_PRIVATE_KEY_PATH": other}
        )
        self.assertEqual(settings.private_key_path, other)


class IdentityCommandTests(SynchronousTestCase):
    def test_missing_subcommand_names_the_choices(self) -> None:
        err = usage_error(self, "identity")
        self.assertIn("usage: hostlink-tw identity", err)
        self.assertIn("required: {show}", err)
        self.assertNotIn("identity_command", err)

    def test_unknown_option_shows_identity_show_usage(self) -> None:
        err = usage_error(self, "identity", "show", "-x")
        self.assertIn("usage: hostlink-tw identity show", err)


class IdentityShowTests(SynchronousTestCase):
    """Issue 9.10: print an existing identity without rotating anything."""

    def setUp(self) -> None:
        self.state = os.path.abspath(self.mktemp())
        self.assertEqual(run("init", "--state-path", self.state, "--agent-id", "agt_5")[0], 0)
        self.key = load_private_key(os.path.join(self.state, "agent.key"))

    def snapshot(self) -> dict[str, tuple[bytes, int]]:
        result = {}
        for name in os.listdir(self.state):
            path = os.path.join(self.state, name)
            with open(path, "rb") as f:
                result[name] = (f.read(), os.stat(path).st_mtime_ns)
        return result

    def test_text(self) -> None:
        before = self.snapshot()
        status, out, err = run("identity", "show", "--state-path", self.state)
        self.assertEqual((status, err), (0, ""))
        public = public_key_base64(self.key)
        self.assertIn("agent id:    agt_5\n", out)
        self.assertIn(public + "\n", out)
        self.assertEqual(json.loads(out.strip().splitlines()[-1]), {"agt_5": public})
        self.assertEqual(self.snapshot(), before)

    def test_json(self) -> None:
        status, out, _ = run("identity", "show", "--state-path", self.state, "--json")
        self.assertEqual(status, 0)
        report = json.loads(out)
        public = public_key_base64(self.key)
        self.assertEqual(
            report,
            {
                "agent_id": "agt_5",
                "agent_state_file": os.path.join(self.state, "agent.json"),
                "private_key_path": os.path.join(self.state, "agent.key"),
                "public_key": public,
                "agents_file_entry": {"agt_5": public},
            },
        )
        self.assertEqual(
            load_public_key(report["public_key"]).public_numbers(),
            self.key.public_key().public_numbers(),
        )

    def test_missing_identity_is_one_line(self) -> None:
        os.unlink(os.path.join(self.state, "agent.key"))
        status, out, err = run("identity", "show", "--state-path", self.state)
        self.assertEqual((status, out), (1, ""))
        self.assertTrue(err.startswith("hostlink-tw identity show: private key file"))
        self.assertEqual(err.count("\n"), 1)


class _StatusHandler(BaseHTTPRequestHandler):
    state: Any = {}
    raw: bytes | None = None

    def do_GET(self) -> None:
        body = self.raw if self.raw is not None else json.dumps(self.state).encode()
        self.send_response(200 if self.path == "/status" else 404)
        self.send_header("content-type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


class StatusTests(SynchronousTestCase):
    def serve(self, state: Any, raw: bytes | None = None) -> str:
        handler = type("Handler", (_StatusHandler,), {"state": state, "raw": raw})
        server = HTTPServer(("127.0.0.1", 0), handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()

        def stop() -> None:
            server.shutdown()
            server.server_close()
            thread.join(10)

        self.addCleanup(stop)
        return f"http://127.0.0.1:{server.server_address[1]}"

    def test_active_exits_0(self) -> None:
        url = self.serve({"active": True, "state": "active", "agent_id": "agent-9"})
        status, out, _ = run("status", "--url", url)
        self.assertEqual(status, 0)
        self.assertIn("session:         active\n", out)
        self.assertNotIn("active (active)", out)
        self.assertIn("agent-9", out)

    def test_human_output(self) -> None:
        """Issue 9 item 14: human times, "-" for missing values, no Python reprs."""
        now = time.time()
        url = self.serve({
            "active": True,
            "state": "active",
            "agent_id": "agent-9",
            "url": "wss://cp.example/api/v1/agents/ws",
            "connected_since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 125)),
            "last_ack_at": now - 3600 * 3,  # an older agent's Unix seconds
            "attempts": 0,
            "last_failure": None,
            "next_retry_at": None,
        })
        status, out, err = run("status", "--url", url)
        self.assertEqual((status, err), (0, ""))
        lines = dict(line.split(":", 1) for line in out.splitlines())
        self.assertRegex(
            lines["connected since"].strip(),
            r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC \(2m [456]s ago\)$",
        )
        self.assertRegex(lines["last ack at"].strip(), r"UTC \(3h 0m ago\)$")
        self.assertEqual(lines["last failure"].strip(), "-")
        self.assertEqual(lines["next retry at"].strip(), "-")
        self.assertEqual(lines["attempts"].strip(), "0")
        self.assertNotIn("None", out)

    def test_human_time(self) -> None:
        now = 1_780_272_000.0  # 2026-06-01T00:00:00Z
        cases = [
            (None, "-"),
            ("2026-06-01T00:00:00Z", "2026-06-01 00:00:00 UTC (now)"),
            ("2026-05-31T23:59:50Z", "2026-05-31 23:59:50 UTC (10s ago)"),
            ("2026-06-01T00:00:03Z", "2026-06-01 00:00:03 UTC (in 3s)"),
            ("2026-05-29T22:00:00Z", "2026-05-29 22:00:00 UTC (2d 2h ago)"),
            (now - 61, "2026-05-31 23:58:59 UTC (1m 1s ago)"),
            ("2026-06-01T00:00:00", "2026-06-01T00:00:00"),  # no zone: shown as given
            ("soon\x1b[2J", "soon\\x1b[2J"),
            (float("nan"), "nan"),
            (1e300, "1e+300"),
            (True, "True"),
        ]
        for value, expected in cases:
            with self.subTest(value=value):
                self.assertEqual(human_time(value, now), expected)

    def test_peer_text_is_escaped(self) -> None:
        """Issue 10 item 13: a hostile page cannot write control sequences to the terminal."""
        url = self.serve({
            "active": False,
            "state": "waiting\x1b[31m",
            "agent_id": "agent\r\x1b[2Kforged",
            "url": "wss://cp.example/\x9b2J",
            "last_failure": "closed 1008: \x1b]0;pwned\x07" + "x" * 5000,
            "attempts": "\x1b",
            "connected_since": "\ud800",
        })
        status, out, err = run("status", "--url", url)
        self.assertEqual((status, err), (1, ""))
        for character in ("\x1b", "\r", "\x9b", "\x07", "\ud800"):
            self.assertNotIn(character, out)
        self.assertIn("agent\\r\\x1b[2Kforged", out)
        self.assertIn("inactive (waiting\\x1b[31m)", out)
        self.assertLess(max(len(line) for line in out.splitlines()), 400)
        out.encode("utf-8")

    def test_control_plane_page_is_not_an_agent_page(self) -> None:
        """Issue 9 item 14: pointed at the control plane's /status: a clear error, exit 2."""
        for page in ({"sessions": [], "agents": 3}, [1, 2], "text", {"active": "yes",
                                                                      "state": "active"}):
            with self.subTest(page=page):
                url = self.serve(page)
                status, out, err = run("status", "--url", url)
                self.assertEqual((status, out), (2, ""))
                self.assertIn("is not an agent's status page", err)
                self.assertEqual(err.count("\n"), 1)

    def test_not_json(self) -> None:
        url = self.serve(None, raw=b"<html>\x1b[2J</html>")
        status, _, err = run("status", "--url", url)
        self.assertEqual(status, 2)
        self.assertIn("did not answer JSON", err)
        self.assertNotIn("\x1b", err)

    def test_answer_is_bounded(self) -> None:
        """Issue 10 item 13: at most 1 MiB is read."""
        big = json.dumps({"active": True, "state": "active", "pad": "x" * (1024 * 1024)})
        url = self.serve(None, raw=big.encode())
        status, out, err = run("status", "--url", url)
        self.assertEqual((status, out), (2, ""))
        self.assertIn("more than 1 MiB", err)

    def test_default_url_from_status_listen(self) -> None:
        url = self.serve({"active": True, "state": "active"})
        port = url.rsplit(":", 1)[1]
        for listen in (f"tcp:{port}:interface=127.0.0.1", f"tcp:{port}"):
            with self.subTest(listen=listen):
                self.patch(os, "environ", {"HOSTLINK_WS_STATUS_LISTEN": listen})
                status, out, err = run("status")
                self.assertEqual((status, err), (0, ""))

    def test_status_url_from_listen(self) -> None:
        cases = {
            "tcp:9920:interface=127.0.0.1": "http://127.0.0.1:9920",
            "tcp:9921": "http://127.0.0.1:9921",
            "tcp:9922:interface=0.0.0.0": "http://127.0.0.1:9922",
            "tcp6:9923:interface=\\:\\:1": "http://[::1]:9923",
            "tcp6:9924": "http://[::1]:9924",
            "tcp:9925:interface=192.0.2.1": "http://192.0.2.1:9925",
        }
        for listen, expected in cases.items():
            with self.subTest(listen=listen):
                self.assertEqual(status_url_from_listen(listen), expected)

    def test_underivable_default_url(self) -> None:
        for listen, why in (("unix:/run/s.sock", "not a TCP endpoint"),
                            ("tcp:0", "any free port"), ("bogus:1", "not a server endpoint")):
            with self.subTest(listen=listen):
                self.patch(os, "environ", {"HOSTLINK_WS_STATUS_LISTEN": listen})
                status, out, err = run("status")
                self.assertEqual((status, out), (2, ""))
                self.assertIn("HOSTLINK_WS_STATUS_LISTEN", err)
                self.assertIn(why, err)
                self.assertIn("pass --url", err)

    def test_unescaped_ipv6_interface(self) -> None:
        """tcp:PORT:interface=:: is not an endpoint (Twisted splits at ':'): say how to write it."""
        self.patch(os, "environ", {"HOSTLINK_WS_STATUS_LISTEN": "tcp:21920:interface=::"})
        status, out, err = run("status")
        self.assertEqual((status, out), (2, ""))
        self.assertIn("colons of the IPv6 interface :: must be escaped", err)
        self.assertIn("interface=\\:\\:", err)
        self.assertNotIn("_parseTCP", err)
        for listen in ("tcp:21920:interface=\\:\\:", "tcp6:21920:interface=\\:\\:1"):
            with self.subTest(listen=listen):
                self.assertEqual(status_url_from_listen(listen), "http://[::1]:21920")
        self.assertEqual(
            status_url_from_listen("tcp6:21920:interface=2001\\:db8\\:\\:5"),
            "http://[2001:db8::5]:21920",
        )

    def test_argument_checks(self) -> None:
        """Bad --timeout and --url are usage errors, caught before any lookup or connection."""
        cases = [
            (("--timeout", "0"), "above 0"),
            (("--timeout", "-1"), "above 0"),
            (("--timeout", "nan"), "above 0"),
            (("--url", "127.0.0.1:21920"), "add http://, e.g. http://127.0.0.1:21920"),
            (("--url", "ftp://x"), "not an http:// or https:// URL"),
            (("--url", "http://[::1"), "not a URL"),
            (("--url", "http://"), "no host"),
        ]
        looked_up: list[object] = []
        self.patch(socket, "getaddrinfo", lambda *a, **k: looked_up.append(a))
        for argv, needle in cases:
            with self.subTest(argv=argv):
                err = usage_error(self, "status", *argv)
                self.assertIn("usage: hostlink-tw status", err)
                self.assertIn(needle, err)
        self.assertEqual(looked_up, [])

    def test_inactive_exits_1(self) -> None:
        url = self.serve({"active": False, "state": "waiting", "last_failure": "refused"})
        status, out, _ = run("status", "--url", url)
        self.assertEqual(status, 1)
        self.assertIn("inactive", out)
        self.assertIn("refused", out)

    def test_unreachable_exits_2(self) -> None:
        url = self.serve({})
        port = url.rsplit(":", 1)[1]
        self.flushLoggedErrors()
        # A port nobody listens on: bind one, then close it.
        import socket

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
        s.close()
        self.assertNotEqual(str(free), port)
        status, _, err = run("status", "--url", f"http://127.0.0.1:{free}", "--timeout", "5")
        self.assertEqual(status, 2)
        self.assertIn("cannot read", err)
        self.assertIn("Connection refused", err)
        self.assertNotIn("URLError", err)  # no exception reprs

    def test_not_http_exits_2(self) -> None:
        """Something else on the port (an SSH banner): unreachable, not a crash."""
        import socket

        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]

        def answer() -> None:
            conn, _ = server.accept()
            with conn:
                conn.recv(1024)
                conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        self.addCleanup(server.close)
        status, _, err = run("status", "--url", f"http://127.0.0.1:{port}", "--timeout", "5")
        thread.join(10)
        self.assertEqual(status, 2)
        self.assertIn("cannot read", err)
        self.assertIn("not HTTP", err)
        self.assertNotIn("BadStatusLine", err)
