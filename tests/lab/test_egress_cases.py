"""Real clients in the lab: a package download stays clean; mining, a bare address and a
fronted name are found.

pip (the venv's own) downloads a wheel from the lab's index over TLS; a Stratum
miner (ours: XMRig is not in Debian, see tests/lab/stratum.py) logs in to a pool
in cleartext on 3333 and inside TLS on 443; curl reaches a server by a bare
address, and names another server in its ClientHello than the one it resolved.
"""

import io
import os
import sys
import zipfile

from egress.records import FlowRecord
from egress.replay import replay
from egress.sources.capture import CaptureSource
from tagging import manifest
from tagging.attribution import Attribution, parse_networks
from tests.lab.lab import LINK_HOST, LINK_NET

PURPOSE = f'''version = 1
purpose = "Install Python dependencies from the lab's package index"
task = "lab-pip"

[[allow]]
cidr = "{LINK_NET}/32"
protocol = "dns"

[[allow]]
host = "pypi.lab"
'''
POOL = "pool.supportxmr.com"     # a known pool's name, served by the lab's own pool


def wheel(folder):
    """A minimal valid wheel of a package named labpkg, and its PEP 503 index."""
    body = io.BytesIO()
    with zipfile.ZipFile(body, "w") as z:
        z.writestr("labpkg/__init__.py", "")
        z.writestr("labpkg-1.0.dist-info/METADATA",
                   "Metadata-Version: 2.1\nName: labpkg\nVersion: 1.0\n")
        z.writestr("labpkg-1.0.dist-info/WHEEL",
                   "Wheel-Version: 1.0\nGenerator: lab\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("labpkg-1.0.dist-info/RECORD", "")
    (folder / "packages").mkdir(parents=True)
    (folder / "packages" / "labpkg-1.0-py3-none-any.whl").write_bytes(body.getvalue())
    (folder / "simple" / "labpkg").mkdir(parents=True)
    (folder / "simple" / "labpkg" / "index.html").write_text(
        '<a href="../../packages/labpkg-1.0-py3-none-any.whl">labpkg-1.0-py3-none-any.whl</a>')


def download_and_the_rest(lab):
    tmp_path = lab.dir
    wheel(tmp_path / "www")
    lab.start_dns({"pypi.lab": "203.0.113.10", "other.lab": "203.0.113.11",
                   POOL: "198.51.100.42"})
    index_ca = lab.start_https("pypi.lab", "203.0.113.10", root=tmp_path / "www")
    lab.start_https("mirror.lab", "203.0.113.20")          # reached by its address only
    lab.add_server_address("198.51.100.42")
    pool_key, pool_cert = lab._ca(POOL)
    pool = [sys.executable, "-m", "tests.lab.stratum", "pool", "198.51.100.42"]
    lab.spawn("net", *pool, "3333", log="pool-3333.log")
    lab.spawn("net", *pool, "443", "--tls", pool_cert, pool_key, log="pool-443.log")
    lab.wait_port("198.51.100.42", 3333)
    lab.wait_port("198.51.100.42", 443)
    miner = [sys.executable, "-m", "tests.lab.stratum", "miner", POOL]
    env = ["env", "PIP_CONFIG_FILE=/dev/null", f"PYTHONPATH={os.getcwd()}"]

    with lab.recording() as capture:
        got = lab.host(*env, sys.executable, "-m", "pip", "download", "--isolated",
                       "--disable-pip-version-check", "--no-deps", "--index-url",
                       "https://pypi.lab/simple/", "--cert", index_ca, "--trusted-host", "pypi.lab",
                       "-d", tmp_path / "got",
                       "labpkg", timeout=60)
        assert (tmp_path / "got" / "labpkg-1.0-py3-none-any.whl").exists(), got.stdout
        lab.host(*env, *miner, "3333")
        lab.host(*env, *miner, "443", "--tls", pool_cert)
        lab.host("curl", "-sk", "https://203.0.113.20/")
        lab.host("curl", "-sk", "--connect-to", "other.lab:443:pypi.lab:443",
                 "https://other.lab/")
    return capture


def test_package_download_clean_and_the_rest_found(recorded):
    capture = recorded("pip-stratum-directip-fronting", download_and_the_rest)
    out = []
    who = Attribution(task="lab-pip", local=parse_networks([f"{LINK_HOST}/32"]))
    replay(CaptureSource([str(capture)], who), manifest.parse(PURPOSE, "p.toml"),
           on_record=out.append)
    flows = [r for r in out if isinstance(r, FlowRecord) and r.dst[0] in "12"
             and not r.dst.startswith(("10.", "fe80", "ff02"))]

    def ids(f):
        return {x.id for x in f.findings if not x.waived}

    index = [f for f in flows if f.tls and f.tls.sni == "pypi.lab"]
    assert index and all(f.verdict.value == "allow" and not ids(f) for f in index)

    (stratum,) = [f for f in flows if f.dport == 3333]
    assert stratum.app == "stratum" and stratum.stratum.method == "login"
    assert stratum.stratum.agent.startswith("XMRig/")
    assert {"mining-stratum", "mining-pool", "undeclared-destination"} <= ids(stratum)

    (wrapped,) = [f for f in flows if f.dst == "198.51.100.42" and f.dport == 443]
    assert wrapped.app == "tls" and wrapped.tls.sni == POOL
    assert "mining-pool" in ids(wrapped)

    (bare,) = [f for f in flows if f.dst == "203.0.113.20"]
    assert {"undeclared-destination", "direct-ip"} <= ids(bare)

    (fronted,) = [f for f in flows if f.tls and f.tls.sni == "other.lab"]
    assert "sni-mismatch" in ids(fronted) and fronted.server_name == "pypi.lab"
