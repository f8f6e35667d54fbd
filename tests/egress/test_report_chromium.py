"""The report in a real headless Chromium (Debian's chromium, tests/system-deps.sh): it
renders without console errors, requests nothing but itself, shows the findings, and
markup from the store never runs. A full-page screenshot is kept (its path is printed):
under $EGRESS_ARTIFACTS when set, else in pytest's tmp dir."""

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import main
from tests.browser import Browser, binary
from tests.incident import HOSTILE, HOSTILE_TASK, TASK, replay_lab_incident, write_hostile_task


@pytest.fixture(scope="module")
def browser():
    exe = binary()
    if exe is None:
        why = "no chromium on PATH (tests/system-deps.sh installs Debian's chromium)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"chromium is required in CI: {why}", pytrace=False)
        pytest.skip(why)
    with Browser(exe) as b:
        yield b


def write_report(db: str, task: str, out: Path) -> Path:
    result = CliRunner().invoke(main, ["report", "--task", task, "-o", str(out), "--db", db])
    assert result.exit_code == 0, result.output
    return out


def keep(screenshot: bytes, name: str, tmp_path: Path, record_property,
         pytestconfig) -> Path:
    folder = Path(os.environ.get("EGRESS_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(screenshot)
    record_property("screenshot", str(path))
    with pytestconfig.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
        print(f"\nscreenshot: {path}")
    return path


def test_the_report_renders_in_chromium(browser, tmp_path, record_property, pytestconfig):
    db = replay_lab_incident(f"sqlite:///{tmp_path / 'egress.db'}")
    page_file = write_report(db, TASK, tmp_path / "report.html")
    url = page_file.as_uri()
    page = browser.load(url)
    shot = keep(page.screenshot, "report.png", tmp_path, record_property, pytestconfig)
    assert page.requests == [url]      # the page itself, nothing else
    assert page.console == []          # no errors, no warnings, not even a log line
    assert page.scripts == 0
    for shown in ("Install Python dependencies from the package index", "Findings (6)",
                  "reverse-ssh-tunnel", "mining-stratum", "mining-pool", "ssh-egress",
                  "relay.example", "pool.supportxmr.com"):
        assert shown in page.text, shown
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


def test_markup_from_the_store_does_not_run(browser, tmp_path, record_property,
                                            pytestconfig):
    db = f"sqlite:///{tmp_path / 'egress.db'}"
    write_hostile_task(db)
    url = write_report(db, HOSTILE_TASK, tmp_path / "hostile.html").as_uri()
    page = browser.load(url)
    keep(page.screenshot, "report-hostile.png", tmp_path, record_property, pytestconfig)
    assert page.scripts == 0
    assert page.console == []          # the payloads would console.error if they ran
    assert page.requests == [url]      # nor load the attacker's iframe or image
    for value in HOSTILE.values():
        assert value in page.text, value


def test_the_harness_sees_requests_and_console_errors(browser, tmp_path):
    """A bad page, so that the checks above are known to be able to fail."""
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><head><meta charset="utf-8"></head><body><p>x</p>'
                   '<img src="https://attacker.example/pixel.png">'
                   '<script>console.error("boom")</script></body></html>')
    page = browser.load(bad.as_uri())
    assert page.requests == [bad.as_uri(), "https://attacker.example/pixel.png"]
    assert ("error", "boom") in page.console
    assert any(level == "error" and "Failed to load resource" in text
               for level, text in page.console)
    assert page.scripts == 1
