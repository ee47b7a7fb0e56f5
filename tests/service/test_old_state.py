"""A daemon upgraded in the field starts on the state directory its older version wrote: the
reply store and the audit log as the first daemon (0069d77) and the first policy (9502665)
wrote them, described here by their table and their lines. They are read as they are, and
what the new daemon adds goes beside them."""

from __future__ import annotations

import json
import sqlite3

from edge_runtime.cli import main
from edge_runtime.reply_store import ReplyStore, request_key

# The table as the first daemon made it (edge_runtime/reply_store.py at 0069d77), in WAL mode
FIRST_REPLY_TABLE = ("CREATE TABLE IF NOT EXISTS replies ( seq INTEGER PRIMARY KEY AUTOINCREMENT,"
                     " key TEXT NOT NULL UNIQUE, payload BLOB NOT NULL, created REAL NOT NULL)")
# Its keys were the reply topic and the request id, one line each
FIRST_KEY = "edge/dev1/v1/reply/hmi-1/{id}\n{id}"


def test_a_reply_store_of_the_first_daemon_answers_its_requests_again(tmp_path):
    path = tmp_path / "replies-dev1.sqlite3"
    old = {f"r{i}": json.dumps({"id": f"r{i}", "done": True, "text": f"answer {i}", "finish_reason": "stop"}).encode()
           for i in range(3)}
    with sqlite3.connect(str(path)) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(FIRST_REPLY_TABLE)
        db.executemany("INSERT INTO replies (key, payload, created) VALUES (?, ?, ?)",
                       [(FIRST_KEY.format(id=i), p, 1796000000.0 + n) for n, (i, p) in enumerate(old.items())])
    topic = "edge/dev1/v1/reply/hmi-1/{}"
    with ReplyStore(path) as store:
        assert {i: store.get(request_key(topic.format(i), i)) for i in old} == old
        store.put(request_key(topic.format("new"), "new"), b'{"id": "new", "done": true}')
    with ReplyStore(path) as store:  # the next start: the old replies and the new one
        assert all(store.get(request_key(topic.format(i), i)) == p for i, p in old.items())
        assert store.get(request_key(topic.format("new"), "new")) == b'{"id": "new", "done": true}'


def test_an_audit_log_of_the_first_policy_daemon_is_listed(tmp_path, capsys):
    """The first policy daemon's lines: no text (record_text off), detail only when it had one."""
    first = [{"ts": 1796321750.067, "request_id": "p1", "client_id": "qa", "mode": "complete", "rule": "no-rm-rf",
              "action": "refuse", "where": "input", "text_sha256": "d9f1" + "0" * 60},
             {"ts": 1796321751.5, "request_id": "s1", "client_id": "qa", "mode": "chat", "rule": "flag-os",
              "action": "flag", "where": "output", "text_sha256": "3727" + "0" * 60, "detail": "classifier: 0.91"}]
    (tmp_path / "audit.jsonl").write_text("".join(json.dumps(e, separators=(",", ":")) + "\n" for e in first))
    assert main(["audit", "--state-dir", str(tmp_path), "--json"]) == 0
    out, err = capsys.readouterr()
    listed = [json.loads(line) for line in out.splitlines()]
    assert [(e["request_id"], e["rule"], e["action"]) for e in listed] == [("p1", "no-rm-rf", "refuse"),
                                                                            ("s1", "flag-os", "flag")]
    assert "skipp" not in err


def test_a_reply_store_of_this_version_is_read_and_written_by_the_first_daemons_queries(tmp_path):
    """A rollback: this version's table (seq no longer AUTOINCREMENT, to write a page less a
    reply) under the first daemon's statements (its insert, its pruning and its read in seq
    order): the replies come back in order, the one it adds last."""
    path = tmp_path / "replies-dev1.sqlite3"
    with ReplyStore(path) as store:
        for i in range(3):
            store.put(FIRST_KEY.format(id=f"r{i}"), f"answer {i}".encode())
    with sqlite3.connect(str(path)) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(FIRST_REPLY_TABLE)  # IF NOT EXISTS: the table stays this version's
        db.execute("INSERT OR REPLACE INTO replies (key, payload, created) VALUES (?, ?, ?)",
                   (FIRST_KEY.format(id="r0"), b"answer 0 again", 1796000000.0))
        db.execute("DELETE FROM replies WHERE seq NOT IN (SELECT seq FROM replies ORDER BY seq DESC LIMIT ?)", (2,))
        rows = db.execute("SELECT key, payload FROM replies ORDER BY seq").fetchall()
    assert rows == [(FIRST_KEY.format(id="r2"), b"answer 2"), (FIRST_KEY.format(id="r0"), b"answer 0 again")]
