"""Tests for the phase-2 (task) settings of L{hostlink_tw.config}: PROTOCOL §10."""

from __future__ import annotations

import os
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.logger import formatEvent
from twisted.trial.unittest import SynchronousTestCase

from hostlink_tw.config import SETTINGS, ConfigError, Settings, load_settings
from tests.test_config import PHASE_2, SPECS, WarningAssertions, load, value_of

INT64_MAX = (1 << 63) - 1

# variable: (default, minimum, maximum) in seconds, from PROTOCOL §10.
DURATIONS = {
    "HOSTLINK_WS_POLLING_FALLBACK_THRESHOLD": (30.0, 0.0, 300.0),
    "HOSTLINK_TASK_POLL_INTERVAL": (10.0, 0.01, 300.0),
    "HOSTLINK_HEARTBEAT_INTERVAL": (5.0, 0.01, 300.0),
    "HOSTLINK_TASK_OUTPUT_FLUSH_INTERVAL": (0.1, 0.001, 5.0),
    "HOSTLINK_LOCAL_STORE_RETENTION": (86400.0, 60.0, 720 * 3600.0),
    "HOSTLINK_TASK_TIMEOUT": (0.0, 0.0, 168 * 3600.0),
    "HOSTLINK_TASK_KILL_GRACE": (5.0, 0.0, 300.0),
}
# Positive integers: (default, minimum, maximum or None when unbounded).
POSITIVE = {
    "HOSTLINK_TASK_OUTPUT_FLUSH_THRESHOLD": (16384, 1024, 1048576),
    "HOSTLINK_LOCAL_STORE_SPOOL_CAP_BYTES": (67108864, 1, None),
    "HOSTLINK_LOCAL_STORE_TERMINAL_RESERVE_BYTES": (1048576, 1, None),
    "HOSTLINK_TASK_QUEUE_LIMIT": (16, 1, 10000),
    "HOSTLINK_TASK_CONCURRENCY": (1, 1, 64),
    "HOSTLINK_TASK_OUTPUT_LIMIT_BYTES": (67108864, 1, None),
}
FLAGS = {"HOSTLINK_WS_DELIVERY_ENABLED", "HOSTLINK_WS_RESULTS_ENABLED"}
FINAL_BYTES = "HOSTLINK_TASK_FINAL_OUTPUT_BYTES"
STORE_PATH = "HOSTLINK_LOCAL_STORE_PATH"
WORKDIR = "HOSTLINK_TASK_WORKDIR"
CAP = "HOSTLINK_LOCAL_STORE_SPOOL_CAP_BYTES"
RESERVE = "HOSTLINK_LOCAL_STORE_TERMINAL_RESERVE_BYTES"
THRESHOLD = "HOSTLINK_TASK_OUTPUT_FLUSH_THRESHOLD"



def option_error(testcase: SynchronousTestCase, env: str, text: str) -> str:
    """Overriding *env* with *text* raises a one-line error naming the option; its text."""
    error = testcase.assertRaises(ConfigError, load, {}, {env: text})
    message = str(error)
    testcase.assertIn(f"--{SPECS[env].option} ({env})", message)
    testcase.assertNotIn("\n", message)
    return message


