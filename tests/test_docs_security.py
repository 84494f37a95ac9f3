"""
docs/security.rst and docs/upstream.rst name the tests that prove each
defence and the code that implements it; every name they cite must exist,
so the documents cannot silently rot when a test or a function is renamed.
"""

from __future__ import annotations

import importlib
import re
import unittest
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent
SECURITY = ROOT / "docs" / "security.rst"
UPSTREAM = ROOT / "docs" / "upstream.rst"

#: A cited test: tests.<module>.<Class>.<test_method>.
TEST_NAME = re.compile(r"^tests\.(test_\w+)\.([A-Za-z_]\w*)\.(test_\w+)$")
#: Anything in the text that starts like a dotted test name.
TEST_LIKE = re.compile(r"\btests(?:\.\w+)+")
#: A cited piece of code: hostlink_tw.<module>[.<name>...].
CODE_LIKE = re.compile(r"\bhostlink_tw(?:\.[A-Za-z_]\w*)+")


def _resolve(dotted: str) -> Any:
    """The object a dotted name means: the longest importable module, then attributes."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        try:
            value: Any = importlib.import_module(".".join(parts[:end]))
        except ImportError:
            continue
        for name in parts[end:]:
            value = getattr(value, name)
        return value
    raise ImportError(dotted)


def _entry(text: str, start: int) -> str:
    """The definition-list entry (or paragraph) from ``start`` to the next unindented block."""
    end = re.compile(r"\n\n(?=\S)").search(text, start)
    return text[start : end.start() if end else len(text)]


def missing_tests(text: str) -> list[str]:
    """The dotted test names in ``text`` that are malformed or name no test method."""
    missing = []
    for cited in sorted(set(TEST_LIKE.findall(text))):
        match = TEST_NAME.match(cited)
        if match is None:
            missing.append(cited)
            continue
        module, cls, method = match.groups()
        try:
            test_class = _resolve(f"tests.{module}.{cls}")
            ok = (
                isinstance(test_class, type)
                and issubclass(test_class, unittest.TestCase)
                and callable(getattr(test_class, method))
            )
        except (ImportError, AttributeError):
            ok = False
        if not ok:
            missing.append(cited)
    return missing


def missing_code(text: str) -> list[str]:
    """The dotted ``hostlink_tw`` names in ``text`` that do not resolve."""
    missing = []
    for cited in sorted(set(CODE_LIKE.findall(text))):
        try:
            _resolve(cited)
        except (ImportError, AttributeError):
            missing.append(cited)
    return missing


class SecurityDocumentTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.text = SECURITY.read_text(encoding="utf-8")

    def test_every_cited_test_exists(self) -> None:
        self.assertEqual(missing_tests(self.text), [])
        # A broken pattern must not make the check vacuous.
        self.assertGreater(len(set(TEST_LIKE.findall(self.text))), 80)

    def test_every_cited_name_exists(self) -> None:
        self.assertEqual(missing_code(self.text), [])
        self.assertGreater(len(set(CODE_LIKE.findall(self.text))), 40)

    def test_every_item_of_issue_10_is_covered(self) -> None:
        """Each of the 16 items is named ([10.N]) in a defence that cites its tests."""
        for item in range(1, 17):
            label = f"[10.{item}]"
            found = re.finditer(re.escape(label), self.text)
            entries = [_entry(self.text, m.start()) for m in found]
            self.assertTrue(entries, f"{label} is not mentioned")
            self.assertTrue(
                any(TEST_LIKE.search(entry) for entry in entries), f"{label} cites no test"
            )

    def test_every_threat_has_a_section(self) -> None:
        headings = re.findall(r"^(.+)\n-{3,}$", self.text, re.M)
        for who in (
            "The control plane",
            "A man in the middle",
            "Local users",
            "Authorized agents",
            "Unauthenticated clients",
            "What is not defended",
        ):
            self.assertTrue(any(h.startswith(who) for h in headings), (who, headings))

    def test_readme_links_it(self) -> None:
        readme = (ROOT / "README.rst").read_text(encoding="utf-8")
        for document in ("docs/security.rst", "docs/upstream.rst"):
            self.assertTrue(document in readme, f"README.rst does not link {document}")


class UpstreamDocumentTests(SynchronousTestCase):
    def test_every_cited_test_and_name_exists(self) -> None:
        text = UPSTREAM.read_text(encoding="utf-8")
        self.assertEqual(missing_tests(text), [])
        self.assertEqual(missing_code(text), [])


class CheckerTests(SynchronousTestCase):
    """The checks above catch what they are for."""

    def test_missing_test_names_are_found(self) -> None:
        text = (
            "``tests.test_docs_security.CheckerTests.test_missing_test_names_are_found`` "
            "``tests.test_docs_security.CheckerTests.test_renamed_away`` "
            "``tests.test_no_such_module.Tests.test_x`` ``tests.test_docs_security.CheckerTests``"
        )
        self.assertEqual(
            missing_tests(text),
            [
                "tests.test_docs_security.CheckerTests",
                "tests.test_docs_security.CheckerTests.test_renamed_away",
                "tests.test_no_such_module.Tests.test_x",
            ],
        )

    def test_missing_code_names_are_found(self) -> None:
        text = "``hostlink_tw.tls.client_tls_options`` ``hostlink_tw.tls.no_such_function``."
        self.assertEqual(missing_code(text), ["hostlink_tw.tls.no_such_function"])
