"""The network-namespace lab: isolated pods with IPv4 and IPv6, and nothing left behind."""

from __future__ import annotations

import socket

import pytest

from flowmon_lab import network as labmod
from flowmon_lab.network import Lab, LabError, cleanup_prefix, lab_namespaces

pytestmark = pytest.mark.root


@pytest.mark.root
def test_pods_talk_over_ipv4_and_ipv6_and_cleanup_removes_everything() -> None:
    with Lab("fkl", ["x", "y"]) as lab:
        x, y = lab.pod("x"), lab.pod("y")
        assert lab_namespaces("fkl") == ["fkl-sw", "fkl-x", "fkl-y"]
        for family in (socket.AF_INET, socket.AF_INET6):
            with lab.socket(y, family) as srv:
                srv.bind((y.ip(family), 7000))
                srv.listen()
                with lab.socket(x, family) as cli:
                    cli.settimeout(5)
                    cli.connect((y.ip(family), 7000))
                    conn, (peer, *_) = srv.accept()
                    with conn:
                        assert peer == x.ip(family)
        assert "eth0" in lab.run(x, ["ip", "-o", "link"]).stdout
        # the host namespace is untouched: its sockets cannot reach the pods
        assert str(x.ipv4) not in labmod._run(["ip", "-o", "addr"]).stdout
    assert lab_namespaces("fkl") == []


@pytest.mark.root
def test_cleanup_on_failure_and_after_a_crash() -> None:
    with pytest.raises(RuntimeError, match="boom"), Lab("fkl", 1) as lab:
        proc = lab.popen(lab.pods[0], ["sleep", "60"])
        raise RuntimeError("boom")
    assert lab_namespaces("fkl") == [] and proc.poll() is not None
    # leftovers of a crashed run (no Lab object any more) go by prefix; idempotent
    labmod._run(["ip", "netns", "add", "fkl-p0"])
    cleanup_prefix("fkl")
    cleanup_prefix("fkl")
    assert lab_namespaces("fkl") == []


@pytest.mark.root
def test_prefixes_do_not_collide_and_errors_name_the_command() -> None:
    with Lab("fkl", 1) as one, Lab("fkm", 1) as two:
        assert one.pods[0].netns != two.pods[0].netns
        assert one.subnet4 != two.subnet4
        with pytest.raises(LabError, match="no-such-command"):
            one.run(one.pods[0], ["no-such-command"])
        one.sysctl(one.pods[0], "net.ipv4.tcp_syn_retries", 2)
        assert one.run(one.pods[0], ["sysctl", "-n", "net.ipv4.tcp_syn_retries"]).stdout.strip() == "2"
        assert two.run(two.pods[0], ["sysctl", "-n", "net.ipv4.tcp_syn_retries"]).stdout.strip() != "2"


def test_bad_prefix_is_refused() -> None:
    with pytest.raises(ValueError, match="prefix"):
        Lab("has space")
