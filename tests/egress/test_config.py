"""Host configuration: every key optional, unknown keys refused with file and key."""

import pytest

from egress import config
from egress.config import ConfigError


def test_defaults_when_no_file(monkeypatch, tmp_path):
    monkeypatch.setattr(config, "DEFAULT_PATH", tmp_path / "absent.toml")
    cfg = config.load()
    assert cfg.database is None and cfg.netfilter.queue == 3 and cfg.resolver.min_ttl == 3600


def test_explicit_missing_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        config.load(tmp_path / "absent.toml")


def test_full_config(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('database = "sqlite:///x.db"\nretention_days = 30\n'
                    '[pools]\nipv4 = "10.99.0.0/16"\nipv6 = "fd00:99::/48"\n'
                    '[resolver]\nupstream = ["192.0.2.53"]\nmin_ttl = 60\n'
                    '[netfilter]\nqueue = 9\nlog_group = 8\nmark_mask = 0xff00\npriority = -10\n')
    cfg = config.load(path)
    assert cfg.database == "sqlite:///x.db" and cfg.retention_days == 30
    assert cfg.pools.ipv4 == "10.99.0.0/16" and cfg.resolver.upstream == ("192.0.2.53",)
    assert cfg.netfilter.mark_mask == 0xFF00 and cfg.resolver.min_ttl == 60


@pytest.mark.parametrize("text, key", [
    ('colour = 1', "colour"),
    ('[pools]\nipv5 = "x"', "pools.ipv5"),
    ('[pools]\nipv4 = "fd00::/48"', "pools.ipv4"),
    ('[pools]\nipv4 = "10.0.0.1/8"', "pools.ipv4"),
    ('[resolver]\nupstream = ["resolver.example"]', "resolver.upstream[0]"),
    ('[resolver]\nmin_ttl = -1', "resolver.min_ttl"),
    ('[netfilter]\nqueue = 70000', "netfilter.queue"),
    ('[netfilter]\nmark_mask = 0', "netfilter.mark_mask"),
    ('retention_days = "forever"', "retention_days"),
    ('[ledger]\nkey_file = "/k"', "ledger.key_file"),
    ('[ledger]\ncheckpoint_interval = 0', "ledger.checkpoint_interval"),
    ('[ledger]\nhost_id = ""', "ledger.host_id"),
])
def test_bad_config_names_key(tmp_path, text, key):
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert str(info.value).startswith(f"{path}: {key}: ")
    assert "\n" not in str(info.value)


def test_the_ledger_section_fills_the_environment_the_store_reads_but_never_overrides(
        tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('[ledger]\nkey = "/srv/k"\nhost_id = "web-1"\ncheckpoint_interval = 60\n')
    ledger = config.load(path).ledger
    assert ledger.environment({}) == {"EGRESS_LEDGER_KEY": "/srv/k", "EGRESS_HOST_ID": "web-1",
                                      "EGRESS_CHECKPOINT_INTERVAL": "60"}
    assert ledger.environment({"EGRESS_HOST_ID": "mine"}) == {
        "EGRESS_LEDGER_KEY": "/srv/k", "EGRESS_CHECKPOINT_INTERVAL": "60"}
