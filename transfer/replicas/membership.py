"""Who is in the cluster: a static member list, or the DNS records of a headless Service.

A target string names the store (the one grammar every entrypoint accepts):

* ``host:port`` — one server (a plain :class:`transfer.rpc.client.KVClient`);
* ``host1:port,host2:port,...`` — a static member list;
* ``dns:///name:port`` — every address ``name`` resolves to (a Kubernetes
  headless Service lists its *ready* pods, so readiness decides who is in),
  re-resolved every ``refresh_s`` on a background thread.

What a :class:`Membership` promises:

* :meth:`Membership.view` is cheap and never blocks on DNS; it returns an
  immutable :class:`View` (members sorted, so two clients with the same set
  agree on placement whatever order their records came in).
* After a change the view keeps the **previous** member set for ``grace_s``:
  a miss at a new owner also tries the previous owners, so data placed before
  the change stays reachable while new writes fill the new owners.
* A failed or empty re-resolution keeps the last good set (a DNS hiccup must
  not empty the cluster); only the first resolution may fail, with
  :class:`UnresolvableTarget`.

Bad input raises a :class:`MembershipError` subclass whose message says what to fix.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from transfer.errors import TransferError

log = logging.getLogger(__name__)

DNS_SCHEME = "dns:///"
DEFAULT_REFRESH_S = 5.0
DEFAULT_GRACE_S = 30.0

#: ``(host, port) -> ["ip:port", ...]``; pluggable so re-resolution can be unit-tested.
Resolver = Callable[[str, int], list[str]]


class MembershipError(TransferError, ValueError):
    """The target or the member set is unusable as given; the message says what to fix."""


class InvalidTarget(MembershipError):
    """The target string does not follow the grammar, or lists no member, or one server twice
    (the same entry, or two spellings that resolve to one address)."""


class UnresolvableTarget(MembershipError):
    """A ``dns:///`` name resolved to no address."""


class ReplicationError(MembershipError):
    """The replication factor is outside ``1..member count``."""


class NotAKVStore(MembershipError):
    """An endpoint answered, but not as a kvstore server (an HTTP port, another gRPC service...)."""


@dataclass(frozen=True)
class View:
    """One consistent snapshot of the member set."""

    members: tuple[str, ...]
    #: The set before the last change while its grace window lasts, else ``()``.
    previous: tuple[str, ...] = ()
    version: int = 0

    @property
    def everyone(self) -> tuple[str, ...]:
        """Current and previous members, each once (who may hold data right now)."""
        return self.members + tuple(m for m in self.previous if m not in self.members)


@dataclass(frozen=True)
class Target:
    """A parsed target string: ``kind`` is ``"single"``, ``"static"`` or ``"dns"``."""

    kind: str
    members: tuple[str, ...] = ()
    host: str = ""
    port: int = 0


