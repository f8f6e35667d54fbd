"""reverse-ssh-tunnel from the owning process (live only): the forwarding option on an SSH
client's command line, parsed the way ssh(1) parses its options."""

import pytest

from egress.detectors import Context
from egress.detectors.reverse_ssh import ReverseSshTunnel, forwarding_flag
from egress.records import ProcessInfo, Step
from tests.factories import make_ssh_flow


@pytest.mark.parametrize("cmdline,flag", [
    ("ssh -N -R 9000:localhost:22 agent@relay", "-R 9000:localhost:22"),
    ("/usr/bin/ssh -NR9000:127.0.0.1:8080 relay", "-R 9000:127.0.0.1:8080"),
    ("ssh -i key -p 443 -R 0:localhost:22 relay", "-R 0:localhost:22"),
    ("ssh -o RemoteForward=9000 relay", "RemoteForward 9000"),
    ("ssh -oRemoteForward=9000 relay", "RemoteForward 9000"),
    ("autossh -M 0 -N -R 9000:localhost:22 relay", "autossh"),
    ("ssh -L 8080:localhost:80 relay", None),                 # local forwarding
    ("ssh relay ls -R /", None),                              # the remote command's option
    ("ssh -i -R relay", None),                                # -R is -i's argument
    ("ssh -- -R", None),
    ("rsync -R a b", None),                                   # not an ssh client
    ("", None),
])
def test_forwarding_flags(cmdline, flag):
    assert forwarding_flag(cmdline) == flag


def test_the_process_gives_a_finding_at_the_start_and_a_capture_none():
    detector = ReverseSshTunnel()
    flow = make_ssh_flow()
    ctx = Context(step=Step.START, purpose=None, names=())
    assert list(detector.inspect(flow, ctx)) == []            # a capture: no process
    flow.process = ProcessInfo(pid=42, ppid=1, uid=995, exe="/usr/bin/ssh",
                               cmdline="ssh -N -R 9000:localhost:22 relay")
    (found,) = detector.inspect(flow, ctx)
    assert found.evidence.source == "process"
    assert found.evidence.cmdline_flag == "-R 9000:localhost:22"