class TableTests(SynchronousTestCase):
    """Every §10 variable is in C{SETTINGS}, with its documented default and range."""

    def test_every_variable(self) -> None:
        """The phase-2 variables follow phase 1's, in §10's order."""
        self.assertEqual([spec.env for spec in SETTINGS][-len(PHASE_2) :], PHASE_2)

    def test_defaults(self) -> None:
        """An empty environment gives §10's defaults, silently."""
        settings, events = load({})
        self.assertEqual(events, [])
        expected: dict[str, Any] = {
            "delivery_enabled": False,
            "results_enabled": False,
            "polling_fallback_threshold": 30.0,
            "task_poll_interval": 10.0,
            "heartbeat_interval": 5.0,
            "output_flush_interval": 0.1,
            "output_flush_threshold": 16384,
            "local_store_path": "/var/lib/hostlink/task_store.db",
            "spool_cap_bytes": 67108864,
            "terminal_reserve_bytes": 1048576,
            "store_retention": 86400.0,
            "task_queue_limit": 16,
            "task_concurrency": 1,
            "task_timeout": 0.0,
            "task_kill_grace": 5.0,
            "task_output_limit_bytes": 67108864,
            "task_final_output_bytes": 262144,
            "task_workdir": None,
        }
        self.assertEqual([SPECS[env].attribute for env in PHASE_2], list(expected))
        for attribute, value in expected.items():
            with self.subTest(attribute=attribute):
                self.assertEqual(getattr(settings, attribute), value)
                self.assertEqual(getattr(Settings(), attribute), value)

    def test_ranges(self) -> None:
        """The ranges read as in §10."""
        ranges = {
            "HOSTLINK_WS_POLLING_FALLBACK_THRESHOLD": "0s \u2013 5m",
            "HOSTLINK_TASK_POLL_INTERVAL": "10ms \u2013 5m",
            "HOSTLINK_TASK_OUTPUT_FLUSH_INTERVAL": "1ms \u2013 5s",
            "HOSTLINK_TASK_OUTPUT_FLUSH_THRESHOLD": "1024 \u2013 1048576",
            "HOSTLINK_LOCAL_STORE_SPOOL_CAP_BYTES": "positive",
            "HOSTLINK_LOCAL_STORE_RETENTION": "1m \u2013 720h",
            "HOSTLINK_TASK_QUEUE_LIMIT": "1 \u2013 10000",
            "HOSTLINK_TASK_CONCURRENCY": "1 \u2013 64",
            "HOSTLINK_TASK_TIMEOUT": "0s \u2013 168h",
            "HOSTLINK_TASK_KILL_GRACE": "0s \u2013 5m",
            "HOSTLINK_TASK_OUTPUT_LIMIT_BYTES": "positive",
            "HOSTLINK_TASK_FINAL_OUTPUT_BYTES": "0 \u2013 1048576",
            "HOSTLINK_TASK_WORKDIR": "",
        }
        for env, text in ranges.items():
            with self.subTest(env=env):
                self.assertEqual(SPECS[env].range, text)

    def test_default_spool_fits_every_threshold(self) -> None:
        """The default cap and reserve pass the cross-check whatever the flush threshold."""
        _, _, highest = POSITIVE[THRESHOLD]
        assert highest is not None
        settings, events = load({THRESHOLD: str(highest)})
        self.assertEqual(events, [])
        self.assertEqual(settings.output_flush_threshold, highest)
        self.assertGreaterEqual(
            settings.spool_cap_bytes, settings.terminal_reserve_bytes + 2 * highest
        )


class FlagTests(WarningAssertions):
    """C{HOSTLINK_WS_DELIVERY_ENABLED}, C{HOSTLINK_WS_RESULTS_ENABLED}: as §4's flag."""

    def test_values(self) -> None:
        """true, 1, yes enable; the usual negatives disable quietly; others warn."""
        for env in sorted(FLAGS):
            for text, expected in (("true", True), ("YES", True), (" 1 ", True),
                                   ("", False), ("false", False), ("0", False), ("no", False)):
                with self.subTest(env=env, text=text):
                    settings, events = load({env: text})
                    self.assertIs(value_of(settings, env), expected)
                    self.assertEqual(events, [])
            for text in ("on", "enabled", "2"):
                with self.subTest(env=env, text=text):
                    settings, events = load({env: text})
                    self.assertIs(value_of(settings, env), False)
                    self.assertWarned(events, env, text, "disabled")

    def test_independent(self) -> None:
        """Each flag sets its own attribute only."""
        settings, _ = load({"HOSTLINK_WS_RESULTS_ENABLED": "yes"})
        self.assertEqual((settings.delivery_enabled, settings.results_enabled), (False, True))
        settings, _ = load({"HOSTLINK_WS_DELIVERY_ENABLED": "yes"})
        self.assertEqual((settings.delivery_enabled, settings.results_enabled), (True, False))

    def test_overrides(self) -> None:
        """As options they accept yes/no words only."""
        for env in sorted(FLAGS):
            with self.subTest(env=env):
                self.assertIs(value_of(load({env: "yes"}, {env: "no"})[0], env), False)
                self.assertIs(value_of(load({}, {env: "true"})[0], env), True)
                option_error(self, env, "on")


