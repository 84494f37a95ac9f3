"""Tests for L{hostlink_tw.config}."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from hostlink_tw import config
from hostlink_tw.config import (
    SETTINGS,
    ConfigError,
    Settings,
    SettingSpec,
    derive_ws_url,
    gateway_url_problem,
    load_settings,
)
from hostlink_tw.safetext import escape_control, redact_url
from hostlink_tw.testing import make_test_certificates

Event = dict[str, Any]

DURATIONS = {
    # variable: (default, minimum, maximum) in seconds
    "HOSTLINK_WS_RECONNECT_MIN": (1.0, 0.1, 300.0),
    "HOSTLINK_WS_RECONNECT_MAX": (300.0, 1.0, 3600.0),
    "HOSTLINK_WS_PING_INTERVAL": (30.0, 5.0, 300.0),
    "HOSTLINK_WS_PONG_TIMEOUT": (10.0, 1.0, 300.0),
    "HOSTLINK_WS_HELLO_TIMEOUT": (30.0, 1.0, 300.0),
    "HOSTLINK_WS_HANDSHAKE_TIMEOUT": (30.0, 1.0, 300.0),
}
# PROTOCOL §10, in its order (their rules are tested in test_config_tasks).
PHASE_2 = [
    "HOSTLINK_WS_DELIVERY_ENABLED",
    "HOSTLINK_WS_RESULTS_ENABLED",
    "HOSTLINK_WS_POLLING_FALLBACK_THRESHOLD",
    "HOSTLINK_TASK_POLL_INTERVAL",
    "HOSTLINK_HEARTBEAT_INTERVAL",
    "HOSTLINK_TASK_OUTPUT_FLUSH_INTERVAL",
    "HOSTLINK_TASK_OUTPUT_FLUSH_THRESHOLD",
    "HOSTLINK_LOCAL_STORE_PATH",
    "HOSTLINK_LOCAL_STORE_SPOOL_CAP_BYTES",
    "HOSTLINK_LOCAL_STORE_TERMINAL_RESERVE_BYTES",
    "HOSTLINK_LOCAL_STORE_RETENTION",
    "HOSTLINK_TASK_QUEUE_LIMIT",
    "HOSTLINK_TASK_CONCURRENCY",
    "HOSTLINK_TASK_TIMEOUT",
    "HOSTLINK_TASK_KILL_GRACE",
    "HOSTLINK_TASK_OUTPUT_LIMIT_BYTES",
    "HOSTLINK_TASK_FINAL_OUTPUT_BYTES",
    "HOSTLINK_TASK_WORKDIR",
]
ATTRIBUTES = {spec.env: spec.attribute for spec in SETTINGS}
SPECS = {spec.env: spec for spec in SETTINGS}


def load(
    environ: Mapping[str, str] | None = None, overrides: Mapping[str, str] | None = None
) -> tuple[Settings, list[Event]]:
    """Load settings, returning them with the log events emitted."""
    events: list[Event] = []
    settings = load_settings(
        {} if environ is None else environ, overrides, Logger(observer=events.append)
    )
    return settings, events


def value_of(settings: Settings, env: str) -> Any:
    """The attribute of *settings* that *env* sets."""
    return getattr(settings, ATTRIBUTES[env])


def write_certificates(path: str, count: int = 1, before: bytes = b"", after: bytes = b"") -> str:
    """Write *count* PEM CA certificates (each of its own throwaway CA) to *path*."""
    blobs = [
        make_test_certificates(f"{path}.ca{index}").ca_pem() for index in range(count)
    ]
    with open(path, "wb") as handle:
        handle.write(before + b"".join(blobs) + after)
    return path


class WarningAssertions(SynchronousTestCase):
    """Helpers for asserting on captured warning events."""

    def assertWarned(self, events: list[Event], variable: str, value: str, used: str) -> Event:
        """Exactly one warning event, for *variable*, with these fields."""
        self.assertEqual(len(events), 1, [formatEvent(event) for event in events])
        [event] = events
        self.assertEqual(event["log_level"], LogLevel.warn)
        self.assertEqual(
            (event["variable"], event["value"], event["used"]), (variable, value, used)
        )
        text = formatEvent(event)
        self.assertIn(variable, text)
        self.assertIn(repr(value), text)
        self.assertTrue(used in text or repr(used) in text, text)
        return event


class SettingSpecTests(SynchronousTestCase):
    """L{SETTINGS} is the single, complete description of the configuration."""

    def test_every_variable(self) -> None:
        """PROTOCOL §4's and §10's variables, the control plane URL and ours are all there."""
        self.assertEqual(
            [spec.env for spec in SETTINGS],
            [
                "HOSTLINK_WS_ENABLED",
                "SH_CONTROL_PLANE_URL",
                "HOSTLINK_WS_URL",
                "HOSTLINK_WS_RECONNECT_MIN",
                "HOSTLINK_WS_RECONNECT_MAX",
                "HOSTLINK_WS_PING_INTERVAL",
                "HOSTLINK_WS_PONG_TIMEOUT",
                "HOSTLINK_WS_HELLO_TIMEOUT",
                "HOSTLINK_WS_HANDSHAKE_TIMEOUT",
                "HOSTLINK_WS_MAX_MESSAGE_BYTES",
                "HOSTLINK_WS_CA_FILE",
                "HOSTLINK_WS_RECONNECT_JITTER",
                "HOSTLINK_WS_STATUS_LISTEN",
                "HOSTLINK_STATE_PATH",
                "HOSTLINK_PRIVATE_KEY_PATH",
                *PHASE_2,
            ],
        )

    def test_one_spec_per_setting(self) -> None:
        """Each L{Settings} field has exactly one spec; names and options are unique."""
        fields = [item.name for item in dataclasses.fields(Settings) if item.name != "errors"]
        self.assertEqual(sorted(ATTRIBUTES.values()), sorted(fields))
        options = [spec.option for spec in SETTINGS]
        self.assertEqual(len(set(options)), len(options))
        self.assertEqual(len(set(ATTRIBUTES)), len(SETTINGS))

    def test_options(self) -> None:
        """Option names are the documented long option names."""
        self.assertEqual(SPECS["HOSTLINK_WS_ENABLED"].option, "enable")
        self.assertEqual(SPECS["HOSTLINK_WS_URL"].option, "url")
        self.assertEqual(SPECS["HOSTLINK_WS_RECONNECT_MIN"].option, "reconnect-min")
        self.assertEqual(SPECS["SH_CONTROL_PLANE_URL"].option, "control-plane-url")
        for spec in SETTINGS:
            with self.subTest(env=spec.env):
                self.assertRegex(spec.option, r"^[a-z]+(-[a-z]+)*$")

    def test_documentation_text(self) -> None:
        """Every spec has a meaning and a default; ranges read as in PROTOCOL §4."""
        for spec in SETTINGS:
            with self.subTest(env=spec.env):
                self.assertTrue(spec.meaning)
                self.assertTrue(spec.default)
        self.assertEqual(SPECS["HOSTLINK_WS_RECONNECT_MIN"].range, "100ms \u2013 5m")
        self.assertEqual(SPECS["HOSTLINK_WS_RECONNECT_MAX"].range, "1s \u2013 1h")
        self.assertEqual(SPECS["HOSTLINK_WS_PING_INTERVAL"].range, "5s \u2013 5m")
        self.assertEqual(SPECS["HOSTLINK_WS_MAX_MESSAGE_BYTES"].range, "1024 \u2013 67108864")
        self.assertEqual(SPECS["HOSTLINK_WS_RECONNECT_JITTER"].range, "go, full")
        self.assertEqual(SPECS["HOSTLINK_STATE_PATH"].range, "")
        self.assertEqual(SPECS["HOSTLINK_WS_ENABLED"].default, "disabled")
        self.assertEqual(SPECS["SH_CONTROL_PLANE_URL"].default, "https://api.selfhost.dev")

    def test_frozen(self) -> None:
        """Specs cannot be changed."""
        self.assertRaises(
            dataclasses.FrozenInstanceError, setattr, SETTINGS[0], "default", "x"
        )
        self.assertIsInstance(SETTINGS, tuple)
        self.assertTrue(all(isinstance(spec, SettingSpec) for spec in SETTINGS))

    def test_every_spec_is_read(self) -> None:
        """An override of each variable reaches its attribute, so no spec is ignored."""
        values = {
            "HOSTLINK_WS_ENABLED": ("yes", True),
            "SH_CONTROL_PLANE_URL": ("http://cp.test", "http://cp.test"),
            "HOSTLINK_WS_URL": ("ws://gw.test/ws", "ws://gw.test/ws"),
            "HOSTLINK_WS_RECONNECT_MIN": ("2s", 2.0),
            "HOSTLINK_WS_RECONNECT_MAX": ("3s", 3.0),
            "HOSTLINK_WS_PING_INTERVAL": ("6s", 6.0),
            "HOSTLINK_WS_PONG_TIMEOUT": ("7s", 7.0),
            "HOSTLINK_WS_HELLO_TIMEOUT": ("8s", 8.0),
            "HOSTLINK_WS_HANDSHAKE_TIMEOUT": ("9s", 9.0),
            "HOSTLINK_WS_MAX_MESSAGE_BYTES": ("2048", 2048),
            "HOSTLINK_WS_CA_FILE": (None, None),  # filled below: needs a real file
            "HOSTLINK_WS_RECONNECT_JITTER": ("full", "full"),
            "HOSTLINK_WS_STATUS_LISTEN": ("tcp:0", "tcp:0"),
            "HOSTLINK_STATE_PATH": ("/srv/state", "/srv/state"),
            "HOSTLINK_PRIVATE_KEY_PATH": ("/srv/key", "/srv/key"),
            "HOSTLINK_WS_DELIVERY_ENABLED": ("yes", True),
            "HOSTLINK_WS_RESULTS_ENABLED": ("1", True),
            "HOSTLINK_WS_POLLING_FALLBACK_THRESHOLD": ("0s", 0.0),
            "HOSTLINK_TASK_POLL_INTERVAL": ("11s", 11.0),
            "HOSTLINK_HEARTBEAT_INTERVAL": ("12s", 12.0),
            "HOSTLINK_TASK_OUTPUT_FLUSH_INTERVAL": ("13ms", 0.013),
            "HOSTLINK_TASK_OUTPUT_FLUSH_THRESHOLD": ("4096", 4096),
            "HOSTLINK_LOCAL_STORE_PATH": ("/srv/t.db", "/srv/t.db"),
            "HOSTLINK_LOCAL_STORE_SPOOL_CAP_BYTES": ("33554432", 33554432),
            "HOSTLINK_LOCAL_STORE_TERMINAL_RESERVE_BYTES": ("2048", 2048),
            "HOSTLINK_LOCAL_STORE_RETENTION": ("2h", 7200.0),
            "HOSTLINK_TASK_QUEUE_LIMIT": ("17", 17),
            "HOSTLINK_TASK_CONCURRENCY": ("2", 2),
            "HOSTLINK_TASK_TIMEOUT": ("1h", 3600.0),
            "HOSTLINK_TASK_KILL_GRACE": ("1s", 1.0),
            "HOSTLINK_TASK_OUTPUT_LIMIT_BYTES": ("1000", 1000),
            "HOSTLINK_TASK_FINAL_OUTPUT_BYTES": ("0", 0),
            "HOSTLINK_TASK_WORKDIR": (None, None),  # filled below: needs a real directory
        }
        ca = write_certificates(self.mktemp())
        values["HOSTLINK_WS_CA_FILE"] = (ca, ca)
        workdir = self.mktemp()
        os.mkdir(workdir)
        values["HOSTLINK_TASK_WORKDIR"] = (workdir, workdir)
        self.assertEqual(sorted(values), sorted(SPECS))
        for env, (text, expected) in values.items():
            assert text is not None
            for source in ("environ", "overrides"):
                with self.subTest(env=env, source=source):
                    if source == "environ":
                        settings, events = load({env: text})
                    else:
                        settings, events = load({}, {env: text})
                    self.assertEqual(value_of(settings, env), expected)
                    self.assertNotEqual(value_of(Settings(), env), expected)
                    self.assertEqual(events, [])

    def test_defaults_are_valid(self) -> None:
        """Each duration or integer default parses and lies within its range."""
        settings = Settings()
        for env, (default, low, high) in DURATIONS.items():
            with self.subTest(env=env):
                self.assertEqual(value_of(settings, env), default)
                self.assertTrue(low <= default <= high)


class DefaultsTests(SynchronousTestCase):
    """An empty environment gives the documented defaults, silently."""

    def test_defaults(self) -> None:
        """Every field has its PROTOCOL §4 or issue-documented default."""
        settings, events = load({})
        self.assertEqual(events, [])
        self.assertEqual(
            settings,
            Settings(
                enabled=False,
                ws_url="wss://api.selfhost.dev/api/v1/agents/ws",
                control_plane_url="https://api.selfhost.dev",
                reconnect_min=1.0,
                reconnect_max=300.0,
                ping_interval=30.0,
                pong_timeout=10.0,
                hello_timeout=30.0,
                handshake_timeout=30.0,
                max_message_bytes=1048576,
                ca_file=None,
                reconnect_jitter="go",
                status_listen=None,
                state_path="/var/lib/hostlink",
                private_key_path="/var/lib/hostlink/agent.key",
            ),
        )

    def test_settings_default_is_loaded_default(self) -> None:
        """C{Settings()} equals what an empty environment loads."""
        self.assertEqual(Settings(), load({})[0])

    def test_empty_values_mean_default(self) -> None:
        """Every variable set to the empty string gives its default without a warning."""
        settings, events = load({spec.env: "" for spec in SETTINGS})
        self.assertEqual(events, [])
        self.assertEqual(settings, Settings())

    def test_os_environ(self) -> None:
        """Without an C{environ}, the process environment is read."""
        self.patch(os, "environ", {"HOSTLINK_WS_PING_INTERVAL": "45s"})
        self.assertEqual(load_settings().ping_interval, 45.0)

    def test_module_logger(self) -> None:
        """Without a C{log}, warnings go to the module's logger."""
        events: list[Event] = []
        self.patch(config, "_log", Logger(observer=events.append))
        load_settings({"HOSTLINK_WS_PING_INTERVAL": "soon"})
        self.assertEqual([event["variable"] for event in events], ["HOSTLINK_WS_PING_INTERVAL"])

    def test_frozen(self) -> None:
        """Settings cannot be changed after loading."""
        settings = Settings()
        self.assertRaises(dataclasses.FrozenInstanceError, setattr, settings, "enabled", True)

    def test_agent_state_file(self) -> None:
        """The agent state file is agent.json in the state directory."""
        self.assertEqual(Settings().agent_state_file, "/var/lib/hostlink/agent.json")
        settings, _ = load({"HOSTLINK_STATE_PATH": "/srv/hostlink/"})
        self.assertEqual(settings.agent_state_file, "/srv/hostlink/agent.json")

    def test_paths_taken_as_given(self) -> None:
        """Paths are used exactly as set."""
        settings, events = load(
            {"HOSTLINK_STATE_PATH": "relative/dir", "HOSTLINK_PRIVATE_KEY_PATH": "/k/agent.pem"}
        )
        self.assertEqual((settings.state_path, settings.private_key_path),
                         ("relative/dir", "/k/agent.pem"))
        self.assertEqual(events, [])


