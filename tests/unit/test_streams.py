"""kvstore.streams: the per-tenant and per-connection stream limits and the stream clock, and the
config fields behind them (server.max_streams_per_*, server.stream_*timeout_s, server.ack)."""

from __future__ import annotations

import asyncio

import pytest

from kvstore.config import ServerConfig, StoreConfig
from kvstore.errors import StreamLimitExceeded
from kvstore.streams import StreamClock, StreamLimiter


def test_limiter_refuses_past_each_limit_naming_the_field_and_frees_slots() -> None:
    limiter = StreamLimiter(ServerConfig(max_streams_per_tenant=2, max_streams_per_peer=3))
    with limiter.open("Put", "a", "p1"), limiter.open("Get", "a", "p2"):
        with (
            pytest.raises(StreamLimitExceeded, match=r"tenant 'a' .*\(server\.max_streams_per_tenant = 2\)"),
            limiter.open("Put", "a", "p3"),
        ):
            pass
        with limiter.open("Put", "b", "p1"), limiter.open("Put", None, "p1"):  # auth off: no tenant limit
            with (
                pytest.raises(
                    StreamLimitExceeded, match=r"connection \(p1\) .*server\.max_streams_per_peer = 3"
                ),
                limiter.open("Put", "c", "p1"),
            ):
                pass
            assert limiter.open_streams() == 4
    assert limiter.open_streams() == 0 and not limiter.tenants and not limiter.peers
    with limiter.open("Put", "a", "p1"):  # slots came back, also after a refusal
        assert limiter.tenants["a"] == 1


def test_clock_cancels_an_idle_wait_and_names_the_idle_field() -> None:
    async def run() -> str:
        clock = StreamClock("Put", ServerConfig(stream_idle_timeout_s=0.2))
        try:
            async with clock.watch():
                for _ in range(3):  # activity keeps it alive past one idle period
                    await asyncio.sleep(0.1)
                    clock.touch()
                await asyncio.sleep(5)
        except TimeoutError:
            return str(clock.expired("not sending"))
        return "no timeout"

    message = asyncio.run(run())
    assert "server.stream_idle_timeout_s (0.2 s)" in message and "not sending" in message


def test_clock_does_not_count_server_work_and_reports_the_total_limit() -> None:
    async def run() -> tuple[bool, str]:
        clock = StreamClock("Get", ServerConfig(stream_idle_timeout_s=0.1, stream_timeout_s=0.5))
        fired: list[bool] = []
        async with clock.watch(on_expiry=lambda: fired.append(True)):
            clock.busy = True
            await asyncio.sleep(0.3)  # a slow tier: not the client's time
            clock.busy = False
            clock.touch()
            idle_fired = bool(fired)
            await asyncio.sleep(0.4)  # past the total limit
        return idle_fired, str(clock.expired("not reading"))

    idle_fired, message = asyncio.run(run())
    assert not idle_fired
    assert "server.stream_timeout_s (0.5 s)" in message


@pytest.mark.parametrize(
    "field,value",
    [
        ("max_streams_per_tenant", 0),
        ("max_streams_per_peer", -1),
        ("stream_idle_timeout_s", 0.0),
        ("stream_timeout_s", -5.0),
        ("ack", "sometimes"),
    ],
)
def test_invalid_stream_and_ack_settings_name_their_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"server.{field}"):
        StoreConfig().replace(server={field: value})