class DurationTests(WarningAssertions):
    """The phase-2 durations: Go syntax, warn and default, clamp at both ends."""

    def test_valid(self) -> None:
        """A value within range is used, in seconds."""
        for env, (_, low, high) in DURATIONS.items():
            for text, seconds in (("2s", 2.0), ("1.5s", 1.5), ("4500ms", 4.5)):
                if not low <= seconds <= high:
                    continue
                with self.subTest(env=env, text=text):
                    settings, events = load({env: text})
                    self.assertEqual(value_of(settings, env), seconds)
                    self.assertEqual(events, [])

    def test_bounds_inclusive(self) -> None:
        """Both bounds are accepted without a warning."""
        for env, (_, low, high) in DURATIONS.items():
            spec = SPECS[env]
            for text, seconds in ((spec.minimum, low), (spec.maximum, high)):
                with self.subTest(env=env, text=text):
                    settings, events = load({env: text})
                    self.assertEqual(value_of(settings, env), seconds)
                    self.assertEqual(events, [])

    def test_unparsable(self) -> None:
        """A value Go rejects warns and the default is used."""
        for env, (default, _, _) in DURATIONS.items():
            for text in ("soon", "10", "1d", "-"):
                with self.subTest(env=env, text=text):
                    settings, events = load({env: text})
                    self.assertEqual(value_of(settings, env), default)
                    self.assertWarned(events, env, text, SPECS[env].default)

    def test_below_minimum(self) -> None:
        """Below the range: a warning, and the minimum."""
        for env, (_, low, _) in DURATIONS.items():
            for text in ("-1ns", "-5m"):
                with self.subTest(env=env, text=text):
                    settings, events = load({env: text})
                    self.assertEqual(value_of(settings, env), low)
                    event = self.assertWarned(events, env, text, SPECS[env].minimum)
                    self.assertIn(SPECS[env].range, formatEvent(event))

    def test_just_below_a_positive_minimum(self) -> None:
        """A minimum above zero clamps a smaller positive value up."""
        for env, text, expected in (
            ("HOSTLINK_TASK_POLL_INTERVAL", "9ms", 0.01),
            ("HOSTLINK_HEARTBEAT_INTERVAL", "0", 0.01),
            ("HOSTLINK_TASK_OUTPUT_FLUSH_INTERVAL", "999us", 0.001),
            ("HOSTLINK_LOCAL_STORE_RETENTION", "59s", 60.0),
        ):
            with self.subTest(env=env):
                settings, events = load({env: text})
                self.assertEqual(value_of(settings, env), expected)
                self.assertWarned(events, env, text, SPECS[env].minimum)

    def test_zero_where_allowed(self) -> None:
        """0 is a valid fallback threshold, timeout (none) and kill grace."""
        for env in ("HOSTLINK_WS_POLLING_FALLBACK_THRESHOLD", "HOSTLINK_TASK_TIMEOUT",
                    "HOSTLINK_TASK_KILL_GRACE"):
            with self.subTest(env=env):
                settings, events = load({env: "0"})
                self.assertEqual(value_of(settings, env), 0.0)
                self.assertEqual(events, [])

    def test_above_maximum(self) -> None:
        """Above the range: a warning, and the maximum."""
        for env, (_, _, high) in DURATIONS.items():
            for text in ("721h", "2562047h"):
                with self.subTest(env=env, text=text):
                    settings, events = load({env: text})
                    self.assertEqual(value_of(settings, env), high)
                    self.assertWarned(events, env, text, SPECS[env].maximum)

    def test_overrides_are_strict(self) -> None:
        """As options, unparsable and out-of-range durations are refused."""
        for env in DURATIONS:
            with self.subTest(env=env):
                self.assertIn("Go duration", option_error(self, env, "soon"))
                self.assertIn("out of range", option_error(self, env, "1000h"))
                low = DURATIONS[env][1]
                self.assertEqual(value_of(load({}, {env: SPECS[env].minimum})[0], env), low)

    @given(st.sampled_from(sorted(DURATIONS)), st.text(max_size=30))
    def test_any_value(self, env: str, text: str) -> None:
        """Any environment text gives a value within range and never raises."""
        settings, events = load({env: text})
        _, low, high = DURATIONS[env]
        self.assertTrue(low <= value_of(settings, env) <= high)
        self.assertLessEqual(len(events), 1)


