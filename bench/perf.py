"""Where a file transfer's CPU goes, by library: `perf record` (cpu-clock) of the
tidewire server during W6's raw PUT, and of the client during W7's `Client.download`.

    .venv/bin/python -m bench.perf                  # 1 GiB, 3 rounds each, -> bench/perf.md
    .venv/bin/python -m bench.perf --size 256 --out /tmp/perf.md

Pinned as the other workloads are (server on the first core, curl and the client on
the rest). Before each upload, the upload's size of memory is touched and freed
(`files.warm_pages`), so the page cache gets pages the VM backs now. The samples of each
round are split by the shared object they fell in: the kernel (socket receive and
page-cache copies, which nginx pays too), libcrypto (the SHA-256 of every byte, which
DESIGN's `sha256` requires), the interpreter, libc (copies), uvloop, the rest; then turned
into CPU-seconds per GiB with the process's own CPU time over the transfer. This explains
W6's and W7's ratios to nginx and curl (docs/benchmarks.md); it measures no goal itself.
Needs `perf` (Debian's linux-perf) that can sample cpu-clock in this machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

from .files import warm_pages
from .servers import PY, ROOT, UVICORN_FLAGS, Server, env, free_port, pinning

GiB = 1 << 30
RECORD = ["perf", "record", "-q", "-e", "cpu-clock", "-F", "999"]
#: Shared objects, by what the samples in them are doing.
GROUPS = [
    ("kernel", ("[kernel",)),
    ("SHA-256 (libcrypto)", ("libcrypto",)),
    ("Python (interpreter)", ("libpython", "python3")),
    ("libc (copies)", ("libc.so", "libc-")),
    ("uvloop", ("loop.cpython",)),
]


def by_group(data: Path) -> dict[str, float]:
    """Shares of the samples in `data` (a perf.data), by GROUPS; 'other' for the rest."""
    out = subprocess.run(
        ["perf", "report", "-i", str(data), "--no-children", "--sort", "dso", "--stdio"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    shares: dict[str, float] = {name: 0.0 for name, _ in GROUPS} | {"other": 0.0}
    for line in out.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "%" not in line:
            continue
        pct, _, dso = line.partition("%")
        group = next((n for n, keys in GROUPS if any(k in dso for k in keys)), "other")
        shares[group] += float(pct) / 100
    return shares


def cpu(pid: int) -> tuple[float, float]:
    """(user, system) CPU-seconds of `pid` and its children so far."""
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    times = [p.cpu_times() for p in procs]
    return sum(t.user for t in times), sum(t.system for t in times)


@contextlib.contextmanager
def sampling(pid: int, data: Path) -> Iterator[None]:
    """perf samples `pid` into `data` while in this block (and until it exits, if sooner)."""
    perf = subprocess.Popen(
        [*RECORD, "-p", str(pid), "-o", str(data)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)  # perf attached
    try:
        yield
    finally:
        if perf.poll() is None:
            perf.send_signal(signal.SIGINT)  # perf writes its data on SIGINT
        perf.wait(30)


def recorded(pid: int, data: Path, action: list[str]) -> tuple[float, float, float]:
    """Run `action` while perf samples `pid`: (wall s, user CPU-s, system CPU-s) of `pid`."""
    with sampling(pid, data):
        u0, s0 = cpu(pid)
        t0 = time.perf_counter()
        subprocess.run(action, check=True, capture_output=True)
        wall = time.perf_counter() - t0
        u1, s1 = cpu(pid)
    return wall, u1 - u0, s1 - s0


def row(
    name: str, size: int, wall: float, user: float, system: float, data: Path
) -> dict[str, Any]:
    per = GiB / size
    return {
        "name": name,
        "mb_per_s": size / wall / 1e6,
        "cpu_s_per_gib": (user + system) * per,
        "user_s_per_gib": user * per,
        "groups": {k: v * (user + system) * per for k, v in by_group(data).items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.perf", description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=1024, help="MiB per transfer (default 1024)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "perf.md")
    args = ap.parse_args()
    if shutil.which("perf") is None or shutil.which("curl") is None:
        raise SystemExit("needs perf (Debian: linux-perf) and curl")
    size = args.size << 20
    pin = pinning()
    load = ["taskset", "-c", ",".join(map(str, pin.load))] if pin else []
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="tw-perf-") as tmp:
        work = Path(tmp)
        src = work / "src.bin"
        with src.open("wb") as f:
            for _ in range(size >> 20):
                f.write(os.urandom(1 << 20))
        port = free_port()
        argv = [PY, "-m", "uvicorn", "bench.apps.files:app", "--host", "127.0.0.1"]
        argv += ["--port", str(port), *UVICORN_FLAGS, "--no-access-log", "--log-level", "warning"]
        server = Server("tidewire (files)", argv, port, work)
        server.extra_env["TIDEWIRE_DATA_DIR"] = str(work / "data")
        if pin:
            server.argv = pin.wrap(server.argv)
        server.start()
        try:
            base = f"http://127.0.0.1:{port}"
            file_id = ""
            for i in range(args.rounds):
                os.sync()
                warm_pages(size)
                data = work / f"put{i}.data"
                put = [*load, "curl", "-sSf", "-T", str(src), "-o", str(work / "put.json")]
                wall, user, system = recorded(server.pid, data, [*put, f"{base}/files/r{i}.bin"])
                file_id = json.loads((work / "put.json").read_text())["id"]
                rows.append(row("PUT, the server", size, wall, user, system, data))
            for i in range(args.rounds):
                dest = work / "down.bin"
                os.sync()
                warm_pages(size)
                cfg = {"url": base, "id": file_id, "dest": str(dest), "ready": True}
                data = work / f"get{i}.data"
                client = subprocess.Popen(
                    [*load, PY, "-m", "bench.client", "download", json.dumps(cfg)],
                    cwd=ROOT,
                    env=env(),
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
                assert client.stdin is not None and client.stdout is not None
                client.stdout.readline()  # imported: what perf samples is the download
                with sampling(client.pid, data):
                    client.stdin.write("\n")
                    client.stdin.flush()
                    out, _ = client.communicate(timeout=600)
                res = json.loads(out.strip().splitlines()[-1])
                dest.unlink(missing_ok=True)
                # The client's own clock and CPU, from the request to the file's close.
                cpu_s = res["client_cpu"]
                rows.append(row("Client.download, the client", size, res["wall"], cpu_s, 0, data))
                rows[-1]["user_s_per_gib"] = None  # process_time: user and system together
                rows[-1]["user_s_per_gib"] = None  # process_time: user and system together
        finally:
            server.stop()
    write(args.out, rows, args.size)
    print(f"wrote {args.out}")


def write(out: Path, rows: list[dict[str, Any]], mib: int) -> None:
    names = [n for n, _ in GROUPS] + ["other"]
    when = time.strftime("%Y-%m-%d %H:%M:%S %z")
    lines = [
        "# Where a file transfer's CPU goes (`python -m bench.perf`)",
        "",
        f"Run {when}, {mib} MiB per transfer, load average at the end "
        f"{[round(x, 2) for x in os.getloadavg()]}. What it is: bench/perf.py's docstring. "
        "CPU-seconds per GiB moved, of the process named, split by where perf's samples fell.",
        "",
        "| transfer | MB/s | CPU-s/GiB | of it user | " + " | ".join(names) + " |",
        "|---|---|---|---|" + "---|" * len(names),
    ]
    for r in rows:
        user = "" if r["user_s_per_gib"] is None else f"{r['user_s_per_gib']:.2f}"
        groups = " | ".join(f"{r['groups'][n]:.2f}" for n in names)
        lines.append(
            f"| {r['name']} | {r['mb_per_s']:,.0f} | {r['cpu_s_per_gib']:.2f} | {user} | {groups} |"
        )
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
