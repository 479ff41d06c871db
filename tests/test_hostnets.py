"""hostnets: every network namespace of this host and its own addresses (pure parts, then real netns)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from ipaddress import ip_address
from pathlib import Path

import pytest

from flowmon_agent.metadata import MetadataStore, hostnets
from flowmon_lab.network import Lab
from tests.waiting import wait_for


def test_parse_ip_addr_json() -> None:
    text = json.dumps(
        [
            {"ifname": "lo", "addr_info": [{"local": "127.0.0.1"}, {"local": "::1"}]},
            {"ifname": "eth0", "addr_info": [{"local": "192.0.2.2"}, {"family": "inet6"}]},
            {"ifname": "dummy0"},
        ]
    )
    assert hostnets.parse_ip_addr_json(text) == ["127.0.0.1", "::1", "192.0.2.2"]
    assert hostnets.parse_ip_addr_json("") == []


@pytest.mark.parametrize(
    ("addresses", "expected"),
    [
        (
            ["127.0.0.1", "::1", "10.1.0.2", "fe80::1%eth0", "fe80::2", "fd00::5", "169.254.0.3"],
            ["10.1.0.2", "fd00::5"],
        ),
        ([], []),
    ],
)
def test_own_addresses_drop_what_every_namespace_has(addresses, expected) -> None:
    assert hostnets.own_addresses(addresses) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("fm-a", "fm-a"), ("Web Server:1", "web-server-1"), ("---", "netns"), ("x" * 80, "x" * 63)],
)
def test_pod_name(text, expected) -> None:
    assert hostnets.pod_name(text) == expected


@pytest.mark.root
def test_every_namespace_once_named_or_held_by_a_process() -> None:
    """Named namespaces by name; a namespace only a process holds by `<command>-<pid>`; the caller's own
    and duplicates (a process inside a named one) left out; each with its own addresses."""
    with Lab("fhn", ["a", "b"]) as lab:
        a, b = lab.pod("a"), lab.pod("b")
        sleeper = lab.popen(a, [sys.executable, "-c", "import time; time.sleep(30)"])
        # A namespace no name points at: `unshare --net` and a process keeping it.
        hidden = subprocess.Popen(["unshare", "--net", "sleep", "30"])
        try:
            wait_for(lambda: Path(f"/proc/{hidden.pid}/comm").read_text().strip() == "sleep")  # in its netns
            found = dict(hostnets.network_namespaces())
            assert {a.netns, b.netns, lab.switch} <= set(found)
            assert found[f"sleep-{hidden.pid}"] == Path(f"/proc/{hidden.pid}/ns/net")
            assert not any(name.endswith(f"-{sleeper.pid}") for name in found)  # inside fhn-a: a duplicate
            addresses = hostnets.namespace_addresses()
            assert addresses[a.netns] == [str(a.ipv4), str(a.ipv6)]
            assert lab.switch not in addresses  # a bridge only: no address of its own
            assert f"sleep-{hidden.pid}" not in addresses  # only loopback inside
        finally:
            hidden.kill()
            hidden.wait()


@pytest.mark.root
def test_host_metadata_follows_namespaces_that_appear_and_go() -> None:
    from flowmon_agent.main import host_objects

    store = MetadataStore()
    host = hostnets.HostMetadata(store, lambda netns: host_objects("box", ["192.0.2.1"], netns))
    with Lab("fhm", ["a"]) as first:
        host.refresh()
        a = first.pod("a")
        assert store.pod_by_ip(ip_address(str(a.ipv4))).name == a.netns
        assert store.pod_by_ip(ip_address("192.0.2.1")).name == "box"
        with Lab("fhn", ["c"]) as late:
            c = late.pod("c")
            assert store.pod_by_ip(ip_address(str(c.ipv4))) is None
            assert host.refresh()  # a namespace appeared
            assert store.pod_by_ip(ip_address(str(c.ipv6))).name == c.netns
        assert host.refresh()  # ... and went
        assert {p.name for p in store.pods()} >= {"box", a.netns}
        assert c.netns not in {p.name for p in store.pods()}


@pytest.mark.root
def test_namespace_inodes_see_one_only_a_process_holds() -> None:
    before = hostnets.namespace_inodes()
    held = subprocess.Popen(["unshare", "--net", "sleep", "30"])
    try:
        link = f"/proc/{held.pid}/ns/net"

        def new_inode() -> int | None:  # once unshare ran
            inode = os.stat(link).st_ino
            return None if inode in before else inode

        inode = wait_for(new_inode)
        assert inode in hostnets.namespace_inodes()
    finally:
        held.kill()
        held.wait()
    assert inode not in hostnets.namespace_inodes()
