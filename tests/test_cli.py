"""The command line (dselectk/__main__.py): help texts as plain text, --version, and the package
metadata it reports (version, license) consistent across pyproject.toml, LICENSE and CHANGELOG."""
import os
import re

import pytest

import dselectk
from dselectk.__main__ import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _output(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"], ["info", "--help"]])
def test_help_is_plain_text(capsys, argv):
    out = _output(capsys, argv)
    assert out.startswith("usage: dselectk")
    assert "`" not in out and "``" not in out  # no reST markup printed literally
    assert len(out.split("\n\n")[1].strip()) > 20  # a description, not just the usage line


def test_version(capsys):
    assert _output(capsys, ["--version"]).strip() == f"dselectk {dselectk.__version__}"


def _pyproject():
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        return f.read()


def test_version_and_license_agree_with_pyproject():
    text = _pyproject()
    assert re.search(r'^version = "([^"]+)"', text, re.M).group(1) == dselectk.__version__
    assert 'license = "Apache-2.0"' in text and 'license-files = ["LICENSE"]' in text
    with open(os.path.join(ROOT, "LICENSE")) as f:
        license_text = f.read()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text and len(license_text) > 11000  # the full text


def test_changelog_has_an_unreleased_section_and_this_version():
    with open(os.path.join(ROOT, "CHANGELOG.md")) as f:
        text = f.read()
    headings = re.findall(r"^## (.+)$", text, re.M)
    assert headings[0] == "[Unreleased]"
    assert any(h.startswith(f"[{dselectk.__version__}]") for h in headings)
