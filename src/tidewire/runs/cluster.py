"""Runs across processes: leases, watchers' positions, and cancels from elsewhere.

Every process has an `instance` name. A run's shared record (`record_key`)
says which instance owns it; the owner holds a lease (`lease_key`) that it
renews every tick (`lease / 3` seconds). Watchers in other processes report
how far they are (`positions_key`, one field per process), which is what
backpressure needs; and a watcher that finds the lease expired takes it and
ends the run with an `error`, so that nobody waits forever for a process
that died.

A cancel from another process is written into the run's record and sent on
the owner's control topic, again and again until the run's log ends: the
message is quick, the record makes it reliable (a message sent while the
owner is not subscribed, its listener starting or reconnecting, is lost;
the owner reads the record on every tick).

With the memory broker all of this stays in this one process and costs a
few dictionary lookups. How runs are named in the broker is spelled here
only: see the `*_key`/`*_topic` functions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time
from typing import TYPE_CHECKING, Protocol

from .. import metrics, wire
from ..broker import Broker, BrokerUnavailable, Retention
from ..config import Settings
from ..events import dump_data

if TYPE_CHECKING:
    from collections.abc import Iterable

    from .local import Run

__all__ = ["CancelNotConfirmed", "Cluster", "Host"]

logger = logging.getLogger("tidewire")

_RUN_ID = re.compile(r"[0-9a-f]{16}\Z")

#: How often (seconds) a cancel from elsewhere is sent again while its run goes on.
CANCEL_RESEND = 0.5


def log_name(run_id: str) -> str:
    """The run's log: its events."""
    return f"run:{run_id}"


def record_key(run_id: str) -> str:
    """The run's shared record: owner, state, events, and a cancel request."""
    return f"run:{run_id}"


def positions_key(run_id: str) -> str:
    """Where the watchers of each other process are: `<seq> <until>` per instance."""
    return f"runpos:{run_id}"


def lease_key(run_id: str) -> str:
    """Held by the process that runs the generator while it is alive."""
    return f"runlease:{run_id}"


def control_topic(instance: str) -> str:
    """Where other processes ask an instance to do something to its runs."""
    return f"control:{instance}"


class CancelNotConfirmed(BrokerUnavailable):
    """A cancel sent to another process was not confirmed in time: the run may go on.

    A `BrokerUnavailable`, so that a request that asked for it gets 503 with
    Retry-After: the caller may try again.
    """


class Host(Protocol):
    """What the cluster needs of the runs executed in this process (`local.Runs`)."""

    def here(self, run_id: str) -> Run | None: ...
    def runs_here(self) -> Iterable[Run]: ...
    def cancel_here(self, run: Run) -> bool: ...
    async def cancel_if_unwatched(self, run: Run) -> None: ...


