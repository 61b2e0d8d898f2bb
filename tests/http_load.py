"""A load client thin enough to measure the server, not itself: bare HTTP/1.1 on asyncio
streams over kept-alive connections (httpx's own overhead capped an earlier version at
160 posts/s). The receiver's storm test and benchmarks/alerts.py use it."""

from __future__ import annotations

import asyncio
import time


async def request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, method: str, path: str,
                  token: str, body: bytes = b"") -> int:
    """One request on a kept-alive connection; its status code."""
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: load\r\nAuthorization: Bearer {token}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    length = next(int(x.split(":", 1)[1]) for x in lines if x.lower().startswith("content-length"))
    await reader.readexactly(length)
    return int(lines[0].split()[1])


async def storm(port: int, path: str, bodies: list[bytes], n: int, token: str,
                connections: int = 100) -> tuple[list[float], list[float], list[int], float]:
    """`n` POSTs to `path`, cycling through `bodies`, at an even rate of n per second over
    `connections` connections, while /healthz is probed every 10 ms on a connection of its
    own: (post latencies, /healthz latencies, statuses, seconds)."""
    latencies: list[float] = []
    health: list[float] = []
    statuses: list[int] = []
    done = asyncio.Event()
    start = time.perf_counter() + 0.2

    async def probe() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while not done.is_set():
            t0 = time.perf_counter()
            ok = await request(reader, writer, "GET", "/healthz", token) == 200
            health.append(time.perf_counter() - t0 if ok else float("inf"))  # inf: it did not answer 200
            await asyncio.sleep(0.01)
        writer.close()

    async def sender(c: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for i in range(c, n, connections):
            await asyncio.sleep(max(0.0, start + i / n - time.perf_counter()))  # open loop: n per second
            t0 = time.perf_counter()
            statuses.append(await request(reader, writer, "POST", path, token, bodies[i % len(bodies)]))
            latencies.append(time.perf_counter() - t0)
        writer.close()

    prober = asyncio.create_task(probe())
    await asyncio.gather(*(sender(c) for c in range(connections)))
    elapsed = time.perf_counter() - start
    done.set()
    await prober
    return latencies, health, statuses, elapsed