class EnabledTests(WarningAssertions):
    """C{HOSTLINK_WS_ENABLED}: true, 1 or yes in any case enable the client."""

    def test_enabling_values(self) -> None:
        """true, 1, yes in any case and with surrounding whitespace enable it."""
        for text in ("true", "TRUE", "True", "1", "yes", "YES", "Yes", " true ", "yes\n", "\t1"):
            with self.subTest(text=text):
                settings, events = load({"HOSTLINK_WS_ENABLED": text})
                self.assertTrue(settings.enabled)
                self.assertEqual(events, [])

    def test_disabling_values(self) -> None:
        """Unset, empty and the usual negatives disable it quietly."""
        for text in ("", "false", "FALSE", "0", "no", "No", "off", " false "):
            with self.subTest(text=text):
                settings, events = load({"HOSTLINK_WS_ENABLED": text})
                self.assertFalse(settings.enabled)
                self.assertEqual(events, [])

    def test_other_values(self) -> None:
        """Anything else disables it too, with a warning: "on" does not enable."""
        for text in ("on", "ture", "2", "y", "enabled", "-1"):
            with self.subTest(text=text):
                settings, events = load({"HOSTLINK_WS_ENABLED": text})
                self.assertFalse(settings.enabled)
                self.assertWarned(events, "HOSTLINK_WS_ENABLED", text, "disabled")


