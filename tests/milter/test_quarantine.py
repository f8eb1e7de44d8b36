"""The quarantine's files and index entries: layout, write order, expiry, missing files."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from harness.ports import free_port
from harness.smtpsink import SmtpSink
from mailwarden.store import MemoryStore, SQLiteStore, StoreUnavailable
from milters.quarantine import PREFIX, FileMissing, NotQuarantined, Quarantine, QuarantineEntry
from tests.milter.helpers import RecordingInjector, make_message
from tests.milter.test_cli import run, write_config

HOUR = 3600.0
DAY = 86400.0


def put(q: Quarantine, subject: str = "held") -> QuarantineEntry:
    return q.put([make_message(subject=subject).as_bytes()], sender="s@remote.example",
                 recipients=["taro@example.jp"], reason="keyword rule", subject=subject)


def files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file())


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def legacy_entry(q: Quarantine, entry_id: str = "20260101000000-0123456789") -> str:
    """An entry as written before files went into day directories (and ids had 40 random bits)."""
    q.dir.mkdir(parents=True, exist_ok=True)
    (q.dir / f"{entry_id}.eml").write_bytes(make_message(subject="flat").as_bytes())
    q.store.set(PREFIX + entry_id, QuarantineEntry(entry_id, time.time(), "s@remote.example",
                                                   ["taro@example.jp"], "virus").to_json(), ttl=DAY)
    return entry_id


def test_a_message_is_kept_in_its_day_directory_readable_by_the_milter_user_only(tmp_path: Path) -> None:
    q = Quarantine(MemoryStore(), tmp_path / "q", node="mx1")
    entry = put(q)
    day = time.strftime("%Y%m%d", time.gmtime())
    assert entry.id.startswith(day) and len(entry.id.split("-")[1]) == 16
    path = tmp_path / "q" / day / f"{entry.id}.eml"
    assert files(tmp_path / "q") == [path]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert b"Subject: held" in q.read(entry.id) and q.get(entry.id).node == "mx1"


def test_the_file_is_in_place_under_its_name_before_the_entry_is_written(tmp_path: Path) -> None:
    seen: list[list[Path]] = []

    class Watching(MemoryStore):
        def set(self, key: str, value: str, ttl: float | None = None) -> None:
            seen.append(files(tmp_path / "q"))
            super().set(key, value, ttl)

    q = Quarantine(Watching(), tmp_path / "q")
    entry = put(q)
    assert seen == [[q.path(entry.id)]]


def test_no_file_is_left_when_the_entry_cannot_be_written(tmp_path: Path) -> None:
    class Down(MemoryStore):
        def set(self, key: str, value: str, ttl: float | None = None) -> None:
            raise StoreUnavailable("redis down")

    q = Quarantine(Down(), tmp_path / "q")
    with pytest.raises(StoreUnavailable):
        put(q)
    assert files(tmp_path / "q") == []


def test_entries_written_flat_before_day_directories_are_still_read_and_deleted(tmp_path: Path) -> None:
    q = Quarantine(MemoryStore(), tmp_path / "q")
    entry_id = legacy_entry(q)
    assert b"Subject: flat" in q.read(entry_id)
    assert q.delete(entry_id) is True
    assert files(tmp_path / "q") == [] and q.entries() == []


def test_delete_removes_the_entry_before_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure between the two leaves a file without entry (expire's garbage), never
    an entry without its file."""
    q = Quarantine(MemoryStore(), tmp_path / "q")
    entry = put(q)

    def refused(path: Path, missing_ok: bool = False) -> None:
        raise PermissionError(f"{path}: read-only")

    monkeypatch.setattr(Path, "unlink", refused)
    with pytest.raises(PermissionError):
        q.delete(entry.id)
    monkeypatch.undo()
    assert q.entries() == [] and files(tmp_path / "q") == [q.path(entry.id)]


def test_expire_removes_what_retention_and_lost_entries_leave(tmp_path: Path) -> None:
    q = Quarantine(MemoryStore(), tmp_path / "q", retention_days=30)
    kept, past_retention, orphan, fresh_orphan = (put(q, s) for s in ("kept", "old", "orphan", "fresh"))
    age(q.path(kept.id), 2 * HOUR)
    age(q.path(past_retention.id), 31 * DAY)
    for entry in (orphan, fresh_orphan):  # the entry's TTL ran out, or a crash came between
        q.store.delete(PREFIX + entry.id)
    age(q.path(orphan.id), 2 * HOUR)
    stale_tmp = q.path(kept.id).with_name("20200101000000-00000000000000aa.tmp")
    stale_tmp.write_bytes(b"half")
    age(stale_tmp, 2 * HOUR)
    old_day = tmp_path / "q" / "20200101"
    old_day.mkdir()
    legacy = legacy_entry(q)
    age(tmp_path / "q" / f"{legacy}.eml", 31 * DAY)

    assert q.expire() == 3
    # A fresh file without entry may be a put between its rename and its entry: kept.
    assert files(tmp_path / "q") == sorted([q.path(kept.id), q.path(fresh_orphan.id)])
    assert [e.id for e in q.entries()] == [kept.id]
    assert not old_day.exists() and q.path(kept.id).parent.is_dir()