class PositiveIntegerTests(WarningAssertions):
    """§10's positive integers: zero or less warns and means the default."""

    def test_valid(self) -> None:
        """A value within range is used, the bounds included."""
        for env, text, expected, others in (
            (THRESHOLD, "1024", 1024, {}),
            (THRESHOLD, "1048576", 1048576, {}),
            (THRESHOLD, "+20000", 20000, {}),
            (CAP, "3049", 3049, {RESERVE: "1001", THRESHOLD: "1024"}),
            (CAP, str(INT64_MAX), INT64_MAX, {}),
            (RESERVE, "1", 1, {}),
            (RESERVE, "0002048", 2048, {}),
            (RESERVE, str(INT64_MAX - 2 * 16384), INT64_MAX - 2 * 16384, {CAP: str(INT64_MAX)}),
            ("HOSTLINK_TASK_QUEUE_LIMIT", "1", 1, {}),
            ("HOSTLINK_TASK_QUEUE_LIMIT", "10000", 10000, {}),
            ("HOSTLINK_TASK_CONCURRENCY", "1", 1, {}),
            ("HOSTLINK_TASK_CONCURRENCY", "64", 64, {}),
            ("HOSTLINK_TASK_OUTPUT_LIMIT_BYTES", "1", 1, {}),
            ("HOSTLINK_TASK_OUTPUT_LIMIT_BYTES", str(INT64_MAX), INT64_MAX, {}),
        ):
            with self.subTest(env=env, text=text):
                settings, events = load({env: text, **others})
                self.assertEqual(value_of(settings, env), expected)
                self.assertEqual(events, [])

    def test_unparsable(self) -> None:
        """Anything but optionally signed ASCII digits warns and uses the default."""
        for env, (default, _, _) in POSITIVE.items():
            for text in ("lots", "1k", "1e6", "1_000", "1.5", "0x400", "\u0663"):
                with self.subTest(env=env, text=text):
                    settings, events = load({env: text})
                    self.assertEqual(value_of(settings, env), default)
                    self.assertWarned(events, env, text, str(default))

    def test_zero_or_less(self) -> None:
        """0 and negative numbers warn and use the default (not the minimum)."""
        for env, (default, _, _) in POSITIVE.items():
            for text in ("0", "-1", "-0", "-99999999999999999999999"):
                with self.subTest(env=env, text=text):
                    settings, events = load({env: text})
                    self.assertEqual(value_of(settings, env), default)
                    event = self.assertWarned(events, env, text, str(default))
                    self.assertIn("positive", formatEvent(event))

    def test_clamped(self) -> None:
        """A positive value outside a bounded range is clamped to the nearest bound."""
        for env, text, expected in (
            (THRESHOLD, "1023", 1024),
            (THRESHOLD, "1048577", 1048576),
            (THRESHOLD, "99999999999999999999999", 1048576),
            ("HOSTLINK_TASK_QUEUE_LIMIT", "10001", 10000),
            ("HOSTLINK_TASK_CONCURRENCY", "65", 64),
        ):
            with self.subTest(env=env, text=text):
                settings, events = load({env: text})
                self.assertEqual(value_of(settings, env), expected)
                self.assertWarned(events, env, text, str(expected))

    def test_past_int64(self) -> None:
        """Unbounded ones stop where the Go agent's int64 does: past it is the default."""
        for env in ("HOSTLINK_TASK_OUTPUT_LIMIT_BYTES", CAP):
            default = POSITIVE[env][0]
            for text in (str(INT64_MAX + 1), "9" * 5000):
                with self.subTest(env=env, text=text[:30]):
                    settings, events = load({env: text})
                    self.assertEqual(value_of(settings, env), default)
                    self.assertWarned(events, env, text, str(default))
            self.assertEqual(value_of(load({env: str(INT64_MAX)})[0], env), INT64_MAX)

    def test_overrides_are_strict(self) -> None:
        """As options, zero, words and values out of range are refused."""
        for env in POSITIVE:
            with self.subTest(env=env):
                self.assertIn("positive", option_error(self, env, "0"))
                self.assertIn("whole number", option_error(self, env, "many"))
                self.assertIn("out of range", option_error(self, env, "9" * 30))

    @given(st.sampled_from(sorted(POSITIVE)), st.text(max_size=30))
    def test_any_value(self, env: str, text: str) -> None:
        """Any environment text gives a value within range and never raises."""
        settings, events = load({env: text})
        _, low, high = POSITIVE[env]
        self.assertLessEqual(low, value_of(settings, env))
        self.assertLessEqual(value_of(settings, env), INT64_MAX if high is None else high)
        self.assertLessEqual(len(events), 1)


