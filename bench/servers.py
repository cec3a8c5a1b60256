"""Servers under test: each its own process on a free loopback port, started and stopped here."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
UVICORN_FLAGS = ["--loop", "uvloop", "--http", "httptools", "--workers", "1"]


@dataclass(frozen=True)
class Pinning:
    """Cores for the servers under test, and for everything else (this harness, the load
    generators and curl it starts, which inherit its affinity). Apart, a server's CPU per
    request is its own: what decides how many users one core serves."""

    server: tuple[int, ...]
    load: tuple[int, ...]

    def wrap(self, argv: list[str]) -> list[str]:
        # taskset (util-linux), not an affinity set after the start: the workers a server
        # forks at once must inherit it too.
        return ["taskset", "-c", ",".join(map(str, self.server)), *argv]


def pinning(spec: str | None = None) -> Pinning | None:
    """`BENCH_PIN`: `SERVER:LOAD` core lists (`0:1`, `0,1:2,3`), or `off`. Default: the
    first core for the servers and the rest for the load, on a machine with 2 or more."""
    spec = spec if spec is not None else os.environ.get("BENCH_PIN", "")
    usable = sorted(os.sched_getaffinity(0))
    if spec == "off" or (not spec and len(usable) < 2) or shutil.which("taskset") is None:
        return None
    if not spec:
        return Pinning((usable[0],), tuple(usable[1:]))
    server, _, load = spec.partition(":")

    def cores(text: str) -> tuple[int, ...]:
        return tuple(int(c) for c in text.split(",") if c.strip())

    return Pinning(cores(server), cores(load))


#: Set by `python -m bench` (run.py) before any server starts.
PIN: Pinning | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raise_nofile() -> int:
    """Lift the soft fd limit to the hard one; servers and clients inherit it (W4 needs 5,000+)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


#: tidewire's source folder for the servers: src/, or a patched copy to measure a change
#: before making it (`BENCH_TIDEWIRE_SRC=/tmp/copy/src python -m bench`).
TIDEWIRE_SRC = Path(os.environ.get("BENCH_TIDEWIRE_SRC") or ROOT / "src")
#: A second source folder (the code before a change, say): the workloads that support it
#: (W1, W3, W4, W5, W6, W7) add a "base" row for each tidewire row, run from it side by side,
#: so that a change and what it replaces are compared in one run (the machine's state drifts
#: between runs). `BENCH_TIDEWIRE_BASE_SRC=/tmp/before/src`, from e.g.
#: `git archive HEAD src | tar -x`.
BASE_SRC = Path(p) if (p := os.environ.get("BENCH_TIDEWIRE_BASE_SRC")) else None
#: The ASGI servers to run tidewire on where a workload runs it on several (W5, W6):
#: `BENCH_TIDEWIRE_ON=uvicorn` keeps a run with base rows short. Default: all of them.
#: W3 and W4 run `tidewire serve` (uvicorn) by default, and granian only when named here.
TIDEWIRE_ON = [k for k in os.environ.get("BENCH_TIDEWIRE_ON", "").split(",") if k]


def tidewire_on(kind: str, default: bool = True) -> bool:
    """Whether this run has tidewire rows on the ASGI server `kind`: BENCH_TIDEWIRE_ON's
    list if it is set, else `default` (W3/W4: uvicorn yes, granian no, so a plain run
    stays as it was)."""
    return kind in TIDEWIRE_ON if TIDEWIRE_ON else default


BASE = " (base)"

#: Rows to leave out (`BENCH_SKIP`, comma-separated parts of row names, e.g. `limits off,nchan`):
#: a shorter run when only some rows are being compared.
SKIP = [part.strip() for part in os.environ.get("BENCH_SKIP", "").split(",") if part.strip()]


def skipped(name: str) -> bool:
    return any(part in name for part in SKIP)