def test_expire_without_the_directory_removes_nothing(tmp_path: Path) -> None:
    """The shared volume not mounted: the entries stay for the node that has it."""
    store = MemoryStore()
    entry = put(Quarantine(store, tmp_path / "q"))
    assert Quarantine(store, tmp_path / "not-mounted").expire() == 0
    assert [e.id for e in Quarantine(store, tmp_path / "q").entries()] == [entry.id]


# ---------------------------------------------------------------- an entry whose file is missing


@pytest.fixture
def missing_file(tmp_path: Path) -> tuple[Path, Quarantine, str]:
    cfg = write_config(tmp_path)
    q = Quarantine(SQLiteStore(str(tmp_path / "state.sqlite3")), tmp_path / "q")
    there, gone = put(q, "there"), put(q, "gone")
    q.path(gone.id).unlink()
    assert q.file(there.id) is not None
    return cfg, q, gone.id


def test_list_marks_an_entry_whose_file_is_missing(missing_file: tuple[Path, Quarantine, str]) -> None:
    cfg, q, gone = missing_file
    code, out = run(cfg, "quarantine", "list")
    assert code == 0, out
    lines = {line.split()[0]: line for line in out.splitlines() if "<s@remote.example>" in line}
    assert len(lines) == 2 and lines[gone].endswith("[file missing]")
    assert sum("[file missing]" in line for line in lines.values()) == 1
    assert f"1 of them without their file in {q.dir}" in out


def test_show_names_the_missing_file_after_what_the_index_knows(missing_file: tuple[Path, Quarantine, str]
                                                                ) -> None:
    cfg, q, gone = missing_file
    code, out = run(cfg, "quarantine", "show", gone)
    assert code == 1
    assert "Subject: gone" not in out and "subject     gone" in out
    assert f"its file is missing from {q.dir}" in out and "shared quarantine volume" in out
    with pytest.raises(FileMissing):
        q.read(gone)


def test_release_of_an_entry_without_its_file_keeps_the_entry(missing_file: tuple[Path, Quarantine, str]
                                                              ) -> None:
    cfg, q, gone = missing_file
    with SmtpSink() as sink:
        cfg.write_text(cfg.read_text() + f'reinject = "inet:127.0.0.1:{sink.port}"\n')
        code, out = run(cfg, "quarantine", "release", gone)
        assert code == 75 and "not released" in out and "file is missing" in out
        assert sink.messages == []
    assert q.get(gone).id == gone


# ---------------------------------------------------------------- one release at a time


def test_a_release_under_way_elsewhere_is_not_repeated(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, f'reinject = "inet:127.0.0.1:{free_port()}"\n')
    store = SQLiteStore(str(tmp_path / "state.sqlite3"))
    entry = put(Quarantine(store, tmp_path / "q"))
    store.set(f"quarantine-release:{entry.id}", "mx2", ttl=60)
    code, out = run(cfg, "quarantine", "release", entry.id)
    assert code == 75 and "being released by mx2" in out
    assert run(cfg, "quarantine", "show", entry.id)[0] == 0


def test_a_failed_release_can_be_tried_again(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, f'reinject = "inet:127.0.0.1:{free_port()}"\n')  # nobody there
    entry = put(Quarantine(SQLiteStore(str(tmp_path / "state.sqlite3")), tmp_path / "q"))
    assert run(cfg, "quarantine", "release", entry.id)[0] == 75
    with SmtpSink() as sink:
        write_config(tmp_path, f'reinject = "inet:127.0.0.1:{sink.port}"\n')
        code, out = run(cfg, "quarantine", "release", entry.id)
        assert code == 0, out
        assert sink.wait_for(1)[0].recipients == ("taro@example.jp",)


def test_each_recipient_releases_or_deletes_their_own_copy_the_others_stay_held(tmp_path: Path) -> None:
    q = Quarantine(MemoryStore(), tmp_path / "q")
    entry = q.put([make_message(subject="to three").as_bytes()], sender="s@remote.example",
                  recipients=["taro@example.jp", "hanako@example.jp", "bob@example.com"],
                  reason="keyword rule", recipient_params={"bob@example.com": ["NOTIFY=NEVER"]})
    injector = RecordingInjector()
    q.release_for(entry.id, injector, ["Taro@example.jp"], deadline=time.monotonic() + 10)
    assert [m.recipients for m in injector.sent] == [["taro@example.jp"]]
    assert q.get(entry.id).recipients == ["hanako@example.jp", "bob@example.com"]
    q.delete_for(entry.id, ["hanako@example.jp"])
    left = q.get(entry.id)
    assert left.recipients == ["bob@example.com"]
    assert left.recipient_params == {"bob@example.com": ["NOTIFY=NEVER"]}
    assert q.file(entry.id) is not None  # still held for bob
    with pytest.raises(NotQuarantined, match=r"not held for taro@example\.jp"):
        q.release_for(entry.id, injector, ["taro@example.jp"], deadline=time.monotonic() + 10)
    q.release_for(entry.id, injector, ["bob@example.com"], deadline=time.monotonic() + 10)
    assert injector.sent[-1].recipients == ["bob@example.com"]
    with pytest.raises(NotQuarantined):
        q.get(entry.id)  # held for nobody now: gone, file and all
    assert files(tmp_path / "q") == []
