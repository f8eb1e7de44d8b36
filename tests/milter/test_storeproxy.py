"""The store used from libmilter's thread-per-connection model holds a fixed number of connections."""

from __future__ import annotations

import threading
from pathlib import Path

from mailwarden.store import SQLiteStore
from milters.storeproxy import PooledStore


def open_fds(path: Path) -> int:
    count = 0
    for fd in Path("/proc/self/fd").iterdir():
        try:
            if str(fd.readlink()).startswith(str(path)):
                count += 1
        except OSError:
            continue
    return count


def test_short_lived_threads_do_not_each_open_a_connection(tmp_path: Path) -> None:
    db = tmp_path / "state.sqlite3"
    store = PooledStore(SQLiteStore(db), workers=2)

    def one_smtp_connection(i: int) -> None:
        store.set(f"k{i}", "v", ttl=60)
        assert store.get(f"k{i}") == "v"

    for batch in range(4):
        threads = [threading.Thread(target=one_smtp_connection, args=(batch * 25 + i,)) for i in range(25)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    # The main thread's connection plus the two workers', each with its WAL and shm files.
    assert open_fds(db) <= 3 * 3
    assert store.incr("n", 5, ttl=60) == 5
    assert sorted(store.scan("k9")) == ["k9", *[f"k9{i}" for i in range(10)]]
    store.set_soon("later", "x", ttl=60)
    store.close()

