"""Membership: the target grammar, its errors, and DNS re-resolution with a grace window."""

from __future__ import annotations

import pytest

from transfer.replicas.client import connect
from transfer.replicas.membership import (
    DnsMembership,
    InvalidTarget,
    ReplicationError,
    StaticMembership,
    UnresolvableTarget,
    parse_target,
    resolve_host,
)


def test_target_grammar() -> None:
    assert parse_target("127.0.0.1:5000").kind == "single"
    t = parse_target(" a:1, b:2 ,c:3")
    assert t.kind == "static" and t.members == ("a:1", "b:2", "c:3")
    d = parse_target("dns:///kvstore-headless.ns.svc:50051")
    assert (d.kind, d.host, d.port) == ("dns", "kvstore-headless.ns.svc", 50051)
    assert parse_target("[::1]:5000,[::1]:5001").members == ("[::1]:5000", "[::1]:5001")


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("", "empty"),
        ("a:1,,b:2", "empty entry"),
        ("a:1,b:2,a:1", "more than once"),
        ("a:1,b", "HOST:PORT"),
        ("host", "HOST:PORT"),
        ("a:99999", "1..65535"),
        ("dns://name:1", "three slashes"),
        ("dns:///name", "HOST:PORT"),
    ],
)
def test_bad_targets_say_what_to_fix(target: str, message: str) -> None:
    with pytest.raises(InvalidTarget, match=message):
        parse_target(target)
    with pytest.raises(InvalidTarget):
        connect(target)  # the factory refuses it before connecting anywhere


def test_static_membership_rejects_empty_and_duplicates() -> None:
    with pytest.raises(InvalidTarget, match="empty"):
        StaticMembership([])
    with pytest.raises(InvalidTarget, match="more than once"):
        StaticMembership(["a:1", "a:1"])
    assert StaticMembership(["b:1", "a:1"]).view().members == ("a:1", "b:1")


def test_replication_above_member_count_is_refused() -> None:
    with pytest.raises(ReplicationError, match="above the member count 2"):
        connect("127.0.0.1:1,127.0.0.1:2", replication=3, verify=False)
    with pytest.raises(ReplicationError, match=">= 1"):
        connect("127.0.0.1:1,127.0.0.1:2", replication=0, verify=False)


def test_unresolvable_name() -> None:
    with pytest.raises(UnresolvableTarget, match="no-such-replica.invalid"):
        connect("dns:///no-such-replica.invalid:50051")


def test_localhost_resolves_to_loopback() -> None:
    assert resolve_host("localhost", 7000) == ["127.0.0.1:7000"]
    m = DnsMembership("localhost", 7000, background=False)
    assert m.view().members == ("127.0.0.1:7000",)


class _Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_reresolution_keeps_previous_set_for_the_grace_window() -> None:
    answers: list[list[str] | Exception] = [["10.0.0.2:1", "10.0.0.1:1"]]
    clock = _Clock()

    def resolver(host: str, port: int) -> list[str]:
        a = answers[-1]
        if isinstance(a, Exception):
            raise a
        return list(a)

    m = DnsMembership("svc", 1, resolver=resolver, clock=clock, grace_s=30, background=False)
    assert m.view().members == ("10.0.0.1:1", "10.0.0.2:1") and m.view().previous == ()
    assert not m.refresh()  # same set (other order): no change
    answers.append(["10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1"])
    assert m.refresh()
    v = m.view()
    assert v.members == ("10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1")
    assert v.previous == ("10.0.0.1:1", "10.0.0.2:1") and v.version == 1
    answers.append(OSError("SERVFAIL"))
    assert not m.refresh() and m.view().members == v.members  # a DNS failure keeps the last good set
    answers.append([])
    assert not m.refresh() and m.view().members == v.members  # so does an empty answer
    clock.t += 29
    assert m.view().previous == v.previous
    clock.t += 2
    assert m.view().previous == () and m.view().members == v.members


def test_first_resolution_failure_is_an_error() -> None:
    def fail(host: str, port: int) -> list[str]:
        raise OSError("Name or service not known")

    with pytest.raises(UnresolvableTarget, match="cannot resolve"):
        DnsMembership("svc", 1, resolver=fail, background=False)
    with pytest.raises(UnresolvableTarget, match="no address records"):
        DnsMembership("svc", 1, resolver=lambda h, p: [], background=False)


def test_one_server_under_two_spellings_is_refused() -> None:
    from transfer.replicas.client import make_membership
    from transfer.replicas.membership import check_distinct

    with pytest.raises(InvalidTarget, match=r"127\.0\.0\.1:5000 and localhost:5000 are the same server"):
        make_membership("127.0.0.1:5000,localhost:5000")
    with pytest.raises(InvalidTarget, match="same server"):
        connect("localhost:5001,127.0.0.1:5002,127.0.0.1:5001", verify=False)
    # other ports, or names that resolve elsewhere, are distinct; a name that does not resolve (yet)
    # is compared with nothing
    make_membership("127.0.0.1:5000,localhost:5001").close()
    table = {"a": {"10.0.0.1:1"}, "b": {"10.0.0.2:1"}, "c": {"10.0.0.2:1", "fd00::2:1"}}
    check_distinct(["a:1", "b:1", "nowhere:1"], lambda h, p: frozenset(table.get(h, ())))
    with pytest.raises(InvalidTarget, match="b:1 and c:1 are the same server.*10.0.0.2:1"):
        check_distinct(["a:1", "b:1", "c:1"], lambda h, p: frozenset(table.get(h, ())))
