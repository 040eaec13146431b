"""Leases on job rows (async tasks, batches, fine-tuning jobs): which server process runs a job now.

A runner claims a row by compare-and-set on (lease_owner, lease_until) and renews the lease while it works;
a row whose lease ran out, or whose owner is a process of this machine that no longer exists (a server
killed with -9 and started again), is free to claim. Owner tags are "<host>:<pid>:<nonce>", so a restarted
server that happens to get the dead one's pid still tells the two apart.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Row, Table, and_, select, update
from sqlalchemy.sql.elements import ColumnElement

from glmstack.store.db import Database


def owner_tag() -> str:
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{secrets.token_hex(4)}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def holder_is_gone(tag: str, me: str) -> bool:
    """Whether the process that holds a lease is known to be dead: it ran on this machine and its pid is
    gone (or is ours, under another tag: a previous server of this pid)."""
    host, _, rest = tag.partition(":")
    pid_text, _, _nonce = rest.partition(":")
    if host != socket.gethostname()[:40] or not pid_text.isdigit() or tag == me:
        return False
    pid = int(pid_text)
    return pid == os.getpid() or not _pid_alive(pid)


def claimable(lease_owner: str | None, lease_until: datetime | None, me: str, now: datetime) -> bool:
    if lease_owner is None or lease_until is None:
        return True
    until = lease_until if lease_until.tzinfo is not None else lease_until.replace(tzinfo=UTC)
    return until <= now or holder_is_gone(lease_owner, me)


def try_claim(conn: Connection, table: Table, row_id: str, seen_owner: str | None,
              seen_until: datetime | None, me: str, lease_s: float) -> bool:
    """Takes the lease if nobody changed it since it was read as (seen_owner, seen_until)."""
    owner_same = table.c.lease_owner.is_(None) if seen_owner is None else table.c.lease_owner == seen_owner
    until_same = table.c.lease_until.is_(None) if seen_until is None else table.c.lease_until == seen_until
    until = datetime.now(UTC) + timedelta(seconds=lease_s)
    result = conn.execute(update(table).where(and_(table.c.id == row_id, owner_same, until_same))
                          .values(lease_owner=me, lease_until=until))
    return result.rowcount == 1


def renew(conn: Connection, table: Table, row_id: str, me: str, lease_s: float) -> bool:
    """Extends our lease; False when it is no longer ours (another process took it over)."""
    until = datetime.now(UTC) + timedelta(seconds=lease_s)
    result = conn.execute(update(table).where(table.c.id == row_id, table.c.lease_owner == me)
                          .values(lease_until=until))
    return result.rowcount == 1


def release(conn: Connection, table: Table, row_id: str, me: str) -> None:
    conn.execute(update(table).where(table.c.id == row_id, table.c.lease_owner == me)
                 .values(lease_owner=None, lease_until=None))


def claim_first(db: Database, table: Table, active: ColumnElement[bool], order_by: Sequence[Any], me: str,
                lease_s: float, on_claim: Callable[[Connection, str], bool] | None = None) -> Row[Any] | None:
    """Leases to `me` the first row matching `active` (in `order_by` order) that nobody holds or whose holder
    is gone, and returns it as it is after `on_claim(conn, row_id)`, which runs in the claiming transaction
    (count an attempt, say) and may return False to pass the row over (it finished the row instead)."""
    now = datetime.now(UTC)
    with db.read() as conn:
        candidates = conn.execute(select(table.c.id, table.c.lease_owner, table.c.lease_until)
                                  .where(active).order_by(*order_by)).all()
    for row_id, owner, until in candidates:
        if not claimable(owner, until, me, now):
            continue
        with db.write() as conn:
            if not try_claim(conn, table, row_id, owner, until, me, lease_s):
                continue
            if on_claim is not None and not on_claim(conn, row_id):
                continue
            return conn.execute(select(table).where(table.c.id == row_id)).one()
    return None
