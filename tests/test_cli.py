"""The hostlink-tw command: init, status, demo."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from hostlink_tw.cli import main
from hostlink_tw.identity import load_agent_state, load_private_key, load_public_key


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = main(list(argv), out=out, err=err)
    return status, out.getvalue(), err.getvalue()


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

    def test_refuses_bad_agent_id(self) -> None:
        status, _, err = run("init", "--state-path", self.state, "--agent-id", "bad\nid")
        self.assertEqual(status, 2)
        self.assertTrue(err.startswith("hostlink-tw init:"))
        self.assertFalse(os.path.exists(self.state))


class _StatusHandler(BaseHTTPRequestHandler):
    state: dict[str, Any] = {}

    def do_GET(self) -> None:
        body = json.dumps(self.state).encode()
        self.send_response(200 if self.path == "/status" else 404)
        self.send_header("content-type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


class StatusTests(SynchronousTestCase):
    def serve(self, state: dict[str, Any]) -> str:
        handler = type("Handler", (_StatusHandler,), {"state": state})
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
        self.assertIn("active (active)", out)
        self.assertIn("agent-9", out)

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


class DemoTests(SynchronousTestCase):
    def test_demo_runs_to_completion_with_a_visible_reconnect(self) -> None:
        # Restarting 4 s after activation leaves the first session time for
        # one keepalive round trip (the demo pings every 3 s).
        directory = os.path.abspath(self.mktemp())
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "hostlink_tw",
                "demo",
                "--dir",
                directory,
                "--duration",
                "10",
                "--restart-after",
                "4",
            ],
            capture_output=True,
            text=True,
            timeout=90,
        )
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        out = done.stdout
        self.assertEqual(out.count("SESSION ACTIVE"), 2, out)
        self.assertIn("keepalive pong", out)
        order = [
            out.index("→ agent.hello"),
            out.index("← agent.hello_ack"),
            out.index("restarting the control plane"),
            out.index("backing off"),
            out.index("reconnect complete"),
            out.index("stopped"),
        ]
        self.assertEqual(order, sorted(order), out)
        self.assertIn("code=1000", out.split("stopping: closing the session")[-1])
        self.assertNotIn("Traceback", out + done.stderr)
        # Each thing said once: one line per control plane start, one per close.
        self.assertEqual(out.count("listening on"), 2, out)
        self.assertEqual(out.count("control plane stopping"), 1, out)
        self.assertNotIn("code=None", out)
