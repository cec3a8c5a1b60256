"""Runs `bench.load` processes from the harness and reads their JSON results."""

from __future__ import annotations

import json
import select
import subprocess
import time
from pathlib import Path
from typing import Any

from .servers import PY, ROOT, env


def run_json(
    module: str, mode: str, cfg: dict[str, Any], timeout: float, src: Path | None = None
) -> dict[str, Any]:
    """`python -m module mode cfg` to completion, its result the JSON of its last line.

    A crash or a hang becomes an `error` in the result. `src`: tidewire's source folder,
    if not the one under test (BASE_SRC).
    """
    argv = [PY, "-m", module, mode, json.dumps(cfg)]
    where = env(src) if src is not None else env()
    try:
        r = subprocess.run(argv, cwd=ROOT, env=where, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"{module} {mode} still running after {timeout:.0f}s: killed"}
    lines = r.stdout.decode().strip().splitlines()
    if r.returncode != 0 or not lines:
        return {"error": f"{module} {mode} exited {r.returncode}: {r.stderr.decode()[-800:]}"}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def run_load(mode: str, cfg: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One load process (bench.load) to completion."""
    return run_json("bench.load", mode, cfg, timeout)


class Watchers:
    """`conns` SSE watchers split over `procs` load processes, held open until `stop`."""

    def __init__(
        self,
        port: int,
        path: str,
        conns: int,
        procs: int,
        deadline_s: float,
        messages: int = 0,
        latency_dir: Path | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.latency_files: list[Path] = []
        for i in range(procs):
            share = conns // procs + (1 if i < conns % procs else 0)
            cfg: dict[str, Any] = {
                "port": port,
                "path": path,
                "conns": share,
                "deadline_s": deadline_s,
                "messages": messages,
                "headers": headers or {},  # sent by every watcher (W4 auth on: its token)
            }
            if latency_dir is not None:
                self.latency_files.append(latency_dir / f"latencies-{port}-{conns}-{i}.json")
                cfg["latency_file"] = str(self.latency_files[-1])
            argv = [PY, "-m", "bench.load", "watch", json.dumps(cfg)]
            self.procs.append(
                subprocess.Popen(
                    argv,
                    cwd=ROOT,
                    env=env(),
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                )
            )

    def _line(self, p: subprocess.Popen[bytes], deadline: float) -> dict[str, Any]:
        assert p.stdout is not None
        left = deadline - time.monotonic()
        if left > 0 and select.select([p.stdout], [], [], left)[0]:
            line = p.stdout.readline().decode()
            if line:
                out: dict[str, Any] = json.loads(line.removeprefix("ready "))
                return out
        p.kill()  # our own child, stuck: kill it by its pid
        err = p.stderr.read().decode()[-800:] if p.stderr else ""
        return {"error": f"watcher process gave no answer in time (rc={p.poll()}): {err}"}

    def ready(self, timeout: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        return [self._line(p, deadline) for p in self.procs]

    def stop(
        self, drain_s: float, timeout: float, sent_file: Path | None = None
    ) -> list[dict[str, Any]]:
        """Stop every watcher once deliveries end (`drain_s` at most); with the publisher's
        `sent_file`, each writes its latency histogram to its `latency_files` entry."""
        line = f"stop {drain_s}" + (f" {sent_file}" if sent_file else "") + "\n"
        for p in self.procs:
            assert p.stdin is not None
            try:
                p.stdin.write(line.encode())
                p.stdin.close()
            except BrokenPipeError:
                pass
        deadline = time.monotonic() + timeout
        out = [self._line(p, deadline) for p in self.procs]
        for p in self.procs:
            p.wait(5)
        return out
