"""Purpose manifests: the TOML contract, strictly; errors name the file and the key."""

import pytest

from egress.records import FINDINGS, Mode, Severity
from tagging import manifest, profiles
from tagging.manifest import ManifestError

BASE = 'version = 1\npurpose = "Upgrade numpy and open a pull request"\n'


def parse(text: str):
    return manifest.parse(BASE + text, "task.toml")


def test_minimal_manifest_defaults():
    p = parse("")
    assert p.mode is Mode.AUDIT and p.task is None and p.rules == () and p.waive == frozenset()
    assert len(p.sha256) == 64


def test_full_manifest():
    p = parse('task = "fix-1234"\nmode = "enforce"\nprofiles = ["pypi", "github"]\n'
              'waive = ["direct-ip"]\n[[allow]]\nhost = "*.example.org"\nports = [443, "8000-8080"]\n'
              '[limits]\nbytes_out = 200_000_000\nconnections = 500\n')
    assert p.task == "fix-1234" and p.mode is Mode.ENFORCE
    assert p.rules[-1].origin == "allow[0]" and p.rules[-1].ports == ((443, 443), (8000, 8080))
    assert p.rules[0].origin.startswith("profile pypi")
    assert p.limits.bytes_out == 200_000_000 and p.limits.connections == 500


@pytest.mark.parametrize("text, key, problem", [
    ('', "version", "required"),
    ('version = 2\npurpose = "x"', "version", "version 1"),
    ('version = 1', "purpose", "required"),
    ('version = 1\npurpose = "  "', "purpose", "required"),
    ('version = 1\npurpose = "x"\ncolour = "red"', "colour", "unknown key"),
    ('version = 1\npurpose = "x"\nmode = "loose"', "mode", "not audit or enforce"),
    ('version = 1\npurpose = "x"\ntask = "has space"', "task", "not a task id"),
    ('version = 1\npurpose = "x"\nprofiles = ["nope"]', "profiles[0]", "no built-in profile"),
    ('version = 1\npurpose = "x"\nwaive = ["mining-pool"]', "waive[0]", "never be waived"),
    ('version = 1\npurpose = "x"\nwaive = ["undeclared-destination"]', "waive[0]", "never"),
    ('version = 1\npurpose = "x"\nwaive = ["no-such-id"]', "waive[0]", "not a finding id"),
    ('version = 1\npurpose = "x"\n[[allow]]\nhost = "a.example"\nport = 443', "allow[0].port",
     "unknown key"),
    ('version = 1\npurpose = "x"\n[[allow]]\nports = [443]', "allow[0].host", "exactly one"),
    ('version = 1\npurpose = "x"\n[[allow]]\nhost = "a"\ncidr = "10.0.0.0/8"', "allow[0].host",
     "exactly one"),
    ('version = 1\npurpose = "x"\n[[allow]]\nhost = "a.*.example"', "allow[0].host", "wildcard"),
    ('version = 1\npurpose = "x"\n[[allow]]\nhost = "a..example"', "allow[0].host", "not a valid"),
    ('version = 1\npurpose = "x"\n[[allow]]\ncidr = "10.0.0.1/8"', "allow[0].cidr", "host bits"),
    ('version = 1\npurpose = "x"\n[[allow]]\nhost = "a.example"\nports = [70000]',
     "allow[0].ports", "not a port"),
    ('version = 1\npurpose = "x"\n[[allow]]\nhost = "a.example"\nports = ["90-80"]',
     "allow[0].ports", "backwards"),
    ('version = 1\npurpose = "x"\n[[allow]]\nhost = "a.example"\nports = []',
     "allow[0].ports", "non-empty"),
    ('version = 1\npurpose = "x"\n[[allow]]\nhost = "a.example"\ntransport = "sctp"',
     "allow[0].transport", "not one of"),
    ('version = 1\npurpose = "x"\n[[allow]]\nhost = "a.example"\nprotocol = "gopher"',
     "allow[0].protocol", "not one of"),
    ('version = 1\npurpose = "x"\n[[allow]]\nhost = "a.example"\nprotocol = "quic"\n'
     'transport = "tcp"', "allow[0].transport", "udp"),
    ('version = 1\npurpose = "x"\n[[allow]]\nhost = "a.example"\nprotocol = "tls"\n'
     'transport = "icmp"', "allow[0].protocol", "icmp"),
    ('version = 1\npurpose = "x"\n[limits]\nbytes_out = -1', "limits.bytes_out", "positive"),
    ('version = 1\npurpose = "x"\n[limits]\npackets = 5', "limits.packets", "unknown key"),
])
def test_bad_manifest_names_file_key_problem(text, key, problem):
    with pytest.raises(ManifestError) as info:
        manifest.parse(text, "task.toml")
    message = str(info.value)
    assert message.startswith(f"task.toml: {key}: "), message
    assert problem in message
    assert "\n" not in message


