"""Load generator: one process per call, asyncio on uvloop, raw sockets parsed by httptools.

`python -m bench.load MODE '<json config>'` prints one JSON line (its result) on stdout; the
`watch` mode prints a `ready` line first and then waits for `stop` on stdin. Every mode has a
hard deadline, so nothing here can hang the harness.

Why so low level: an HTTP client library costs more CPU per event than the servers under
test, so the client would be what gets measured. httptools (C) strips the HTTP framing and
hands over body bytes; W1/W2/W4 only count event delimiters in them (`bytes.count`, in C) and
fully parse just the first and last events to check the format.
"""

from __future__ import annotations

import array
import asyncio
import base64
import json
import resource
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any, cast

import httptools
import orjson
import psutil
import uvloop

HEAD = 256 * 1024  # bytes kept from the start of a body, to check its first event
TAIL = 64 * 1024  # and from its end, to check its last event


class Conn(asyncio.Protocol):
    """One HTTP/1.1 connection for one request at a time; body bytes go to `sink`."""

    def __init__(self, sink: Callable[[bytes], None] | None = None) -> None:
        self.sink = sink
        self.transport: asyncio.Transport | None = None
        self.status = 0
        self.headers: dict[str, str] = {}
        self._parser: Any = None
        self.headers_done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.body = bytearray()  # only filled when there is no sink (small responses)

    def request(self, req: bytes) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        self.headers_done, self.done = loop.create_future(), loop.create_future()
        self.status, self.headers, self.body = 0, {}, bytearray()
        self._parser = httptools.HttpResponseParser(self)
        assert self.transport is not None
        self.transport.write(req)
        return self.done

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's isn't a subclass

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(ConnectionError(f"bad HTTP from server: {e}"))
            self.close()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode().lower()] = value.decode()

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        if not self.headers_done.done():
            self.headers_done.set_result(self.status)

    def on_body(self, body: bytes) -> None:
        if self.sink is not None:
            self.sink(body)
        else:
            self.body += body

    def on_message_complete(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError(f"connection closed before the response ended ({exc})"))

    def _fail(self, exc: Exception) -> None:
        for fut in (self.headers_done, self.done):
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()  # mark retrieved: a watcher may never await it

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def get(path: str, port: int, accept: str, headers: dict[str, str] | None = None) -> bytes:
    """A GET; `headers` adds lines, e.g. `Authorization: Bearer <jwt>` for an auth-on server."""
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: {accept}\r\n"
        f"Cache-Control: no-cache\r\n{extra}\r\n"
    ).encode()


