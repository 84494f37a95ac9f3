"""
Issue 10 item 3, measured: a hostile control plane floods pings and never
reads the pongs; how much memory does a real agent process spend?

    .venv/bin/python -m evidence.ping_flood [SECONDS]

Runs a hostile server (accepts any upgrade, acks the hello, then stops
reading and sends pings without pause) and a real ``twistd hostlink`` agent
against it, both on 127.0.0.1, samples the agent's RSS once a second for
SECONDS (default 20), stops both and prints the series and the agent's
lines about the connection.  Bounded in time; every process is ended.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

from evidence.faults import free_port

_BIN = os.path.dirname(sys.executable)


def serve(port: int) -> None:
    """The hostile control plane (run in a child process)."""
    from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
    from twisted.internet import reactor, task

    from hostlink_tw.protocol import AGENT_HELLO, AGENT_HELLO_ACK, ack_payload, make_envelope

    ping = b"x" * 125

    class Hostile(WebSocketServerProtocol):  # type: ignore[misc]
        loop: task.LoopingCall | None = None

        def onMessage(self, payload: bytes, isBinary: bool) -> None:
            envelope = json.loads(payload)
            if envelope["type"] != AGENT_HELLO:
                return
            ack = make_envelope(
                AGENT_HELLO_ACK, envelope["agent_id"],
                ack_payload(envelope["message_id"], AGENT_HELLO),
            )
            self.sendMessage(ack.to_json().encode())
            self.transport.pauseProducing()  # never read again
            self.loop = task.LoopingCall(self._flood)
            self.loop.start(0.001)
            print("flooding", flush=True)

        def _flood(self) -> None:
            if self.state == self.STATE_OPEN:
                for _ in range(200):
                    self.sendPing(ping)

        def connectionLost(self, reason: object) -> None:
            print("the agent closed the connection", flush=True)
            if self.loop is not None and self.loop.running:
                self.loop.stop()
            super().connectionLost(reason)

    factory = WebSocketServerFactory(f"ws://127.0.0.1:{port}")
    factory.protocol = Hostile
    reactor.listenTCP(port, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main(seconds: float) -> None:
    port = free_port()
    state = tempfile.mkdtemp(prefix="ping-flood-")
    subprocess.run(
        [os.path.join(_BIN, "hostlink-tw"), "init", "--state-path", state, "--agent-id",
         "flood-agent"], check=True, capture_output=True,
    )
    server = subprocess.Popen(
        [sys.executable, "-m", "evidence.ping_flood", "--serve", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    time.sleep(1.5)
    env = dict(
        os.environ, HOSTLINK_WS_ENABLED="true", HOSTLINK_STATE_PATH=state,
        HOSTLINK_PRIVATE_KEY_PATH=os.path.join(state, "agent.key"),
        HOSTLINK_WS_URL=f"ws://127.0.0.1:{port}/api/v1/agents/ws",
        # Long keepalive and retry periods: only the flood is measured.
        HOSTLINK_WS_RECONNECT_MIN="30s", HOSTLINK_WS_PING_INTERVAL="5m",
        HOSTLINK_WS_PONG_TIMEOUT="5m",
    )
    agent = subprocess.Popen(
        [os.path.join(_BIN, "twistd"), "-n", "--pidfile=", "hostlink"], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    samples: list[tuple[int, float]] = []
    started = time.monotonic()
    try:
        while time.monotonic() - started < seconds and agent.poll() is None:
            time.sleep(1)
            samples.append((round(time.monotonic() - started), round(_rss_mib(agent.pid), 1)))
    finally:
        for proc in (agent, server):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        out = agent.communicate(timeout=20)[0]
        server_out = server.communicate(timeout=20)[0]
    print("agent RSS (s, MiB):", samples)
    for line in out.splitlines():
        if any(w in line for w in ("session active", "stopped reading", "connection ended")):
            print(line)
    print(server_out.strip())


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        serve(int(sys.argv[2]))
    else:
        main(float(sys.argv[1]) if len(sys.argv) > 1 else 20.0)