class DurationSettingTests(WarningAssertions):
    """Duration variables: Go syntax, default, warnings and clamping."""

    def test_values_in_range(self) -> None:
        """A Go duration within range is used as is, in seconds."""
        for env in DURATIONS:
            for text, seconds in (("1m", 60.0), ("1.5m", 90.0), ("1m30s", 90.0),
                                  ("90000ms", 90.0), ("+90s", 90.0)):
                with self.subTest(env=env, text=text):
                    settings, events = load({env: text})
                    self.assertEqual(value_of(settings, env), seconds)
                    self.assertEqual(events, [])

    def test_bounds_inclusive(self) -> None:
        """The bounds themselves are accepted without a warning."""
        for env, (_, low, high) in DURATIONS.items():
            spec = SPECS[env]
            for text, seconds in ((spec.minimum, low), (spec.maximum, high)):
                with self.subTest(env=env, text=text):
                    settings, events = load({env: text})
                    self.assertEqual(value_of(settings, env), seconds)
                    self.assertEqual(events, [])

    def test_unparsable(self) -> None:
        """A value Go rejects logs a warning and the default is used."""
        for env, (default, _, _) in DURATIONS.items():
            for text in ("soon", "10", "1 s", " 10s", "10s ", "1d", "1.5", "s", "-"):
                with self.subTest(env=env, text=text):
                    settings, events = load({env: text})
                    self.assertEqual(value_of(settings, env), default)
                    self.assertWarned(events, env, text, SPECS[env].default)

    def test_below_minimum(self) -> None:
        """A value below the range logs a warning and is clamped to the minimum."""
        for env, (_, low, _) in DURATIONS.items():
            for text in ("0", "1ns", "-1s", "-5m"):
                with self.subTest(env=env, text=text):
                    settings, events = load({env: text})
                    self.assertEqual(value_of(settings, env), low)
                    event = self.assertWarned(events, env, text, SPECS[env].minimum)
                    self.assertIn(SPECS[env].range, formatEvent(event))

    def test_above_maximum(self) -> None:
        """A value above the range logs a warning and is clamped to the maximum."""
        for env, (_, _, high) in DURATIONS.items():
            for text in ("2h", "1000h", "2562047h"):
                with self.subTest(env=env, text=text):
                    settings, events = load({env: text})
                    self.assertEqual(value_of(settings, env), high)
                    self.assertWarned(events, env, text, SPECS[env].maximum)

    def test_issue_examples(self) -> None:
        """The syntax examples of the issue work where in range."""
        settings, events = load(
            {
                "HOSTLINK_WS_RECONNECT_MIN": "300ms",
                "HOSTLINK_WS_RECONNECT_MAX": "1h",
                "HOSTLINK_WS_PING_INTERVAL": "1.5m",
                "HOSTLINK_WS_PONG_TIMEOUT": "2000000\u00b5s",
                "HOSTLINK_WS_HELLO_TIMEOUT": "3000000us",
                "HOSTLINK_WS_HANDSHAKE_TIMEOUT": "1m30s",
            }
        )
        self.assertEqual(events, [])
        self.assertEqual(
            (settings.reconnect_min, settings.reconnect_max, settings.ping_interval,
             settings.pong_timeout, settings.hello_timeout, settings.handshake_timeout),
            (0.3, 3600.0, 90.0, 2.0, 3.0, 90.0),
        )

    @given(st.sampled_from(sorted(DURATIONS)), st.text(max_size=30))
    def test_any_value(self, env: str, text: str) -> None:
        """Any environment text gives a value within range and never raises."""
        settings, events = load({env: text})
        _, low, high = DURATIONS[env]
        self.assertTrue(low <= value_of(settings, env) <= high)
        self.assertLessEqual(len(events), 1)


