"""gather-cc fetches public addresses only: checked after DNS, on literal IPs and on every redirect."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket

import pytest
from aiohttp.abc import AbstractResolver

from protorkd.cli import main as cli_main
from protorkd.data.gather_addresses import AddressPolicy, PublicResolver, is_public, parse_endpoint
from protorkd.data.gather_cc import gather_cc
from protorkd.data.gather_fetch import fetch, make_session
from tests.support.gather_server import LOCAL, write_tsv

NOT_PUBLIC = [
    "127.0.0.1",
    "127.255.0.9",
    "10.1.2.3",
    "172.16.0.1",
    "192.168.1.1",
    "169.254.169.254",  # cloud metadata
    "100.64.0.1",  # carrier-grade NAT
    "0.0.0.0",
    "224.0.0.1",
    "240.0.0.1",
    "255.255.255.255",
    "::1",
    "::",
    "fe80::1",
    "fc00::1",
    "fd12:3456::1",
    "ff02::1",
    "::ffff:127.0.0.1",  # IPv4-mapped
    "::ffff:169.254.169.254",
    "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
    "2002:7f00:1::",  # 6to4 of 127.0.0.1
]
PUBLIC = ["8.8.8.8", "93.184.216.34", "2606:4700:4700::1111", "2a00:1450:4001:80b::200e"]


@pytest.mark.parametrize("address", NOT_PUBLIC)
def test_non_public_addresses_are_refused(address):
    assert not is_public(ipaddress.ip_address(address))
    assert not AddressPolicy().allows(address, 80)
    assert AddressPolicy(allow_private=True).allows(address, 80)


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_are_allowed(address):
    assert is_public(ipaddress.ip_address(address)) and AddressPolicy().allows(address, 443)


def test_an_allowed_endpoint_is_one_address_and_port():
    policy = AddressPolicy.from_flags(False, ["10.0.0.5:8080", "[fd00::1]:80", "192.168.0.2"])
    assert policy.allows("10.0.0.5", 8080) and not policy.allows("10.0.0.5", 8081)
    assert policy.allows("fd00::1", 80) and policy.allows("192.168.0.2", 1234)
    assert not policy.allows("127.0.0.1", 8080)
    assert parse_endpoint("::1") == (ipaddress.ip_address("::1"), None)


class FakeResolver(AbstractResolver):
    """Answers from a table instead of DNS: {hostname: [addresses]}."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table

    async def resolve(self, host, port=0, family=socket.AF_INET):
        return [
            {"hostname": host, "host": address, "port": port, "family": family, "proto": 0, "flags": 0}
            for address in self.table[host]
        ]

    async def close(self) -> None:
        pass


def _fetch(url: str, policy: AddressPolicy, resolver: AbstractResolver | None = None) -> str:
    async def go() -> str:
        async with make_session(concurrency=2, user_agent="test", policy=policy, resolver=resolver) as session:
            result = await fetch(session, url, timeout=60, max_bytes=1_000_000, retries=0, backoff=0, policy=policy)
            return result.reason

    return asyncio.run(go())


def test_a_hostname_resolving_to_a_private_address_is_blocked(image_server):
    image_server.prepare("/jpg/300x200")
    image_server.hits.clear()
    resolver = FakeResolver({"images.example.test": ["127.0.0.1"]})
    url = f"http://images.example.test:{image_server.port}/jpg/300x200"
    assert _fetch(url, AddressPolicy(), resolver) == "blocked_address"
    assert sum(image_server.hits.values()) == 0
    # the resolver's answer is the address connected to: allowing that endpoint reaches the server
    allowed = AddressPolicy.from_flags(False, [f"127.0.0.1:{image_server.port}"])
    assert _fetch(url, allowed, resolver) == "ok" and image_server.hits["/jpg/300x200"] == 1


def test_dns_answers_are_filtered_so_a_rebinding_name_connects_only_to_public_addresses():
    resolver = PublicResolver(AddressPolicy(), FakeResolver({"mixed.test": ["93.184.216.34", "127.0.0.1", "::1"]}))
    answers = asyncio.run(resolver.resolve("mixed.test", 80))
    assert [answer["host"] for answer in answers] == ["93.184.216.34"]


def test_a_literal_loopback_address_is_blocked_before_connecting():
    # port 9 (discard) is closed here: a connection attempt would be a connection_error, not blocked_address
    assert _fetch("http://127.0.0.1:9/x.jpg", AddressPolicy()) == "blocked_address"
    assert _fetch("http://[::1]:9/x.jpg", AddressPolicy()) == "blocked_address"
    assert _fetch("http://[::ffff:169.254.169.254]:9/latest/meta-data", AddressPolicy()) == "blocked_address"


def test_gather_cc_refuses_the_local_server_by_default(image_server, tmp_path):
    image_server.hits.clear()
    tsv = write_tsv(tmp_path / "cc.tsv", image_server, [("a photo", "/jpg/300x200"), ("another", "/jpg/301x200")])
    stats = gather_cc(tsv, tmp_path / "out", **{**LOCAL, "allow_private_hosts": False})
    assert stats["failures"] == {"blocked_address": 2} and stats["ok"] == 0
    assert sum(image_server.hits.values()) == 0


def test_a_redirect_from_an_allowed_host_to_another_private_port_is_blocked_and_counted(image_server, tmp_path):
    image_server.hits.clear()
    image_server.elsewhere.hits.clear()
    rows = [("direct", "/jpg/300x202"), ("redirected inside", "/elsewhere/jpg/300x203")]
    tsv = write_tsv(tmp_path / "cc.tsv", image_server, rows)
    image_server.elsewhere.prepare("/jpg/300x203")
    allowed = [f"127.0.0.1:{image_server.port}"]  # the first server only, as if it were a public host
    stats = gather_cc(tsv, tmp_path / "out", **{**LOCAL, "allow_private_hosts": allowed})
    assert stats["ok"] == 1 and stats["failures"] == {"blocked_address": 1}
    assert image_server.hits["/elsewhere/jpg/300x203"] == 1  # the redirect was served ...
    assert sum(image_server.elsewhere.hits.values()) == 0  # ... and its target never contacted
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["failures"] == {"blocked_address": 1}
    # with every private host allowed the same redirect is followed
    stats = gather_cc(tsv, tmp_path / "all", **LOCAL)
    assert stats["ok"] == 2 and image_server.elsewhere.hits["/jpg/300x203"] == 1


def test_cli_allows_one_private_endpoint(image_server, tmp_path):
    tsv = write_tsv(tmp_path / "cc.tsv", image_server, [("a photo", "/jpg/300x204")])
    endpoint = f"127.0.0.1:{image_server.port}"
    assert cli_main(["gather-cc", str(tsv), "--out", str(tmp_path / "out"), "--allow-private-host", endpoint]) == 0
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["ok"] == 1
    assert cli_main(["gather-cc", str(tsv), "--out", str(tmp_path / "no")]) == 1  # blocked: nothing gathered