def python_path(src: Path | str) -> str:
    # `bench.apps.*` from the repo root; tidewire from `src` even if not pip-installed.
    path = os.pathsep.join([str(ROOT), str(src), os.environ.get("PYTHONPATH", "")])
    return path.rstrip(os.pathsep)


def from_base(server: Server) -> Server:
    """`server` (a `tidewire serve`) run from BASE_SRC instead of TIDEWIRE_SRC."""
    assert BASE_SRC is not None
    server.extra_env["PYTHONPATH"] = python_path(BASE_SRC)
    return server


def env(src: Path = TIDEWIRE_SRC) -> dict[str, str]:
    path = python_path(src)
    # An auth key in the harness's own environment would turn access control on in every
    # tidewire server, auth-off rows included: only `tidewire_auth` sets one.
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("TIDEWIRE_AUTH_")}
    return {
        **inherited,
        **ONE_ADDRESS_LIMITS,
        "PYTHONPATH": path,
        "PYTHONUNBUFFERED": "1",
    }


#: Every load generator here is one client at one address (127.0.0.1), standing in for
#: thousands: the per-client limits (DESIGN.md "Limits": 200 connections, 20 runs, 100
#: publishes/s a client) are raised so that W3's 10,000 subscribers and W4's 5,000 idle
#: connections are served, as they would be from as many addresses. Every other limit
#: stays at its default.
ONE_ADDRESS_LIMITS = {
    "TIDEWIRE_MAX_CONNECTIONS_PER_CLIENT": "100000",
    "TIDEWIRE_MAX_RUNS_PER_CLIENT": "100000",
    "TIDEWIRE_PUBLISH_RATE": "100000",
    "TIDEWIRE_PUBLISH_BURST": "100000",
}


#: Every limit of DESIGN.md "Limits" out of reach, for the "(limits off)" rows of W1 and W3:
#: beside a server at the defaults, it says what the limits cost. (min_body_rate 0: none.)
NO_LIMITS = {
    f"TIDEWIRE_{name}": value
    for name, value in {
        "MAX_EVENT_BYTES": str(1 << 40),
        "MAX_BODY_BYTES": str(1 << 40),
        "MAX_RETAINED_BYTES": str(1 << 50),
        "CHANNEL_MAX_BYTES": str(1 << 50),
        "RUN_HISTORY_BYTES": str(1 << 50),
        "MAX_CHANNELS": str(1 << 40),
        "SUBSCRIBER_BUFFER_BYTES": str(1 << 50),
        "STALL_TIMEOUT": str(1e9),
        "MAX_HEADER_BYTES": str(1 << 40),
        "HEADER_TIMEOUT": str(1e9),
        "MIN_BODY_RATE": "0",
        "MAX_SOCKETS_PER_ADDRESS": str(1 << 62),
        "MAX_OPEN_UPLOADS": str(1 << 40),
    }.items()
}


def unlimited(server: Server) -> Server:
    """`server` (a `tidewire serve`) with every limit out of reach (NO_LIMITS)."""
    server.extra_env.update(NO_LIMITS)
    return server