class ReconnectOrderTests(WarningAssertions):
    """C{HOSTLINK_WS_RECONNECT_MAX} below C{HOSTLINK_WS_RECONNECT_MIN} is raised to it."""

    def test_raised(self) -> None:
        """The maximum becomes the minimum, with a warning naming both."""
        settings, events = load(
            {"HOSTLINK_WS_RECONNECT_MIN": "2m", "HOSTLINK_WS_RECONNECT_MAX": "90s"}
        )
        self.assertEqual((settings.reconnect_min, settings.reconnect_max), (120.0, 120.0))
        event = self.assertWarned(events, "HOSTLINK_WS_RECONNECT_MAX", "90s", "2m")
        self.assertIn("HOSTLINK_WS_RECONNECT_MIN", formatEvent(event))

    def test_equal(self) -> None:
        """Equal values are fine."""
        settings, events = load(
            {"HOSTLINK_WS_RECONNECT_MIN": "30s", "HOSTLINK_WS_RECONNECT_MAX": "30s"}
        )
        self.assertEqual((settings.reconnect_min, settings.reconnect_max), (30.0, 30.0))
        self.assertEqual(events, [])

    def test_after_clamping(self) -> None:
        """The comparison uses the clamped values."""
        settings, events = load(
            {"HOSTLINK_WS_RECONNECT_MIN": "10m", "HOSTLINK_WS_RECONNECT_MAX": "100ms"}
        )
        self.assertEqual((settings.reconnect_min, settings.reconnect_max), (300.0, 300.0))
        self.assertEqual(
            [(event["variable"], event["used"]) for event in events],
            [
                ("HOSTLINK_WS_RECONNECT_MIN", "5m"),
                ("HOSTLINK_WS_RECONNECT_MAX", "1s"),
                ("HOSTLINK_WS_RECONNECT_MAX", "5m"),
            ],
        )

    def test_override_below_minimum(self) -> None:
        """A command-line maximum below the minimum is refused."""
        error = self.assertRaises(
            ConfigError,
            load,
            {"HOSTLINK_WS_RECONNECT_MIN": "2m"},
            {"HOSTLINK_WS_RECONNECT_MAX": "90s"},
        )
        self.assertIn("--reconnect-max", str(error))
        self.assertIn("HOSTLINK_WS_RECONNECT_MIN", str(error))

    def test_environment_below_override_minimum(self) -> None:
        """An environment maximum below a command-line minimum is raised, with a warning."""
        settings, events = load(
            {"HOSTLINK_WS_RECONNECT_MAX": "90s"}, {"HOSTLINK_WS_RECONNECT_MIN": "2m"}
        )
        self.assertEqual(settings.reconnect_max, 120.0)
        self.assertWarned(events, "HOSTLINK_WS_RECONNECT_MAX", "90s", "2m")


class MaxMessageBytesTests(WarningAssertions):
    """C{HOSTLINK_WS_MAX_MESSAGE_BYTES}: a whole number of bytes within range."""

    env = "HOSTLINK_WS_MAX_MESSAGE_BYTES"

    def test_values(self) -> None:
        """Whole numbers within range are used."""
        for text, expected in (("1024", 1024), ("65536", 65536), ("67108864", 67108864),
                               ("+2048", 2048), ("0004096", 4096)):
            with self.subTest(text=text):
                settings, events = load({self.env: text})
                self.assertEqual(settings.max_message_bytes, expected)
                self.assertEqual(events, [])

    def test_unparsable(self) -> None:
        """Anything but optionally signed ASCII digits warns and uses the default."""
        for text in ("1k", "1MiB", "1e6", "1_000_000", " 2048", "2048 ", "1.5", "\u0663\u0663",
                     "0x400", "lots"):
            with self.subTest(text=text):
                settings, events = load({self.env: text})
                self.assertEqual(settings.max_message_bytes, 1048576)
                self.assertWarned(events, self.env, text, "1048576")

    def test_clamped(self) -> None:
        """Values out of range are clamped with a warning."""
        for text, expected in (("100", 1024), ("0", 1024), ("-5", 1024),
                               ("67108865", 67108864), ("99999999999999999999", 67108864),
                               # past int()'s 4300-digit limit: still clamped, no ValueError
                               ("9" * 5000, 67108864), ("-" + "9" * 5000, 1024)):
            with self.subTest(text=text):
                settings, events = load({self.env: text})
                self.assertEqual(settings.max_message_bytes, expected)
                self.assertWarned(events, self.env, text, str(expected))


class JitterTests(WarningAssertions):
    """C{HOSTLINK_WS_RECONNECT_JITTER}: go (default) or full."""

    env = "HOSTLINK_WS_RECONNECT_JITTER"

    def test_values(self) -> None:
        """go and full, in any case and trimmed."""
        for text, expected in (("go", "go"), ("full", "full"), ("FULL", "full"),
                               (" Go ", "go"), ("", "go")):
            with self.subTest(text=text):
                settings, events = load({self.env: text})
                self.assertEqual(settings.reconnect_jitter, expected)
                self.assertEqual(events, [])

    def test_unknown(self) -> None:
        """Anything else warns and uses go."""
        for text in ("none", "equal", "gaussian", "fullish"):
            with self.subTest(text=text):
                settings, events = load({self.env: text})
                self.assertEqual(settings.reconnect_jitter, "go")
                self.assertWarned(events, self.env, text, "go")


