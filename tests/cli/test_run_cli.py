"""`egress run` and `egress cleanup` refuse with one line where they cannot work."""

from click.testing import CliRunner

from cli.main import main

PURPOSE = 'version = 1\npurpose = "x"\ntask = "t"\n[[allow]]\nhost = "pypi.org"\n'


def test_run_needs_root(tmp_path, monkeypatch):
    # Tests run as root (the lab needs it); the check reads the effective uid, faked here.
    monkeypatch.setattr("egress.enforce.run.os.geteuid", lambda: 1000)
    (tmp_path / "p.toml").write_text(PURPOSE)
    got = CliRunner().invoke(main, ["run", "--task", "t", "--purpose", str(tmp_path / "p.toml"),
                                    "--no-store", "--", "true"])
    assert got.exit_code == 1 and "needs root" in got.output


def test_run_refuses_a_bad_manifest_by_its_key(tmp_path):
    (tmp_path / "p.toml").write_text(PURPOSE.replace("host", "hots"))
    got = CliRunner().invoke(main, ["run", "--task", "t", "--purpose", str(tmp_path / "p.toml"),
                                    "--no-store", "--", "true"])
    assert got.exit_code == 1 and "hots" in got.output and got.output.count("\n") == 1


def test_run_needs_a_command(tmp_path):
    (tmp_path / "p.toml").write_text(PURPOSE)
    got = CliRunner().invoke(main, ["run", "--task", "t", "--purpose", str(tmp_path / "p.toml")])
    assert got.exit_code == 2 and "COMMAND" in got.output