def test_toml_syntax_error_is_one_line():
    with pytest.raises(ManifestError, match=r"^task.toml: not valid TOML: .*line 1"):
        manifest.parse("version = = 1", "task.toml")


def test_missing_file(tmp_path):
    with pytest.raises(ManifestError, match="cannot read"):
        manifest.load(tmp_path / "absent.toml")


@pytest.mark.parametrize("fid", sorted(FINDINGS))
def test_waivable_ids(fid):
    kind = FINDINGS[fid]
    forbidden = kind.severity is Severity.CRITICAL or fid in ("internal-error",
                                                              "undeclared-destination")
    if forbidden:
        with pytest.raises(ManifestError):
            parse(f'waive = ["{fid}"]')
    else:
        assert parse(f'waive = ["{fid}"]').waive == {fid}


@pytest.mark.parametrize("declared, requested, effective", [
    ("audit", None, "audit"), ("audit", "audit", "audit"), ("audit", "enforce", "enforce"),
    ("enforce", None, "enforce"), ("enforce", "enforce", "enforce"), ("enforce", "audit", None),
])
def test_command_line_may_only_tighten(declared, requested, effective):
    p = parse(f'mode = "{declared}"')
    if effective is None:
        with pytest.raises(ManifestError, match="may not loosen"):
            p.effective_mode(requested)
    else:
        assert p.effective_mode(requested) is Mode(effective)


def test_stored_purpose_round_trips():
    p = parse('profiles = ["dns"]\nwaive = ["direct-ip"]\n[[allow]]\nhost = "*.example.org"\n'
              '[limits]\nconnections = 3')
    back = manifest.Purpose.from_json(p.to_json())
    assert back.rules == p.rules and back.waive == p.waive and back.limits == p.limits
    assert back.sha256 == p.sha256
    stored = p.to_json()
    stored["extra"] = 1
    with pytest.raises(ManifestError):
        manifest.Purpose.from_json(stored)


REQUIRED_PROFILES = ["dns", "pypi", "npm", "github", "gitlab", "huggingface", "debian",
                     "ubuntu", "crates", "golang", "docker", "anthropic", "openai"]


@pytest.mark.parametrize("name", REQUIRED_PROFILES)
def test_required_profiles_ship_with_a_source(name):
    p = profiles.load(name)
    assert p.rules, name
    assert p.source.strip() and "\n" not in p.source
    assert p.description.strip() and "\n" not in p.description


def test_every_shipped_profile_loads():
    assert set(REQUIRED_PROFILES) <= set(profiles.names())
    for name in profiles.names():
        profiles.load(name)


@pytest.mark.parametrize("host, problem", [
    ("a b.example", "not a host name label"),
    ("foo/bar", "not a host name label"),
    ("*.example.org:443", "not a host name label"),
    ("192.0.2.1", "is an address"),
    ("::1", "is an address"),
    ("xn--.example", "not a host name label"),
    ("xn--55555555.example", "IDNA"),
    ("-lead.example", "not a host name label"),
])
def test_host_names_are_checked(host, problem):
    with pytest.raises(ManifestError, match=problem):
        parse(f'[[allow]]\nhost = "{host}"')


@pytest.mark.parametrize("text, key", [
    ('profiles = ["dns", "dns"]', "profiles"),
    ('waive = ["direct-ip", "direct-ip"]', "waive"),
])
def test_duplicates_are_refused(text, key):
    with pytest.raises(ManifestError, match=f"^task.toml: {key}: .*twice"):
        parse(text)