class StatusListenTests(SynchronousTestCase):
    """C{HOSTLINK_WS_STATUS_LISTEN}: an endpoint description, or None."""

    def test_values(self) -> None:
        """Unset, empty or blank is None; anything else is kept, trimmed."""
        for text, expected in (("", None), ("  ", None),
                               ("tcp:8089:interface=127.0.0.1", "tcp:8089:interface=127.0.0.1"),
                               (" unix:/run/hostlink.sock ", "unix:/run/hostlink.sock")):
            with self.subTest(text=text):
                settings, events = load({"HOSTLINK_WS_STATUS_LISTEN": text})
                self.assertEqual(settings.status_listen, expected)
                self.assertEqual(events, [])
        self.assertIsNone(load({})[0].status_listen)


class WebSocketURLTests(SynchronousTestCase):
    """C{HOSTLINK_WS_URL} and its derivation from C{SH_CONTROL_PLANE_URL}."""

    def test_override_used_as_is(self) -> None:
        """A non-empty HOSTLINK_WS_URL is used as is, trimmed, whatever the base URL."""
        for text in ("wss://gw.example/agents", " ws://127.0.0.1:9000/x?y=1 ",
                     "WSS://GW.example:443/ws"):
            with self.subTest(text=text):
                settings, events = load(
                    {"HOSTLINK_WS_URL": text, "SH_CONTROL_PLANE_URL": "https://cp.example"}
                )
                self.assertEqual(settings.ws_url, text.strip())
                self.assertEqual(settings.control_plane_url, "https://cp.example")
                self.assertEqual(events, [])

    def test_blank_derives(self) -> None:
        """An empty or blank HOSTLINK_WS_URL means: derive it."""
        for text in ("", "  ", "\n"):
            with self.subTest(text=text):
                settings, _ = load(
                    {"HOSTLINK_WS_URL": text, "SH_CONTROL_PLANE_URL": "http://cp.example/base/"}
                )
                self.assertEqual(settings.ws_url, "ws://cp.example/base/api/v1/agents/ws")

    def test_control_plane_trimmed(self) -> None:
        """The control plane URL is trimmed; blank means the production default."""
        settings, _ = load({"SH_CONTROL_PLANE_URL": "  https://cp.example \n"})
        self.assertEqual(settings.control_plane_url, "https://cp.example")
        self.assertEqual(settings.ws_url, "wss://cp.example/api/v1/agents/ws")
        settings, _ = load({"SH_CONTROL_PLANE_URL": "   "})
        self.assertEqual(settings.control_plane_url, "https://api.selfhost.dev")

    def test_unparsable_control_plane_warns(self) -> None:
        """An unparsable control plane URL reaches the caller's log, and is refused.

        PROTOCOL §3's text-appended URL keeps the https scheme: the client
        could never dial it, so it is also an error (see L{GatewayURLTests}).
        """
        settings, events = load({"SH_CONTROL_PLANE_URL": "https://[::1"})
        self.assertEqual(settings.ws_url, "https://[::1/api/v1/agents/ws")
        self.assertEqual([event["variable"] for event in events], ["SH_CONTROL_PLANE_URL"])
        [error] = settings.errors
        self.assertTrue(error.startswith("SH_CONTROL_PLANE_URL: 'https://[::1' gives"), error)