def post(path: str, port: int, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def connect(port: int, sink: Callable[[bytes], None] | None = None) -> Conn:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(lambda: Conn(sink), "127.0.0.1", port)
    return conn


class Count:
    """Counts events by a delimiter that may straddle two reads; keeps head and tail bytes."""

    def __init__(self, framing: str) -> None:
        # NDJSON: one line per event. SSE: one `data:` line per event (comments don't count).
        self.pattern, self.carry = (b"\n", b"") if framing == "ndjson" else (b"\ndata:", b"\n")
        self.framing = framing
        self.events = 0
        self.nbytes = 0
        self.head = bytearray()
        self.tail: deque[bytes] = deque()  # the last reads, at least TAIL bytes together
        self.tail_len = 0

    def feed(self, data: bytes) -> None:
        k = len(self.pattern) - 1
        if k:
            self.events += (self.carry + data[:k]).count(self.pattern)
            self.carry = (self.carry + data[-k:])[-k:]
        self.events += data.count(self.pattern)
        self.nbytes += len(data)
        if len(self.head) < HEAD:
            self.head += data[: HEAD - len(self.head)]
        # No copying per read here: at one small read per event, that was most of our CPU.
        self.tail.append(data)
        self.tail_len += len(data)
        while self.tail_len - len(self.tail[0]) >= TAIL:
            self.tail_len -= len(self.tail.popleft())

    def summary(self) -> dict[str, Any]:
        whole = self.nbytes <= len(self.head)
        first = parse_events(bytes(self.head), self.framing, drop_first=False)
        tail = bytes(self.head) if whole else b"".join(self.tail)
        last = parse_events(tail, self.framing, drop_first=not whole)
        return {
            "events": self.events,
            "bytes": self.nbytes,
            "first": describe(first[0]) if first else "no complete event",
            "last_event": last[-1][0] if last else None,
        }


def parse_events(buf: bytes, framing: str, drop_first: bool) -> list[tuple[str, Any]]:
    """(event type, data) of each complete event in `buf`; a partial first one is dropped."""
    text = buf.decode("utf-8", "replace").replace("\r\n", "\n")
    out: list[tuple[str, Any]] = []
    if framing == "ndjson":
        lines = text.split("\n")[:-1]  # the last piece has no newline yet
        for line in lines[1:] if drop_first else lines:
            if line.strip():
                obj = json.loads(line)
                if isinstance(obj, dict) and "event" in obj and "data" in obj:
                    out.append((obj["event"], obj["data"]))  # tidewire's envelope
                else:
                    out.append(("message", obj))  # the original's bare lines
        return out
    blocks = text.split("\n\n")[:-1]
    for block in blocks[1:] if drop_first else blocks:
        event, data = "message", []
        for line in block.split("\n"):
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                event = value
            elif field == "data":
                data.append(value)
        # A block whose data is empty is not an event: EventSource dispatches nothing for it
        # (tidewire's first block, `event: position` with an `id:`, only sets the last id).
        if data and "\n".join(data):
            out.append((event, json.loads("\n".join(data))))
    return out


def describe(ev: tuple[str, Any]) -> str:
    """A one-line check of an event: its type, text, and whether its image is a real PNG."""
    event, data = ev
    if not isinstance(data, dict):
        return f"{event}: unexpected data {str(data)[:80]!r}"
    parts = [f"{event}: text={data.get('text')!r}"]
    img = data.get("img")
    if isinstance(img, dict) and "$blob" in img:
        b = img["$blob"]
        raw = base64.b64decode(b.get("data", ""))
        ok = raw.startswith(b"\x89PNG") and len(raw) == b.get("size") and b.get("type")
        parts.append(f"img=$blob {b.get('type')} {len(raw)}B {'ok' if ok else 'BAD'}")
    elif isinstance(img, str):
        raw = base64.b64decode(img)
        ok = raw.startswith(b"\x89PNG")
        parts.append(f"img=base64 {len(raw)}B {'ok' if ok else 'BAD'}")
    elif img is not None:
        parts.append(f"img=unexpected {str(img)[:60]!r}")
    return ", ".join(parts)


class Deliveries:
    """W3 subscriber sink: which seqs arrived, and when, at a small cost per read.

    At 10,000 subscribers x 100 messages/s, parsing every delivery (~2 us each) would take
    more CPU than the machine has, and the client, not the server, would be measured. So a
    read costs the same whatever it holds: its complete `data:` lines are counted in C, and
    only the first and last are parsed. When those are the next seq expected and the one
    `count - 1` after it, the read is the run first..last in order (the server sends a
    channel's messages in order: nothing else fits), and (time, first, last) is recorded;
    latencies are worked out after the window from the publisher's send times. A read that
    does not fit (a gap, a repeat) is parsed line by line, as are reads with other events.
    """

    def __init__(self, messages: int, reads: array.array[float]) -> None:
        self.buf = b""
        self.seen = bytearray(messages)
        self.next = 0  # the seq expected next, when all so far came in order
        self.reads = reads  # (receive time, first seq, last seq) per read, flat
        self.received = 0
        self.duplicates = 0
        self.unparsed = 0
        self.other_events: dict[str, int] = {}
        self.last_time = 0.0

    def feed(self, data: bytes) -> None:
        now = time.time()  # one clock read per read(): events in one read arrived together
        buf = self.buf + data if self.buf else data
        end = buf.rfind(b"\n")
        if end < 0:
            self.buf = buf
            return
        self.buf = buf[end + 1 :]
        lines = buf[: end + 1]  # starts at a line start: the previous read ended at a "\n"
        n = starting(lines, b"data:")
        if starting(lines, b"event:") != starting(lines, b"event: message\n"):
            self._slow(lines, now)  # something besides messages: look at every line
            return
        if not n:
            return
        i = 0 if lines.startswith(b"data:") else lines.find(b"\ndata:") + 1
        first = self._seq(lines[i + 5 : lines.find(b"\n", i)])
        j = lines.rfind(b"\ndata:") + 1 if n > 1 else i
        last = self._seq(lines[j + 5 : lines.find(b"\n", j)]) if n > 1 else first
        seen = self.seen
        if first != self.next or last - first + 1 != n or not 0 <= first <= last < len(seen):
            self._slow(lines, now)
            return
        seen[first : last + 1] = b"\x01" * n
        self.next = last + 1
        self.received += n
        self.last_time = now
        self.reads.extend((now, first, last))

    @staticmethod
    def _seq(raw: bytes) -> int:
        try:
            seq = orjson.loads(raw)["seq"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return -1
        return seq if isinstance(seq, int) else -1

    def _slow(self, lines: bytes, now: float) -> None:
        for line in lines.split(b"\n"):
            if line.startswith(b"data:"):
                seq = self._seq(line[5:])
                if not 0 <= seq < len(self.seen):
                    self.unparsed += 1
                elif self.seen[seq]:
                    self.duplicates += 1
                else:
                    self.seen[seq] = 1
                    self.received += 1
                    self.last_time = now
                    self.next = seq + 1
                    self.reads.extend((now, seq, seq))
            elif line.startswith(b"event:"):
                ev = line[6:].strip().decode()
                if ev != "message":
                    self.other_events[ev] = self.other_events.get(ev, 0) + 1


def starting(lines: bytes, prefix: bytes) -> int:
    """How many of `lines` (which begin at a line start) start with `prefix`, counted in C."""
    return lines.count(b"\n" + prefix) + lines.startswith(prefix)


def latency_histogram(reads: array.array[float], sent: array.array[float]) -> dict[int, int]:
    """Deliveries by latency in 0.1 ms bins, from `Deliveries.reads` and each seq's send time.

    Done after the publishing window, so it costs the client nothing while it is measured.
    """
    hist: dict[int, int] = {}
    get = hist.get
    for k in range(0, len(reads), 3):
        now, first, last = reads[k], int(reads[k + 1]), int(reads[k + 2])
        for t in sent[first : last + 1]:
            b = max(0, int((now - t) * 10_000))
            hist[b] = get(b, 0) + 1
    return hist


def cpu_seconds() -> float:
    t = psutil.Process().cpu_times()
    return float(t.user + t.system)


# --- modes --------------------------------------------------------------------------------


async def mode_stream(cfg: dict[str, Any]) -> dict[str, Any]:
    """W1: one client reads one whole stream as fast as it can."""
    count = Count(cfg["framing"])
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    conn = await connect(cfg["port"], count.feed)
    try:
        await asyncio.wait_for(
            conn.request(get(cfg["path"], cfg["port"], cfg["accept"], cfg.get("headers"))),
            cfg["deadline_s"],
        )
        error = None if conn.status == 200 else f"HTTP {conn.status}"
    except (TimeoutError, ConnectionError) as e:
        error = f"{type(e).__name__}: {e}"
    wall = time.perf_counter() - t0
    cpu = cpu_seconds() - cpu0
    conn.close()
    return dict(
        wall=wall,
        client_cpu=cpu,
        status=conn.status,
        error=error,
        content_type=conn.headers.get("content-type"),
        **count.summary(),
    )


async def mode_paced(cfg: dict[str, Any]) -> dict[str, Any]:
    """W2: `conns` clients start their own run at once; wall time until the last one ends."""
    n, port = cfg["conns"], cfg["port"]
    counts = [Count(cfg["framing"]) for _ in range(n)]
    ends: list[float] = []
    errors: list[str] = []
    cpu0, t0 = cpu_seconds(), time.perf_counter()

    async def one(c: Count) -> None:
        conn = await connect(port, c.feed)
        try:
            await conn.request(get(cfg["path"], port, cfg["accept"]))
            ends.append(time.perf_counter() - t0)
            if conn.status != 200:
                errors.append(f"HTTP {conn.status}")
        finally:
            conn.close()

    tasks = [asyncio.ensure_future(one(c)) for c in counts]
    done, pending = await asyncio.wait(tasks, timeout=cfg["deadline_s"])
    for t in pending:
        t.cancel()
    errors += [f"{type(e).__name__}: {e}" for t in done if (e := t.exception())]
    wall = time.perf_counter() - t0
    cpu = cpu_seconds() - cpu0
    per = sorted(ends)
    events = sorted(c.events for c in counts)
    return dict(
        wall=max(per) if len(per) == n else wall,
        client_cpu=cpu,
        finished=len(per),
        timed_out=len(pending),
        errors=errors[:5],
        error_count=len(errors),
        p50_client=per[len(per) // 2] if per else None,
        events_min=events[0],
        events_max=events[-1],
        **{k: v for k, v in counts[0].summary().items() if k != "events"},
    )


async def mode_watch(cfg: dict[str, Any]) -> dict[str, Any]:
    """W3/W4: hold `conns` SSE watchers; report `ready`; on `stop`, drain and report.

    The stop line is `stop [drain seconds] [file of the publisher's send times]`; with the
    latter, W3's latency histogram goes to `latency_file` (JSON, 0.1 ms bin -> deliveries).
    """
    n, port, messages = cfg["conns"], cfg["port"], cfg.get("messages", 0)
    reads: array.array[float] = array.array("d")
    sinks = [Deliveries(messages, reads) for _ in range(n)] if messages else []
    conns: list[Conn] = []
    failures: list[str] = []
    gate = asyncio.Semaphore(cfg.get("parallel_connects", 100))
    deadline = time.monotonic() + cfg["deadline_s"]
    cpu0, t0 = cpu_seconds(), time.perf_counter()

    async def open_one(i: int) -> None:
        async with gate:
            sink = sinks[i].feed if sinks else (lambda _data: None)
            try:
                conn = await asyncio.wait_for(connect(port, sink), 10)
                conns.append(conn)
                conn.request(get(cfg["path"], port, "text/event-stream", cfg.get("headers")))
                status = await asyncio.wait_for(conn.headers_done, 10)
                if status != 200:
                    failures.append(f"HTTP {status}")
            except (TimeoutError, OSError) as e:
                failures.append(f"{type(e).__name__}: {e}")

    await asyncio.gather(*(open_one(i) for i in range(n)))
    connect_s = time.perf_counter() - t0
    ready = {
        "connected": n - len(failures),
        "failures": failures[:5],
        "connect_s": connect_s,
        "content_type": conns[0].headers.get("content-type") if conns else None,
    }
    print("ready " + json.dumps(ready), flush=True)
    # CPU from here on is what delivering messages costs, without the connect phase.
    cpu1, t1 = cpu_seconds(), time.perf_counter()

    # stdin as a stream, not a thread: a blocked readline() would keep the process alive.
    stdin = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    try:
        line = await asyncio.wait_for(stdin.readline(), max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        line = b"timeout"  # the harness never said stop: report what we have
    words = line.split()
    drain_s = float(words[1]) if len(words) > 1 else 0.0
    sent_file = words[2].decode() if len(words) > 2 else None  # the publisher's send times
    # After the publisher is done: wait for every watcher's last message, while deliveries
    # still progress (a slow server is late, not lossy), and `drain_s` at most.
    end, quiet, last = time.monotonic() + drain_s, time.monotonic() + 3.0, -1
    while sinks and time.monotonic() < min(end, quiet) and any(not s.seen[-1] for s in sinks):
        if (total := sum(s.received for s in sinks)) != last:
            quiet, last = time.monotonic() + 3.0, total
        await asyncio.sleep(0.05)
    cpu, window = cpu_seconds() - cpu1, time.perf_counter() - t1
    closed = sum(1 for c in conns if c.done.done())  # server ended the stream early
    for c in conns:
        c.close()
    if messages:
        sent: array.array[float] = array.array("d")
        if sent_file:
            with open(sent_file, "rb") as f:
                sent.frombytes(f.read())
        with open(cfg["latency_file"], "wb") as f:
            f.write(orjson.dumps(latency_histogram(reads, sent), option=orjson.OPT_NON_STR_KEYS))
    other: dict[str, int] = {}
    for s in sinks:
        for k, v in s.other_events.items():
            other[k] = other.get(k, 0) + v
    return dict(
        **ready,
        timed_out=line == b"timeout",
        connect_cpu=cpu1 - cpu0,
        client_cpu=cpu,
        window_s=window,
        closed_by_server=closed,
        received=sum(s.received for s in sinks),
        reads=len(reads) // 3,  # reads with messages in them: about the server's writes
        lost=sum(messages - sum(s.seen) for s in sinks),
        duplicates=sum(s.duplicates for s in sinks),
        unparsed=sum(s.unparsed for s in sinks),
        other_events=other,
        last_delivery=max((s.last_time for s in sinks), default=0.0),
    )


class Pipeline(asyncio.Protocol):
    """One keep-alive connection with HTTP/1.1 pipelining: requests go out when due, answers
    come back in order. The publisher never waits for an answer before sending the next."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.pending: deque[asyncio.Future[tuple[int, bytes]]] = deque()
        self.transport: asyncio.Transport | None = None
        self.body = bytearray()
        self.closed = False

    def send(self, req: bytes) -> asyncio.Future[tuple[int, bytes]]:
        fut: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        self.pending.append(fut)
        assert self.transport is not None
        self.transport.write(req)
        return fut

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()  # connection_lost() fails what is pending

    def on_message_begin(self) -> None:
        self.body = bytearray()

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        if self.pending:
            self.pending.popleft().set_result((self.parser.get_status_code(), bytes(self.body)))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True  # e.g. the server's keep-alive timeout on an idle connection
        while self.pending:
            self.pending.popleft().set_exception(ConnectionError(f"connection lost ({exc})"))


async def mode_publish(cfg: dict[str, Any]) -> dict[str, Any]:
    """W3: POST `messages` JSON bodies `{"seq", "ts"}` at `rate`/s, open loop.

    Each message goes out at its scheduled time whether or not earlier ones were answered, so
    a slow server shows up as latency and backlog, not as a publisher that politely slows down.
    It goes on an idle keep-alive connection, or a new one while fewer than `conns` are open,
    or else pipelined behind the least busy one. `conns=1` is one publisher connection.
    """
    port, rate, messages, most = cfg["port"], cfg["rate"], cfg["messages"], cfg["conns"]
    loop = asyncio.get_running_loop()
    pipes: list[Pipeline] = []
    opened = 0
    rtts: list[float] = []
    answers: list[asyncio.Future[tuple[int, bytes]]] = []

    def answered(sent: float) -> Callable[[asyncio.Future[tuple[int, bytes]]], None]:
        return lambda f: rtts.append((time.perf_counter() - sent) * 1000)

    async def pipe() -> Pipeline:
        pipes[:] = [p for p in pipes if not p.closed]
        idle = next((p for p in pipes if not p.pending), None)
        if idle is not None or len(pipes) >= most:
            return idle or min(pipes, key=lambda p: len(p.pending))
        nonlocal opened
        _, new = await loop.create_connection(Pipeline, "127.0.0.1", port)
        pipes.append(new)
        opened += 1
        return new

    cpu0 = cpu_seconds()
    t0 = time.perf_counter()
    first_ts = time.time()
    sent: array.array[float] = array.array("d")  # each message's `ts`, by seq
    for i in range(messages):
        delay = t0 + i / rate - time.perf_counter()  # an absolute schedule: no drift
        if delay > 0:
            await asyncio.sleep(delay)
        sent.append(time.time())
        body = orjson.dumps({"seq": i, "ts": sent[-1]})
        fut = (await pipe()).send(post(cfg["path"], port, body))
        fut.add_done_callback(answered(time.perf_counter()))
        answers.append(fut)
    scheduled = time.perf_counter() - t0
    if cfg.get("sent_file"):
        with open(cfg["sent_file"], "wb") as f:
            sent.tofile(f)
    done, pending = await asyncio.wait(answers, timeout=60)
    wall = time.perf_counter() - t0
    for p in pipes:
        if p.transport is not None:
            p.transport.close()
    results = [f.result() for f in done if not f.exception()]
    errors = [f"{type(e).__name__}: {e}" for f in done if (e := f.exception())]
    errors += [f"HTTP {st} {b[:200]!r}" for st, b in results if st not in (200, 201, 202)]
    rtts.sort()
    return dict(
        sent=sum(1 for st, _ in results if st in (200, 201, 202)),
        scheduled_s=scheduled,
        wall=wall,
        first_ts=first_ts,
        client_cpu=cpu_seconds() - cpu0,
        connections=opened,
        unanswered=len(pending),
        errors=errors[:5],
        error_count=len(errors) + len(pending),
        rtt_p50=rtts[len(rtts) // 2] if rtts else None,
        rtt_p99=rtts[int(len(rtts) * 0.99)] if rtts else None,
        first_response=results[0][1][:200].decode("utf-8", "replace") if results else "",
    )


MODES = {"stream": mode_stream, "paced": mode_paced, "watch": mode_watch, "publish": mode_publish}


def main() -> None:
    mode, cfg = sys.argv[1], json.loads(sys.argv[2])
    # Thousands of connections per process (W3, W4): lift the fd limit as far as allowed.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    out = uvloop.run(MODES[mode](cfg))
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