class FinalOutputBytesTests(WarningAssertions):
    """C{HOSTLINK_TASK_FINAL_OUTPUT_BYTES}: 0 - 1048576, clamped."""

    def test_values(self) -> None:
        """0 (finals without text) and the maximum are valid."""
        for text, expected in (("0", 0), ("1", 1), ("1048576", 1048576)):
            with self.subTest(text=text):
                settings, events = load({FINAL_BYTES: text})
                self.assertEqual(settings.task_final_output_bytes, expected)
                self.assertEqual(events, [])

    def test_clamped(self) -> None:
        """Out of range is clamped at both ends; unparsable is the default."""
        for text, expected in (("-1", 0), ("1048577", 1048576)):
            with self.subTest(text=text):
                settings, events = load({FINAL_BYTES: text})
                self.assertEqual(settings.task_final_output_bytes, expected)
                self.assertWarned(events, FINAL_BYTES, text, str(expected))
        settings, events = load({FINAL_BYTES: "256k"})
        self.assertEqual(settings.task_final_output_bytes, 262144)
        self.assertWarned(events, FINAL_BYTES, "256k", "262144")

    def test_override(self) -> None:
        """As an option, out of range is refused."""
        self.assertIn("0 \u2013 1048576", option_error(self, FINAL_BYTES, "-1"))
        self.assertEqual(load({}, {FINAL_BYTES: "0"})[0].task_final_output_bytes, 0)


class SpoolCrossCheckTests(SynchronousTestCase):
    """§10: reserve <= cap, and cap >= reserve + 2 x flush threshold."""

    def check_replaced(self, environ: dict[str, str]) -> dict[str, Any]:
        """*environ* fails the check: one warning line, and both defaults."""
        settings, events = load(environ)
        self.assertEqual(
            (settings.spool_cap_bytes, settings.terminal_reserve_bytes), (67108864, 1048576)
        )
        self.assertEqual(len(events), 1, [formatEvent(e) for e in events])
        [event] = events
        text = formatEvent(event)
        self.assertNotIn("\n", text)
        for name in (CAP, RESERVE, THRESHOLD, "67108864", "1048576"):
            self.assertIn(name, text)
        self.assertEqual(event["variable"], CAP)
        return event

    def test_reserve_above_cap(self) -> None:
        """A reserve larger than the cap."""
        self.check_replaced({CAP: "1000000", RESERVE: "2000000"})
        self.check_replaced({RESERVE: "70000000"})

    def test_no_room_for_two_chunks(self) -> None:
        """A reserve that fits, but leaves less than two flush thresholds."""
        self.check_replaced({CAP: "100000", RESERVE: "90000"})
        self.check_replaced({CAP: "2000000", RESERVE: "1048576", THRESHOLD: "500000"})

    def test_exactly_enough(self) -> None:
        """cap = reserve + 2 x threshold is accepted as given."""
        settings, events = load({CAP: str(1000 + 2 * 2048), RESERVE: "1000", THRESHOLD: "2048"})
        self.assertEqual(events, [])
        self.assertEqual((settings.spool_cap_bytes, settings.terminal_reserve_bytes),
                         (5096, 1000))
        self.check_replaced({CAP: str(1000 + 2 * 2048 - 1), RESERVE: "1000", THRESHOLD: "2048"})

    def test_uses_the_threshold_after_clamping(self) -> None:
        """A threshold clamped to 1024 is what the cap must leave room for."""
        settings, events = load({CAP: "3048", RESERVE: "1000", THRESHOLD: "10"})
        self.assertEqual((settings.spool_cap_bytes, settings.output_flush_threshold),
                         (3048, 1024))
        self.assertEqual([e["variable"] for e in events], [THRESHOLD])

    def test_option_in_the_mix_is_refused(self) -> None:
        """When any of the three is an option, the mismatch is a ConfigError."""
        for environ, overrides, named in (
            ({}, {CAP: "1000"}, CAP),
            ({CAP: "1000000"}, {RESERVE: "2000000"}, RESERVE),
            ({CAP: "2000000"}, {THRESHOLD: "1048576"}, THRESHOLD),
        ):
            with self.subTest(named=named):
                error = self.assertRaises(ConfigError, load, environ, overrides)
                message = str(error)
                self.assertIn(f"--{SPECS[named].option} ({named})", message)
                self.assertIn(CAP, message)
                self.assertNotIn("\n", message)