class GatewayURLTests(SynchronousTestCase):
    """Issue 9 item 7, issue 10 item 11: a gateway URL the client cannot dial is refused.

    From the environment it lands in L{Settings.errors} (one line, with a
    hint) instead of leaving an agent that runs and never connects; as an
    option it is a L{ConfigError}.
    """

    BAD = [
        ("http://cp.example/ws", "is not a ws:// or wss:// URL"),
        ("https://cp.example/ws", "is not a ws:// or wss:// URL"),
        ("cp.example/api/v1/agents/ws", "is not a ws:// or wss:// URL"),
        ("cp.example:8080", "is not a ws:// or wss:// URL"),
        ("wss://", "has no host"),
        ("wss:///path", "has no host"),
        ("wss://cp.example:0/ws", "has port 0"),
        ("wss://cp.example:99999/ws", "cannot be parsed as a URL"),
        ("wss://[::1/ws", "cannot be parsed as a URL"),
        ("wss://cp example/ws", "cannot be parsed as a URL"),
        ("wss://cp.example/ws#part", "has a #fragment"),
        ("ws://unix:/run/cp.sock", "names the host 'unix'"),
        ("wss://UNIX/ws", "names the host 'unix'"),
        ("ws://user@unix:8080/ws", "names the host 'unix'"),
    ]
    def test_port_out_of_range_says_so(self) -> None:
        """New-user trial: 'cannot be parsed; use ws://' for a ws:// URL with port 99999 misled."""
        problem = gateway_url_problem("ws://127.0.0.1:99999/api/v1/agents/ws") or ""
        self.assertIn("its port is not a number from 1 to 65535", problem)

    GOOD = [
        "wss://cp.example/api/v1/agents/ws",
        "ws://127.0.0.1:8080/api/v1/agents/ws?tenant=a",
        "wss://[::1]:8443/ws",
        "WSS://Cp.Example/ws",
        "ws://unix.example/ws",
        "ws://user:pw@cp.example/ws",
    ]

    def test_problems(self) -> None:
        for url, problem in self.BAD:
            with self.subTest(url=url):
                self.assertTrue((gateway_url_problem(url) or "").startswith(problem), url)
        for url in self.GOOD:
            with self.subTest(url=url):
                self.assertIsNone(gateway_url_problem(url))

    def test_accepted_urls_are_what_autobahn_dials_over_tcp(self) -> None:
        """Every URL we accept, Autobahn parses as a TCP host (not its UNIX-socket branch)."""
        from autobahn.websocket.util import parse_url

        for url in self.GOOD:
            with self.subTest(url=url):
                secure, host, port, _, _, _ = parse_url(url)
                self.assertNotEqual(host, "unix")
                self.assertIsInstance(port, int)
        for url, _ in self.BAD:
            if "unix" in url.lower():
                # The branch item 11 is about: a path instead of a port, or
                # an IndexError nobody catches.
                try:
                    host = parse_url(url)[1]
                except IndexError:
                    continue
                self.assertEqual(host, "unix")

    @given(
        st.sampled_from(["ws", "wss", "WS", "http", "", "unix"]),
        st.sampled_from(["", "u:p@", "@"]),
        st.sampled_from(["cp.example", "UNIX", "unix", "[::1]", "127.0.0.1", "", "a b", "[::1"]),
        st.sampled_from(["", ":0", ":1", ":65535", ":65536", ":x", ":"]),
        st.text(max_size=12),
    )
    def test_accepted_means_autobahn_dials_tcp(
        self, scheme: str, userinfo: str, host: str, port: str, rest: str
    ) -> None:
        """Whatever we accept, Autobahn parses without error and not as a UNIX socket."""
        from autobahn.websocket.util import parse_url

        url = f"{scheme}://{userinfo}{host}{port}/{rest}"
        if gateway_url_problem(url) is None:
            _, parsed_host, parsed_port, _, _, _ = parse_url(url)
            self.assertNotEqual(parsed_host, "unix")
            self.assertTrue(1 <= parsed_port <= 65535)

    def test_environment_url_recorded_with_hint(self) -> None:
        for url, problem in self.BAD:
            with self.subTest(url=url):
                settings, events = load({"HOSTLINK_WS_URL": url})
                self.assertEqual(events, [])
                [message] = settings.errors
                self.assertTrue(
                    message.startswith(f"HOSTLINK_WS_URL: {redact_url(url)!r} "), message
                )
                self.assertIn(problem, message)
                if "unix" in url.lower():
                    self.assertIn("use the gateway's host name or address", message)
                else:
                    self.assertIn(
                        "use ws:// or wss://, or unset it and set SH_CONTROL_PLANE_URL "
                        "to derive it",
                        message,
                    )
                self.assertRaises(ConfigError, settings.check)

    def test_option_url_refused(self) -> None:
        for url, problem in self.BAD:
            with self.subTest(url=url):
                error = self.assertRaises(ConfigError, load, {}, {"HOSTLINK_WS_URL": url})
                self.assertTrue(str(error).startswith("--url (HOSTLINK_WS_URL): "), str(error))
                self.assertIn(problem, str(error))

    def test_option_replaces_bad_environment_url(self) -> None:
        settings, _ = load(
            {"HOSTLINK_WS_URL": "http://x"}, {"HOSTLINK_WS_URL": "wss://cp.example/ws"}
        )
        self.assertEqual((settings.ws_url, settings.errors), ("wss://cp.example/ws", ()))

    def test_derived_url_refused(self) -> None:
        """A control plane URL whose gateway URL cannot be dialled names both."""
        for base, problem in (
            ("ftp://cp.example", "is not a ws:// or wss:// URL"),
            ("cp.example", "is not a ws:// or wss:// URL"),
            ("https://unix", "names the host 'unix'"),
            ("https://unix:8443/base", "names the host 'unix'"),
        ):
            with self.subTest(base=base):
                settings, _ = load({"SH_CONTROL_PLANE_URL": base})
                [message] = settings.errors
                self.assertTrue(
                    message.startswith(f"SH_CONTROL_PLANE_URL: {base!r} gives the gateway URL"),
                    message,
                )
                self.assertIn(problem, message)
                self.assertIn("or set HOSTLINK_WS_URL", message)
                error = self.assertRaises(ConfigError, load, {}, {"SH_CONTROL_PLANE_URL": base}
                                          ) if "://" in base else None
                if error is not None:
                    self.assertIn("--control-plane-url (SH_CONTROL_PLANE_URL)", str(error))

    def test_secrets_not_in_the_error(self) -> None:
        settings, _ = load({"HOSTLINK_WS_URL": "https://admin:hunter2@cp.example/ws?token=s3"})
        [message] = settings.errors
        self.assertNotIn("hunter2", message)
        self.assertNotIn("s3", message.replace("wss", ""))
        self.assertIn("'https://cp.example/ws?token=REDACTED'", message)

    def test_good_settings_have_no_errors(self) -> None:
        self.assertEqual(load({})[0].errors, ())
        Settings().check()

    def test_twistd_refuses_environment_values(self) -> None:
        """Under twistd each refused environment value is a one-line usage error."""
        from twisted.python import usage

        from hostlink_tw.tap import Options

        for environ, needle in (
            ({"HOSTLINK_WS_URL": "http://cp.example/ws"}, "HOSTLINK_WS_URL: 'http://cp.example"),
            ({"HOSTLINK_WS_URL": "ws://unix:/x"}, "names the host 'unix'"),
            ({"SH_CONTROL_PLANE_URL": "ftp://cp.example"}, "SH_CONTROL_PLANE_URL: 'ftp://"),
            ({"HOSTLINK_WS_CA_FILE": "/nonexistent/ca.pem"}, "HOSTLINK_WS_CA_FILE: cannot read"),
        ):
            with self.subTest(environ=environ):
                options = Options(environ=environ)
                error = self.assertRaises(usage.UsageError, options.parseOptions, [])
                self.assertIn(needle, str(error))
                self.assertNotIn("\n", str(error))


