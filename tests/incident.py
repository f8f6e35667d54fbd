"""The bundled lab incident replayed into a store: real findings for the tests of what
is built on the store (timeline, report)."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from cli.main import main

ROOT = Path(__file__).resolve().parent.parent
LAB = ROOT / "examples/lab-incident"
TASK = "deps-install"


def replay_lab_incident(store_url: str) -> str:
    """``egress replay`` of examples/lab-incident into ``store_url``; returns the URL."""
    result = CliRunner().invoke(main, [
        "replay", str(LAB / "incident.pcap"), "--local", "10.99.0.2/32",
        "--purpose", str(LAB / "purpose.toml"), "--db", store_url])
    assert result.exit_code == 10, result.output  # violations found
    return store_url