class StorePathTests(SynchronousTestCase):
    """C{HOSTLINK_LOCAL_STORE_PATH}: task_store.db in the state directory by default."""

    def test_follows_the_state_directory(self) -> None:
        """Unset or empty, it is task_store.db inside HOSTLINK_STATE_PATH."""
        for environ in ({"HOSTLINK_STATE_PATH": "/srv/hostlink"},
                        {"HOSTLINK_STATE_PATH": "/srv/hostlink/", STORE_PATH: ""}):
            with self.subTest(environ=environ):
                settings, events = load(environ)
                self.assertEqual(settings.local_store_path, "/srv/hostlink/task_store.db")
                self.assertEqual(events, [])
        settings, _ = load({}, {"HOSTLINK_STATE_PATH": "relative"})
        self.assertEqual(settings.local_store_path, os.path.join("relative", "task_store.db"))

    def test_given(self) -> None:
        """A given path is used as is, from either source; an empty option is refused."""
        self.assertEqual(load({STORE_PATH: "/data/t.db"})[0].local_store_path, "/data/t.db")
        self.assertEqual(load({STORE_PATH: "/e.db"}, {STORE_PATH: "/o.db"})[0].local_store_path,
                         "/o.db")
        self.assertIn("empty", option_error(self, STORE_PATH, ""))


class WorkdirTests(SynchronousTestCase):
    """C{HOSTLINK_TASK_WORKDIR}: unset, or an existing directory (refused otherwise)."""

    def test_unset(self) -> None:
        """Unset or empty: tasks run in the agent's directory."""
        for environ in ({}, {WORKDIR: ""}):
            settings, events = load(environ)
            self.assertIsNone(settings.task_workdir)
            self.assertEqual((events, settings.errors), ([], ()))

    def test_directory(self) -> None:
        """An existing directory is kept as given, from either source."""
        directory = self.mktemp()
        os.mkdir(directory)
        for environ, overrides in (({WORKDIR: directory}, {}), ({}, {WORKDIR: directory})):
            settings, events = load(environ, overrides)
            self.assertEqual(settings.task_workdir, directory)
            self.assertEqual((events, settings.errors), ([], ()))

    def test_refused_from_the_environment(self) -> None:
        """A missing path or a file is one Settings.errors line, not a warning."""
        missing = self.mktemp()
        afile = self.mktemp()
        with open(afile, "w"):
            pass
        for path in (missing, afile):
            with self.subTest(path=path):
                settings, events = load({WORKDIR: path})
                self.assertEqual(events, [])
                [error] = settings.errors
                self.assertTrue(error.startswith(f"{WORKDIR}: {path!r} is not an existing"))
                self.assertRaises(ConfigError, settings.check)

    def test_unenterable(self) -> None:
        """A directory the agent cannot enter is refused."""
        directory = self.mktemp()
        os.mkdir(directory)
        # (Faked: the tests may run as root, who enters every directory.)
        self.patch(os, "access", lambda path, mode: not (path == directory and mode == os.X_OK))
        [error] = load({WORKDIR: directory})[0].errors
        self.assertIn("cannot enter", error)

    def test_option(self) -> None:
        """As an option a bad path raises; an empty one unsets the environment's."""
        self.assertIn("not an existing directory", option_error(self, WORKDIR, self.mktemp()))
        settings = load_settings({WORKDIR: self.mktemp()}, {WORKDIR: ""})
        self.assertIsNone(settings.task_workdir)
        self.assertEqual(settings.errors, ())
