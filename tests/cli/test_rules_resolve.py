"""`egress rules generate --format iptables --resolve-now`: names resolved at generation time
by the host's own resolver (localhost resolves everywhere, from /etc/hosts)."""

from click.testing import CliRunner

from cli.main import main


def test_resolve_now_writes_the_addresses_with_the_time(tmp_path):
    purpose = tmp_path / "p.toml"
    purpose.write_text('version = 1\npurpose = "x"\ntask = "t"\n'
                       '[[allow]]\nhost = "localhost"\nports = [8080]\n')
    args = ["rules", "generate", "--purpose", str(purpose), "--match", "uid:1001",
            "--format", "iptables"]
    now = CliRunner().invoke(main, args + ["--resolve-now"])
    assert now.exit_code == 0, now.output
    (rule,) = [line for line in now.output.splitlines() if "-d 127.0.0.1" in line]
    assert "--dports 8080" in rule and 'comment "localhost resolved 20' in rule
    later = CliRunner().invoke(main, args)
    assert "-d 127.0.0.1" not in later.output and "--match-set" in later.output
