"""The documents the code and the unit point to exist (issue 9 item 19)."""

from __future__ import annotations

import re
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent
PROTOCOL = ROOT / "docs" / "protocol.rst"
# Everything that ships or documents the project.
SHIPPED = ("hostlink_tw", "twisted", "tests", "docs", "contrib", "benchmarks", "README.rst")


def _texts() -> list[tuple[Path, str]]:
    files: list[Path] = []
    for name in SHIPPED:
        path = ROOT / name
        if path.is_file():
            files.append(path)
        else:
            files += [p for p in path.rglob("*") if p.suffix in (".py", ".rst", ".service")]
    return [(f, f.read_text(encoding="utf-8")) for f in sorted(files)]


def _headings() -> list[tuple[str, str]]:
    """The numbered section titles of docs/protocol.rst: (number, title)."""
    text = PROTOCOL.read_text(encoding="utf-8")
    return re.findall(r"^(\d+)\. (.+)\n-{3,}$", text, re.M)


def _subheadings() -> list[tuple[str, str]]:
    """The numbered subsection titles of docs/protocol.rst: ("8.2", title)."""
    text = PROTOCOL.read_text(encoding="utf-8")
    return re.findall(r"^(\d+\.\d+) (.+)\n~{3,}$", text, re.M)


class ProtocolDocumentTests(SynchronousTestCase):
    def test_no_citation_of_a_missing_protocol_md(self) -> None:
        me = Path(__file__).resolve()
        citing = [str(f.relative_to(ROOT)) for f, text in _texts() if "PROTOCOL.md" in text]
        self.assertEqual([c for c in citing if ROOT / c != me], [])

    def test_every_cited_section_exists(self) -> None:
        """'PROTOCOL §N' in the code names a numbered section of docs/protocol.rst."""
        sections = {number for number, _ in _headings()}
        self.assertEqual(sections, {str(n) for n in range(1, 11)})
        cited: dict[str, set[str]] = {}
        for f, text in _texts():
            for number in re.findall(r"PROTOCOL §(\d+)", text):
                cited.setdefault(number, set()).add(str(f.relative_to(ROOT)))
        self.assertTrue(cited)
        for number, files in cited.items():
            self.assertIn(number, sections, f"§{number} cited by {sorted(files)}")

    def test_every_cited_subsection_exists(self) -> None:
        """'PROTOCOL §8.2' in the code names a subsection 8.2 of docs/protocol.rst."""
        subsections = {number for number, _ in _subheadings()}
        cited: dict[str, set[str]] = {}
        for f, text in _texts():
            for number in re.findall(r"PROTOCOL §(\d+\.\d+)", text):
                cited.setdefault(number, set()).add(str(f.relative_to(ROOT)))
        self.assertTrue(cited)
        for number, files in cited.items():
            self.assertIn(number, subsections, f"§{number} cited by {sorted(files)}")

    def test_nothing_is_only_planned(self) -> None:
        """Phase 2 is built, the Go agent's HTTP fallback (§9) included: nothing is planned."""
        headings = dict(_headings())
        for number in range(1, 11):
            unfinished = "(in progress)" in headings[str(number)] or "(planned)" in headings[
                str(number)]
            self.assertFalse(unfinished, headings[str(number)])
        text = PROTOCOL.read_text(encoding="utf-8")
        self.assertIn("\nWhere phase 2 differs from the Go agent, and why\n---", text)

    def test_readme_and_unit_point_to_it(self) -> None:
        self.assertIn("docs/protocol.rst", (ROOT / "README.rst").read_text(encoding="utf-8"))
        unit = (ROOT / "contrib" / "hostlink-tw.service").read_text(encoding="utf-8")
        self.assertIn(
            "Documentation=file:///opt/hostlink-tw/share/doc/hostlink-tw/protocol.rst", unit
        )


class ArchitectureDocumentTests(SynchronousTestCase):
    """docs/architecture.rst names every module of the agent, the wire and the control plane."""

    def test_every_module_is_described(self) -> None:
        text = (ROOT / "docs" / "architecture.rst").read_text(encoding="utf-8")
        control_plane = text[text.index("\nThe reference control plane\n---") :]
        for package in ("agent", "wire", "controlplane"):
            for module in sorted((ROOT / "hostlink_tw" / package).glob("*.py")):
                if module.name == "__init__.py":
                    continue
                with self.subTest(module=f"{package}/{module.name}"):
                    if package == "controlplane":
                        self.assertRegex(control_plane, rf"``{re.escape(module.name)}``")
                    else:
                        self.assertIn(f"{package}/{module.name}", text)
