"""`--profile`: py-spy samples the tidewire servers; a summary of where their time went."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

PY_SPY = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))


class Spy:
    """`py-spy record` on one pid until `stop`; raw (collapsed) stacks go to `out`."""

    def __init__(self, pid: int, out: Path) -> None:
        self.out = out
        # --nonblocking: never pauses the server, so the numbers measured meanwhile hold.
        argv = [
            PY_SPY,
            "record",
            "--pid",
            str(pid),
            "--format",
            "raw",
            "--output",
            str(out),
            "--rate",
            "200",
            "--nonblocking",
        ]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop(self) -> str:
        """Stop sampling (before the server stops) and write `<out>.top.txt`; return its path."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        if not self.out.exists():
            err = self.proc.stderr.read().decode()[-300:] if self.proc.stderr else ""
            return f"py-spy wrote nothing: {err}"
        top = self.out.with_suffix(".top.txt")
        top.write_text(summarize(self.out))
        return str(top)


def summarize(raw: Path, n: int = 25) -> str:
    """Top frames by self time and by inclusive time, as % of the samples."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        k = int(count)
        frames = stack.split(";")
        total += k
        own[frames[-1]] += k
        for f in set(frames):
            incl[f] += k
    out = [f"{total} samples from {raw.name}", "", "self time:"]
    out += [f"{100 * c / total:5.1f}%  {f}" for f, c in own.most_common(n)]
    # Coroutine stacks start at the task's coroutine, not at main(), so only inclusive time of
    # tidewire's own functions says much: how much of the work happens under each of them.
    ours = Counter({f: c for f, c in incl.items() if "tidewire/" in f})
    out += ["", "inclusive time, tidewire's functions:"]
    out += [f"{100 * c / total:5.1f}%  {f}" for f, c in ours.most_common(n)]
    return "\n".join(out) + "\n"