class DeriveWebSocketURLTests(WarningAssertions):
    """L{derive_ws_url} follows PROTOCOL §3."""

    CASES = [
        ("https://api.selfhost.dev", "wss://api.selfhost.dev/api/v1/agents/ws"),
        ("http://localhost:8080", "ws://localhost:8080/api/v1/agents/ws"),
        ("https://cp.example/base", "wss://cp.example/base/api/v1/agents/ws"),
        ("https://cp.example/base/", "wss://cp.example/base/api/v1/agents/ws"),
        ("https://cp.example/base//", "wss://cp.example/base/api/v1/agents/ws"),
        ("https://cp.example/", "wss://cp.example/api/v1/agents/ws"),
        ("https://cp.example/a/b", "wss://cp.example/a/b/api/v1/agents/ws"),
        ("HTTPS://CP.Example", "wss://CP.Example/api/v1/agents/ws"),
        ("http://[::1]:8080/", "ws://[::1]:8080/api/v1/agents/ws"),
        ("https://user@cp.example:8443/x", "wss://user@cp.example:8443/x/api/v1/agents/ws"),
        # other schemes untouched
        ("ws://cp.example", "ws://cp.example/api/v1/agents/ws"),
        ("wss://cp.example/", "wss://cp.example/api/v1/agents/ws"),
        ("ftp://cp.example", "ftp://cp.example/api/v1/agents/ws"),
        # the query is kept after the new path; the fragment is dropped
        ("https://cp.example/base?tenant=a", "wss://cp.example/base/api/v1/agents/ws?tenant=a"),
        ("https://cp.example/?a=1&b=2", "wss://cp.example/api/v1/agents/ws?a=1&b=2"),
        ("https://cp.example/base#part", "wss://cp.example/base/api/v1/agents/ws"),
        ("http://cp.example:8080?x=1#y", "ws://cp.example:8080/api/v1/agents/ws?x=1"),
    ]

    UNPARSABLE = [
        ("http://[::1", "http://[::1/api/v1/agents/ws"),
        ("http://[::1/", "http://[::1/api/v1/agents/ws"),
        ("https://cp.example:port", "https://cp.example:port/api/v1/agents/ws"),
        ("https://cp.example:99999", "https://cp.example:99999/api/v1/agents/ws"),
        ("https://cp example", "https://cp example/api/v1/agents/ws"),
        ("https://cp.example/%zz", "https://cp.example/%zz/api/v1/agents/ws"),
        ("https://cp.example/\x7f", "https://cp.example/\x7f/api/v1/agents/ws"),
        ("https://cp.example/\n", "https://cp.example/\n/api/v1/agents/ws"),
    ]

    def test_cases(self) -> None:
        """Scheme mapping and path joining, without warnings."""
        for base, expected in self.CASES:
            with self.subTest(base=base):
                events: list[Event] = []
                self.assertEqual(derive_ws_url(base, Logger(observer=events.append)), expected)
                self.assertEqual(events, [])

    def test_unparsable(self) -> None:
        """An unparsable URL warns and gets the path appended as text."""
        for base, expected in self.UNPARSABLE:
            with self.subTest(base=base):
                events: list[Event] = []
                self.assertEqual(derive_ws_url(base, Logger(observer=events.append)), expected)
                self.assertEqual(len(events), 1)
                [event] = events
                self.assertEqual(event["log_level"], LogLevel.warn)
                # Shown escaped: the control characters made it unparsable.
                shown, used = escape_control(base), escape_control(expected)
                self.assertEqual((event["variable"], event["value"], event["used"]),
                                 ("SH_CONTROL_PLANE_URL", shown, used))
                self.assertIn(f"SH_CONTROL_PLANE_URL='{shown}'", formatEvent(event))
                self.assertIn(f"'{used}'", formatEvent(event))

    def test_unparsable_warning_shows_no_secret(self) -> None:
        """Issue 10 item 14: no password, query value or fragment in the warning."""
        base = "https://admin:hunter2@cp example/base?token=s3cret#frag-secret"
        events: list[Event] = []
        used = derive_ws_url(base, Logger(observer=events.append))
        self.assertEqual(used, base + "/api/v1/agents/ws")
        [event] = events
        text = formatEvent(event)
        for secret in ("admin", "hunter2", "s3cret", "frag-secret"):
            self.assertNotIn(secret, text)
            self.assertNotIn(secret, repr(event))
        self.assertIn("cp example/base?token=REDACTED", text)

    def test_module_logger(self) -> None:
        """Without a C{log}, the warning goes to the module's logger."""
        from hostlink_tw.wire import urls

        events: list[Event] = []
        self.patch(urls, "_log", Logger(observer=events.append))
        derive_ws_url("http://[::1")
        self.assertEqual(len(events), 1)


class CAFileTests(SynchronousTestCase):
    """C{HOSTLINK_WS_CA_FILE}: must exist and hold PEM certificates when set.

    An unusable file is refused from the environment too (see
    L{load_settings}), since ignoring it would silently trust fewer CAs.
    """

    env = "HOSTLINK_WS_CA_FILE"

    def assertRefused(self, path: str, why: str) -> None:
        """Both sources refuse *path* with a one-line message naming it and *why*.

        From the environment, L{load_settings} records it without raising or
        logging (an embedding application must get its L{Settings}), and
        L{Settings.check} raises it.
        """
        settings, events = load({self.env: path})
        self.assertEqual(events, [])
        [message] = settings.errors
        self.assertEqual(str(self.assertRaises(ConfigError, settings.check)), message)
        self.assertTrue(message.startswith(f"{self.env}: "), message)
        self.assertNotIn("--ca-file", message)
        self.assertIn(repr(path), message)
        self.assertIn(why, message)
        self.assertNotIn("\n", message)
        error = self.assertRaises(ConfigError, load, {}, {self.env: path})
        self.assertIn(f"--ca-file ({self.env})", str(error))
        self.assertIn(why, str(error))

    def test_unset(self) -> None:
        """Unset or empty is None."""
        self.assertIsNone(load({})[0].ca_file)
        self.assertIsNone(load({self.env: ""})[0].ca_file)

    def test_valid(self) -> None:
        """A PEM file with one or more certificates, text around them allowed, is used."""
        for count, before, after in ((1, b"", b""), (3, b"", b""), (2, b"# bundle\n", b"\nend\n")):
            with self.subTest(count=count):
                path = write_certificates(self.mktemp(), count, before, after)
                settings, events = load({self.env: path})
                self.assertEqual(settings.ca_file, path)
                self.assertEqual(events, [])
                self.assertEqual(load({}, {self.env: path})[0].ca_file, path)

    def test_missing(self) -> None:
        """A file that does not exist is refused."""
        self.assertRefused(self.mktemp(), "cannot read")

    def test_directory(self) -> None:
        """A directory is refused."""
        path = self.mktemp()
        os.mkdir(path)
        self.assertRefused(path, "cannot read")

    def test_not_certificates(self) -> None:
        """Empty files, garbage, a key or a broken certificate are refused."""
        key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        good = write_certificates(self.mktemp())
        with open(good, "rb") as handle:
            certificate = handle.read()
        broken = certificate.replace(b"\n", b"\n!", 3)
        for name, data in (("empty", b""), ("garbage", b"\x00\xffnot pem"), ("key", key),
                           ("broken", broken), ("der", b"0\x82\x01\x00")):
            with self.subTest(name=name):
                path = self.mktemp()
                with open(path, "wb") as handle:
                    handle.write(data)
                self.assertRefused(path, "holds no PEM certificate")

    def test_empty_override_unsets(self) -> None:
        """An empty command-line value unsets a CA file set in the environment."""
        path = write_certificates(self.mktemp())
        settings, _ = load({self.env: path}, {self.env: ""})
        self.assertIsNone(settings.ca_file)