def _split_host_port(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidTarget(f"{what} {text!r} must be HOST:PORT with a port in 1..65535")
    if host.startswith("[") != host.endswith("]"):
        raise InvalidTarget(f"{what} {text!r}: an IPv6 address is written [ADDR]:PORT")
    return host, int(port)


def parse_target(target: str) -> Target:
    """Parse the target grammar (see the module docstring); raises :class:`InvalidTarget`."""
    text = (target or "").strip()
    if not text:
        raise InvalidTarget(
            "the store target is empty: give HOST:PORT, HOST:PORT,HOST:PORT,... or dns:///NAME:PORT"
        )
    if text.startswith("dns:"):
        if not text.startswith(DNS_SCHEME):
            raise InvalidTarget(f"target {text!r}: write a DNS target as dns:///NAME:PORT (three slashes)")
        host, port = _split_host_port(text[len(DNS_SCHEME) :], "DNS target")
        return Target("dns", host=host, port=port)
    if "," not in text:
        _split_host_port(text, "target")
        return Target("single", members=(text,))
    members = [m.strip() for m in text.split(",")]
    if any(not m for m in members):
        raise InvalidTarget(f"member list {text!r} has an empty entry (a stray comma?)")
    for m in members:
        _split_host_port(m, "member")
    seen: set[str] = set()
    dups = sorted({m for m in members if m in seen or seen.add(m)})  # type: ignore[func-returns-value]
    if dups:
        raise InvalidTarget(
            f"member list {text!r} names {', '.join(dups)} more than once; list each "
            "replica once (a duplicate would hold both copies of a key)"
        )
    return Target("static", members=tuple(members))


def resolve_host(host: str, port: int) -> list[str]:
    """Every address of ``host`` as ``ip:port``, IPv4 only when it has any.

    A dual-stack name lists every pod twice (A and AAAA); one family keeps one
    entry per pod, so no replica is counted twice.
    """
    infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    v4 = sorted({i[4][0] for i in infos if i[0] == socket.AF_INET})
    v6 = sorted({i[4][0] for i in infos if i[0] == socket.AF_INET6})
    return [f"{a}:{port}" for a in v4] if v4 else [f"[{a}]:{port}" for a in v6]


def _addresses(host: str, port: int) -> frozenset[str]:
    """Every address (both families) ``host`` resolves to, as ``ip:port``; empty when it does not
    resolve (a member whose DNS record is not there yet is compared with nothing)."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return frozenset()
    return frozenset(f"{i[4][0]}:{port}" for i in infos)


def check_distinct(
    members: Sequence[str], addresses: Callable[[str, int], frozenset[str]] = _addresses
) -> None:
    """Refuse two entries that name one server (``127.0.0.1:P`` and ``localhost:P``).

    The list is compared after resolving each host: two spellings of one
    replica would both be "owners" of some keys, so both copies of those keys
    would land on the same server and one crash would lose them. Raises
    :class:`InvalidTarget` naming both spellings and the address they share.
    """
    seen: dict[str, str] = {}
    for member in members:
        host, port = _split_host_port(member, "member")
        for address in sorted(addresses(host, port)):
            other = seen.setdefault(address, member)
            if other != member:
                raise InvalidTarget(
                    f"members {other} and {member} are the same server (both resolve to {address}); "
                    "list each replica once, under one name (both copies of a key would land on it)"
                )


class Membership:
    """Base: a member set that may change; subclasses call :meth:`_set` on a change."""

    def __init__(
        self,
        members: Sequence[str],
        *,
        grace_s: float = DEFAULT_GRACE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if grace_s < 0:
            raise ValueError(f"grace_s must be >= 0, got {grace_s}")
        self.grace_s = grace_s
        self._clock = clock
        self._lock = threading.Lock()
        self._members = tuple(sorted(members))
        self._previous: tuple[str, ...] = ()
        self._changed_at = float("-inf")
        self._version = 0

    @property
    def is_static(self) -> bool:
        return True

    def view(self) -> View:
        with self._lock:
            fresh = self._clock() - self._changed_at < self.grace_s
            return View(self._members, self._previous if fresh else (), self._version)

    def _set(self, members: Sequence[str]) -> bool:
        new = tuple(sorted(set(members)))
        with self._lock:
            if new == self._members:
                return False
            log.info("kvstore membership: %s -> %s", ",".join(self._members), ",".join(new))
            self._previous, self._members = self._members, new
            self._changed_at = self._clock()
            self._version += 1
            return True

    def close(self) -> None:
        """Stop background work (nothing for a static list)."""


class StaticMembership(Membership):
    """A fixed list given by the operator."""

    def __init__(self, members: Sequence[str], **kwargs: float) -> None:
        if not members:
            raise InvalidTarget("the member list is empty: name at least one HOST:PORT")
        if len(set(members)) != len(members):
            raise InvalidTarget(f"the member list {','.join(members)} names a member more than once")
        super().__init__(members, **kwargs)  # type: ignore[arg-type]


class DnsMembership(Membership):
    """The addresses of a DNS name (a headless Service), re-resolved every ``refresh_s``."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        refresh_s: float = DEFAULT_REFRESH_S,
        grace_s: float = DEFAULT_GRACE_S,
        resolver: Resolver = resolve_host,
        clock: Callable[[], float] = time.monotonic,
        background: bool = True,
    ) -> None:
        if refresh_s <= 0:
            raise ValueError(f"refresh_s must be > 0, got {refresh_s}")
        self.host, self.port, self.refresh_s = host, port, refresh_s
        self._resolver = resolver
        try:
            first = resolver(host, port)
        except (OSError, UnicodeError) as exc:
            raise UnresolvableTarget(
                f"dns:///{host}:{port}: cannot resolve {host!r} ({exc}); check the "
                "Service name and namespace (NAME.NAMESPACE.svc)"
            ) from None
        if not first:
            raise UnresolvableTarget(
                f"dns:///{host}:{port}: {host!r} has no address records; is the "
                "headless Service's selector matching ready pods?"
            )
        super().__init__(first, grace_s=grace_s, clock=clock)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self._loop, name=f"kvstore-dns-{host}", daemon=True)
            self._thread.start()

    @property
    def is_static(self) -> bool:
        return False

    def refresh(self) -> bool:
        """Resolve once; True when the member set changed. Failures keep the last good set."""
        try:
            found = self._resolver(self.host, self.port)
        except (OSError, UnicodeError) as exc:
            log.warning(
                "kvstore membership: re-resolving %s failed (%s); keeping %d members",
                self.host,
                exc,
                len(self._members),
            )
            return False
        if not found:
            log.warning(
                "kvstore membership: %s resolved to nothing; keeping %d members",
                self.host,
                len(self._members),
            )
            return False
        return self._set(found)

    def _loop(self) -> None:
        while not self._stop.wait(self.refresh_s):
            self.refresh()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