@dataclass
class Server:
    name: str
    argv: list[str]
    port: int
    workdir: Path
    cwd: Path = ROOT
    extra_env: dict[str, str] = field(default_factory=dict)
    src: Path = TIDEWIRE_SRC  # where its tidewire is imported from
    proc: subprocess.Popen[bytes] | None = None
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.workdir / f"{self.name.replace(' ', '_').replace('/', '_')}.log"

    def start(self, timeout: float = 30.0) -> Server:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                PIN.wrap(self.argv) if PIN is not None else self.argv,
                cwd=self.cwd,
                env={**env(self.src), **self.extra_env},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                rc = self.proc.returncode
                raise RuntimeError(f"{self.name} exited with {rc}:\n{self.tail()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        why = f"{self.name} did not listen on {self.port} in {timeout}s"
        raise RuntimeError(f"{why}:\n{self.tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # only our own child, by its pid
            self.proc.wait(5)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def processes(self) -> list[psutil.Process]:
        assert self.proc is not None
        p = psutil.Process(self.proc.pid)
        return [p, *p.children(recursive=True)]

    def cpu(self) -> float:
        """CPU seconds used so far by the server and its children (nginx's worker, say)."""
        total = 0.0
        for p in self.processes():
            t = p.cpu_times()
            total += t.user + t.system
        return total

    def cpu_user(self) -> float:
        """The user-mode part of `cpu()`: the server's own work, without the kernel's (whose
        page-cache writes cost what the VM's host makes them cost: see files.warm_pages)."""
        return sum(p.cpu_times().user for p in self.processes())

    def rss(self) -> int:
        return sum(p.memory_info().rss for p in self.processes())

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def uvicorn(name: str, app: str, workdir: Path) -> Server:
    port = free_port()
    where = ["--host", "127.0.0.1", "--port", str(port)]
    quiet = ["--no-access-log", "--log-level", "warning"]
    return Server(name, [PY, "-m", "uvicorn", app, *where, *UVICORN_FLAGS, *quiet], port, workdir)


def granian(name: str, app: str, workdir: Path, *extra: str) -> Server:
    """granian's ASGI interface, one worker, uvloop: it offers `http.response.pathsend`.
    `extra`: more granian flags."""
    port = free_port()
    where = ["--host", "127.0.0.1", "--port", str(port)]
    flags = ["--interface", "asgi", "--workers", "1", "--loop", "uvloop", *extra]
    quiet = ["--no-access-log", "--log-level", "warning"]
    argv = [str(Path(PY).with_name("granian")), *where, *flags, *quiet, app]
    return Server(name, argv, port, workdir)


def hypercorn(name: str, app: str, workdir: Path) -> Server:
    """hypercorn, one worker, uvloop."""
    port = free_port()
    flags = ["--bind", f"127.0.0.1:{port}", "--workers", "1", "--worker-class", "uvloop"]
    argv = [PY, "-m", "hypercorn", *flags, "--log-level", "warning", app]
    return Server(name, argv, port, workdir)


ASGI_SERVERS = {"uvicorn": uvicorn, "granian": granian, "hypercorn": hypercorn}


def tidewire(name: str, app: str | None, workdir: Path, *flags: str) -> Server:
    """`tidewire serve`; `flags` add e.g. `--workers 2 --broker redis://...`."""
    port = free_port()
    # `--log-level warning` matches the baselines' `--no-access-log --log-level warning`.
    serve = ["serve", *([app] if app else []), "--host", "127.0.0.1", "--port", str(port)]
    argv = [PY, "-m", "tidewire", *serve, "--log-level", "warning", *flags]
    return Server(name, argv, port, workdir)


def tidewire_granian(name: str, workdir: Path, nofile: int) -> Server:
    """What `tidewire serve` runs with its defaults, served by granian instead of uvicorn.

    The same app factory (`tidewire.cli:worker_app`: the GC tuning, the log redaction, and
    the app named in TIDEWIRE_APP, the demo stream and channels with `Settings.from_env()`),
    so that only the server differs. What uvicorn is given by `tidewire serve` and granian
    has flags for is matched: the backlog (4096) and the header timeout
    (`Settings.header_timeout`, 10 s). The per-process socket caps and the header size limit
    are uvicorn's protocol class (server/protocol.py), which granian does not run; nor the
    subscribers' write fast path it enables: under granian every event goes through ASGI
    `send`. `--backpressure`, the requests a granian worker serves at once (default: the
    backlog), is raised to the descriptor limit: each SSE subscriber is a request that
    never ends, and W3 holds 10,000 of them.
    """
    flags = ["--factory", "--backlog", "4096", "--backpressure", str(nofile)]
    flags += ["--http1-header-read-timeout", "10000"]
    server = granian(name, "tidewire.cli:worker_app", workdir, *flags)
    server.extra_env["TIDEWIRE_APP"] = "tidewire.demo:tw"
    return server


def tidewire_auth(name: str, app: str | None, workdir: Path, secret: str) -> Server:
    """`tidewire serve` with access control on: the HMAC secret in TIDEWIRE_AUTH_SECRET (the
    variable `--auth-secret` sets; not the flag, which would show in the process list)."""
    server = tidewire(name, app, workdir)
    server.extra_env["TIDEWIRE_AUTH_SECRET"] = secret
    return server


def mint_token(secret: str, *allow: str) -> str:
    """A token from `tidewire token` (the CLI users have), e.g. allow=("streams=*",)."""
    grants = [a for spec in allow for a in ("--allow", spec)]
    argv = [PY, "-m", "tidewire", "token", "--secret", secret, "--sub", "bench", *grants]
    r = subprocess.run(argv, cwd=ROOT, env=env(), capture_output=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError(f"`tidewire token` exited {r.returncode}: {r.stderr[-500:]!r}")
    return r.stdout.decode().strip()


def redis_available() -> str | None:
    if shutil.which("redis-server") is None:
        return "redis-server is not installed (apt-get install redis-server)"
    return None


def redis(workdir: Path) -> Server:
    """A redis-server of our own on a free port, in the foreground, nothing saved to disk."""
    port = free_port()
    d = workdir / f"redis-{port}"
    d.mkdir(exist_ok=True)
    flags = ["--bind", "127.0.0.1", "--port", str(port), "--dir", str(d), "--save", ""]
    argv = ["redis-server", *flags, "--appendonly", "no", "--daemonize", "no"]
    return Server("redis", argv, port, workdir)


def tidewire_available() -> str | None:
    """None if `python -m tidewire serve` can run here, else why not."""
    if not (ROOT / "src" / "tidewire" / "cli.py").exists():
        return "src/tidewire/cli.py does not exist yet"
    r = subprocess.run(
        [PY, "-m", "tidewire", "serve", "--help"],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        timeout=60,
    )
    if r.returncode != 0:
        return f"`python -m tidewire serve --help` exited {r.returncode}: {r.stderr[-500:]!r}"
    return None


NCHAN_MODULE = Path("/usr/lib/nginx/modules/ngx_nchan_module.so")


def nchan_available() -> str | None:
    if shutil.which("nginx") is None or not NCHAN_MODULE.exists():
        return "nginx + libnginx-mod-nchan are not installed (run bench/install)"
    return None


def nginx(name: str, workdir: Path, nofile: int, http: str, modules: str = "") -> Server:
    """nginx in the foreground (`daemon off`), one worker; `http` is the body of its `http`
    block, with `{port}` where it listens. Config and temp folders go under workdir/<name>."""
    port = free_port()
    body = http.replace("{port}", str(port))
    d = workdir / name.replace(" ", "_")
    d.mkdir(exist_ok=True)
    user = "user root;" if os.geteuid() == 0 else ""  # workers must read our temp dir
    conf = f"""
{modules}
daemon off;
{user}
worker_processes 1;
worker_rlimit_nofile {nofile};
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections {nofile - 100}; }}
http {{
  access_log off;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
{body}
}}
"""
    (d / "nginx.conf").write_text(conf)
    argv = ["nginx", "-e", f"{d}/error.log", "-p", str(d), "-c", f"{d}/nginx.conf"]
    return Server(name, argv, port, workdir)


def nchan(workdir: Path, nofile: int) -> Server:
    """nginx + Nchan, one worker."""
    http = """
  server {
    listen 127.0.0.1:{port} backlog=4096;
    location = /pub { nchan_publisher; nchan_channel_id $arg_id; }
    location = /sub { nchan_subscriber eventsource; nchan_channel_id $arg_id; }
  }"""
    return nginx("nchan", workdir, nofile, http, modules=f"load_module {NCHAN_MODULE};")