class OverrideTests(SynchronousTestCase):
    """Command-line overrides win over the environment and are parsed strictly."""

    def assertOptionError(self, env: str, text: str, *fragments: str) -> ConfigError:
        """Overriding *env* with *text* raises a one-line error naming the option."""
        events: list[Event] = []
        error = self.assertRaises(
            ConfigError, load_settings, {}, {env: text}, Logger(observer=events.append)
        )
        message = str(error)
        self.assertIn(f"--{SPECS[env].option} ({env})", message)
        self.assertIn(repr(text), message)
        self.assertNotIn("\n", message)
        for fragment in fragments:
            self.assertIn(fragment, message)
        self.assertEqual(events, [])
        return error

    def test_win_over_environ(self) -> None:
        """An override replaces the environment's value."""
        settings, events = load(
            {"HOSTLINK_WS_PING_INTERVAL": "10s", "HOSTLINK_WS_ENABLED": "no",
             "HOSTLINK_WS_URL": "wss://env.example/ws"},
            {"HOSTLINK_WS_PING_INTERVAL": "20s", "HOSTLINK_WS_ENABLED": "yes",
             "HOSTLINK_WS_URL": "wss://option.example/ws"},
        )
        self.assertEqual(settings.ping_interval, 20.0)
        self.assertTrue(settings.enabled)
        self.assertEqual(settings.ws_url, "wss://option.example/ws")
        self.assertEqual(events, [])

    def test_override_replaces_bad_environ(self) -> None:
        """A bad environment value that is overridden is not even reported."""
        settings, events = load(
            {"HOSTLINK_WS_PING_INTERVAL": "garbage"}, {"HOSTLINK_WS_PING_INTERVAL": "20s"}
        )
        self.assertEqual(settings.ping_interval, 20.0)
        self.assertEqual(events, [])

    def test_bad_duration(self) -> None:
        """An unparsable duration names the option and the range."""
        for env in DURATIONS:
            for text in ("soon", "10", "", " 10s", "1 s"):
                with self.subTest(env=env, text=text):
                    self.assertOptionError(env, text, "Go duration", SPECS[env].range)

    def test_duration_out_of_range(self) -> None:
        """An out-of-range duration is refused, not clamped."""
        self.assertOptionError(
            "HOSTLINK_WS_RECONNECT_MIN", "10m", "out of range", "100ms \u2013 5m"
        )
        self.assertOptionError("HOSTLINK_WS_RECONNECT_MIN", "50ms", "out of range")
        self.assertOptionError("HOSTLINK_WS_PING_INTERVAL", "-30s", "out of range", "5s \u2013 5m")
        self.assertOptionError("HOSTLINK_WS_RECONNECT_MAX", "2h", "out of range", "1s \u2013 1h")

    def test_value_with_newline_stays_one_line(self) -> None:
        """The message quotes the value, so a newline in it cannot split the line."""
        self.assertOptionError("HOSTLINK_WS_PONG_TIMEOUT", "1s\nINJECTED", "Go duration")

    def test_bytes(self) -> None:
        """Byte counts: whole numbers within range."""
        env = "HOSTLINK_WS_MAX_MESSAGE_BYTES"
        self.assertEqual(load({}, {env: "4096"})[0].max_message_bytes, 4096)
        self.assertOptionError(env, "1k", "whole number", "1024 \u2013 67108864")
        self.assertOptionError(env, "", "whole number")
        self.assertOptionError(env, "100", "out of range", "1024 \u2013 67108864")
        self.assertOptionError(env, "67108865", "out of range")

    def test_enabled(self) -> None:
        """The flag accepts yes/no words only."""
        env = "HOSTLINK_WS_ENABLED"
        for text, expected in (("true", True), ("YES", True), ("1", True),
                               ("false", False), ("no", False), ("0", False), ("off", False)):
            with self.subTest(text=text):
                self.assertEqual(load({"HOSTLINK_WS_ENABLED": "yes"}, {env: text})[0].enabled,
                                 expected)
        for text in ("on", "maybe", ""):
            with self.subTest(text=text):
                self.assertOptionError(env, text, "true, 1, yes, false, 0, no")

    def test_jitter(self) -> None:
        """Only the known jitter modes."""
        env = "HOSTLINK_WS_RECONNECT_JITTER"
        self.assertEqual(load({}, {env: "full"})[0].reconnect_jitter, "full")
        self.assertOptionError(env, "none", "go, full")
        self.assertOptionError(env, "", "go, full")

    def test_ws_url(self) -> None:
        """The gateway URL must be a ws:// or wss:// URL with a host; empty derives it."""
        env = "HOSTLINK_WS_URL"
        self.assertEqual(load({}, {env: "ws://127.0.0.1:1/x"})[0].ws_url, "ws://127.0.0.1:1/x")
        for text in ("http://cp.example/ws", "wss://", "gw.example/ws", "wss://[::1"):
            with self.subTest(text=text):
                self.assertOptionError(env, text, "ws://")
        settings, _ = load({env: "wss://env.example/ws"}, {env: ""})
        self.assertEqual(settings.ws_url, "wss://api.selfhost.dev/api/v1/agents/ws")

    def test_control_plane_url(self) -> None:
        """The control plane URL must be absolute; the gateway URL is derived from it."""
        env = "SH_CONTROL_PLANE_URL"
        settings, _ = load({env: "https://env.example"}, {env: "http://option.example/cp"})
        self.assertEqual(settings.ws_url, "ws://option.example/cp/api/v1/agents/ws")
        for text in ("", "cp.example", "https://[::1", "https://cp example"):
            with self.subTest(text=text):
                self.assertOptionError(env, text)

    def test_paths(self) -> None:
        """Paths are taken as given, but not empty."""
        for env in ("HOSTLINK_STATE_PATH", "HOSTLINK_PRIVATE_KEY_PATH"):
            with self.subTest(env=env):
                self.assertEqual(value_of(load({}, {env: "/x y"})[0], env), "/x y")
                self.assertOptionError(env, "", "empty")

    def test_status_listen(self) -> None:
        """An empty value switches the status page off; others are kept."""
        env = "HOSTLINK_WS_STATUS_LISTEN"
        self.assertEqual(load({}, {env: "tcp:0"})[0].status_listen, "tcp:0")
        self.assertIsNone(load({env: "tcp:8089"}, {env: ""})[0].status_listen)

    def test_unknown_name(self) -> None:
        """An override for a variable that does not exist is a programming error."""
        error = self.assertRaises(ConfigError, load, {}, {"HOSTLINK_WS_TYPO": "1"})
        self.assertIn("HOSTLINK_WS_TYPO", str(error))

    def test_config_error_is_value_error(self) -> None:
        """ConfigError is a ValueError."""
        self.assertTrue(issubclass(ConfigError, ValueError))

    @given(st.sampled_from(sorted(DURATIONS)), st.text(max_size=30))
    def test_any_duration_text(self, env: str, text: str) -> None:
        """Any override text is either an in-range value or a ConfigError, never clamped."""
        try:
            settings, events = load({}, {env: text})
        except ConfigError as error:
            self.assertNotIn("\n", str(error))
            return
        _, low, high = DURATIONS[env]
        self.assertTrue(low <= value_of(settings, env) <= high)
        self.assertEqual(events, [])