class Cluster:
    """This process among the others that share its broker, as far as runs go."""

    def __init__(self, broker: Broker, settings: Settings, host: Host) -> None:
        self.broker = broker
        self.settings = settings
        self.host = host
        self.retention = Retention(settings.run_history, max_bytes=settings.run_history_bytes)
        self.instance = secrets.token_hex(6)
        #: Positions are reported when a watcher has moved this far since the last report.
        self.report_step = max(1, settings.run_window // 4)
        self.views: dict[str, Run] = {}  # runs elsewhere with watchers here
        self._reporting: set[str] = set()
        self._background: list[asyncio.Task[None]] = []

    @property
    def tick(self) -> float:
        """Seconds between lease renewals (and position reports, and cancel checks)."""
        return self.settings.lease / 3

    # -- a run started here ------------------------------------------------

    async def register(self, run: Run) -> None:
        """Take the lease of a run starting here and publish its record."""
        self.start_background()
        # Lease and record first: a watcher elsewhere may look it up at once.
        await self.broker.claim(lease_key(run.id), self.instance, self.settings.lease)
        await self.broker.put_state(record_key(run.id), run.record())

    async def reclaim(self, run: Run) -> bool:
        """Take back the lease of a run here after the broker was unreachable (it
        may have expired meanwhile); False if another process has taken it over."""
        if run.lost:
            return False
        return await self.broker.claim(lease_key(run.id), self.instance, self.settings.lease)

    async def publish_end(self, run: Run) -> None:
        """The final record of a run that ended; written before its log's end, so
        that whoever sees the end (a cancel waiting elsewhere) reads the final state."""
        await self.broker.put_state(record_key(run.id), run.record(), self.settings.run_ttl)

    async def forget(self, run_id: str) -> None:
        await self.broker.delete_state(record_key(run_id))
        await self.broker.delete_state(positions_key(run_id))

    async def read_remote_positions(self, run: Run) -> None:
        """Where the slowest watcher in another process is (`run.remote_low`)."""
        positions = await self.broker.get_state(positions_key(run.id))
        now = time.time()
        low = None
        for instance, value in positions.items():
            seq, _, until = value.partition(" ")
            if instance != self.instance and float(until) > now:
                low = int(seq) if low is None else min(low, int(seq))
        run.remote_low = low
        run.remote_checked = time.monotonic()
        run.remote_checked_at = run.events

    # -- a run elsewhere ---------------------------------------------------

    async def record(self, run_id: str) -> dict[str, str] | None:
        """A run's shared record; None for an id that names no run."""
        if not _RUN_ID.match(run_id):
            return None
        return await self.broker.get_state(record_key(run_id)) or None

    def start_watching(self, run: Run) -> None:
        """A watcher here started reading a run elsewhere: report its position
        now, and every tick for as long as it watches, even reading nothing."""
        self.start_background()
        self.views[run.id] = run
        run.reported = -1
        self.report_positions_soon(run)

    def report_positions_soon(self, run: Run) -> None:
        """Report where this process's watchers of a run elsewhere are, in the background."""
        if run.id not in self._reporting:
            self._reporting.add(run.id)
            asyncio.get_running_loop().create_task(self._report_positions(run))

    async def _report_positions(self, run: Run) -> None:
        try:
            key = positions_key(run.id)
            if run.cursors and run.state == "running":
                low = min(run.cursors.values())
                # A held place is kept as long as the grace period; a live one
                # until the next ticks have renewed it, with margin for a loop
                # that runs late (at least 2 s).
                grace = self.settings.disconnect_grace
                keep = grace if run.held_place else max(3 * self.tick, 2.0)
                run.reported = low
                value = f"{low} {time.time() + keep!r}"
                await self.broker.put_state(key, {self.instance: value}, self.settings.run_ttl)
            else:
                await self.broker.delete_state(key, self.instance)
                if not run.cursors:
                    self.views.pop(run.id, None)
        except BrokerUnavailable:
            pass  # reported again at the next tick
        finally:
            self._reporting.discard(run.id)

    async def refresh(self, run: Run) -> bool:
        """Bring a run's state up to date from its shared record; False if it has none."""
        record = await self.broker.get_state(record_key(run.id))
        if record:
            run.update(record)
        return bool(record)

    async def check_owner_alive(self, run: Run) -> None:
        """Fail a run whose owner stopped renewing its lease: it died."""
        if await self.refresh(run):
            await self.fail_if_orphaned(run)

    async def fail_if_orphaned(self, run: Run) -> None:
        if run.state != "running":
            return
        # Whoever takes the expired lease reports the death, exactly once.
        if not await self.broker.claim(lease_key(run.id), self.instance, self.settings.lease):
            return
        logger.warning("run %s: its process %s stopped; failing it", run.id, run.owner)
        error = {
            "type": "WorkerLost",
            "message": f"the process running this run stopped (no sign of life "
            f"for {self.settings.lease:g}s)",
        }
        run.state, run.ended = "failed", time.time()
        await self.broker.append(run.log, [(wire.ERROR, dump_data(error))], self.retention)
        metrics.count_events("run")
        # The record before the end of the log, as in publish_end.
        await self.broker.put_state(
            record_key(run.id),
            {"state": run.state, "ended": repr(run.ended)},
            self.settings.run_ttl,
        )
        await self.broker.end(run.log)

    async def cancel_elsewhere(self, run: Run) -> None:
        """Have the owner cancel a run, and wait until its log ends.

        Raises `CancelNotConfirmed` if the run is still running when the owner
        had time to close the generator and to notice the request at its tick.
        """
        # The record first: a message may be lost, the record is not.
        await self.broker.put_state(record_key(run.id), {"cancel": "1"})
        position = "0"
        deadline = time.monotonic() + self.settings.close_timeout + self.settings.lease
        ended = False
        while not ended and (left := deadline - time.monotonic()) > 0:
            with contextlib.suppress(BrokerUnavailable):
                await self.broker.send(control_topic(run.owner), f"cancel {run.id}")
            # Read until the end, sending again now and then: the owner may
            # have subscribed since.
            resend = time.monotonic() + min(left, CANCEL_RESEND)
            while not ended and (wait := resend - time.monotonic()) > 0:
                batch = await self.broker.read(run.log, position, limit=1024, timeout=wait)
                if batch.events:
                    position = batch.events[-1].id
                ended = batch.ended
        await self.refresh(run)
        if run.state == "running":
            # No end: perhaps because the owner died, which a watcher would see.
            await self.fail_if_orphaned(run)
        if run.state == "running":
            raise CancelNotConfirmed(
                f"the process running run {run.id} did not confirm the cancel "
                f"within {self.settings.close_timeout + self.settings.lease:g}s"
            )

    # -- in the background ---------------------------------------------------

    def start_background(self) -> None:
        if not self._background:
            loop = asyncio.get_running_loop()
            self._background = [
                loop.create_task(self._renew_forever()),
                loop.create_task(self._listen_for_cancels()),
            ]

    async def _renew_forever(self) -> None:
        """Renew the leases of the runs here, and report where the watchers here are."""
        while True:
            await asyncio.sleep(self.tick)
            try:
                await self._renew()
            except BrokerUnavailable:
                logger.warning("broker unreachable: leases not renewed")
            except Exception:
                logger.exception("renewing leases failed")

    async def _renew(self) -> None:
        for run in list(self.host.runs_here()):
            if run.state != "running" or run.lost:
                continue
            if not await self.broker.claim(lease_key(run.id), self.instance, self.settings.lease):
                # Another process declared this one dead (it was cut off
                # for longer than the lease): the run is over for everyone.
                logger.error("run %s: lease lost to another process; stopping it", run.id)
                run.lost = True
                self.host.cancel_here(run)
                continue
            key = record_key(run.id)
            await self.broker.put_state(key, {"events": str(run.events)})
            if (await self.broker.get_state(key)).get("cancel"):
                # Asked from elsewhere, in a message this process may have missed.
                self.host.cancel_here(run)
                continue
            if run.attached and not run.cursors and run.held_place is None:
                # Watched only from elsewhere, if at all.
                await self.host.cancel_if_unwatched(run)
        for view in list(self.views.values()):
            await self._report_positions(view)

    async def _listen_for_cancels(self) -> None:
        """Cancel the runs here that other processes ask to (see `cancel_elsewhere`)."""
        delay = 0.1
        while True:
            try:
                async for message in self.broker.listen(control_topic(self.instance)):
                    delay = 0.1
                    verb, _, run_id = message.partition(" ")
                    run = self.host.here(run_id)
                    if verb == "cancel" and run is not None:
                        self.host.cancel_here(run)
            except BrokerUnavailable:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def aclose(self) -> None:
        """Stop the background tasks."""
        for task in self._background:
            task.cancel()
        self._background = []
