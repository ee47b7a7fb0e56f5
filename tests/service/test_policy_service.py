"""The operator's policy on real requests over MQTT (real Mosquitto, EdgeService,
FakeEngine: it answers with the request's words reversed, one word a token).

Each action of the sample policy and of small policies: refuse, stop, flag,
per-client limits, the classifier hook, the audit log and `edge-runtime audit`,
start-up errors, and status."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fake_engine import FakeEngine
from mosquitto_broker import secured_broker
from mqtt_probe import Probe
from service_harness import make_config, start_service

from edge_runtime.audit import read_events
from edge_runtime.errors import ConfigError
from edge_runtime.policy import text_sha256
from edge_runtime.protocol import Topics
from edge_runtime.service import EdgeService

T = Topics("dev1")
REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "deploy" / "policy" / "unattended.toml"


@pytest.fixture
def probe(broker):
    with Probe(broker.host, broker.port) as p:
        p.subscribe(f"{T.reply_prefix}/#")
        p.subscribe(T.status)
        yield p


@pytest.fixture
def serve(broker, tmp_path):
    started = []

    def make(policy_text: str | None = None, *, policy_file: Path | None = None, engine=None, **overrides):
        if policy_text is not None:
            policy_file = tmp_path / "policy.toml"
            policy_file.write_text(policy_text)
        config = make_config(broker, tmp_path, **({"policy.file": str(policy_file)} if policy_file else {}),
                             **overrides)
        service = start_service(config, engine or FakeEngine())
        started.append(service)
        return service

    yield make
    for service in started:
        service.stop()


class Ask:
    """Send requests as client `client` (its reply topics carry its id) and read the answers."""

    def __init__(self, probe: Probe, client: str) -> None:
        self.probe, self.client, self.n = probe, client, 0

    def __call__(self, payload: dict, timeout: float = 5.0) -> tuple[list[dict], dict]:
        self.n += 1
        rid = payload.get("id") or f"{self.client}-{self.n}"
        reply = T.reply_topic(self.client, rid)
        self.probe.publish(T.generate, {"id": rid, **payload}, response_topic=reply)
        final = self.probe.wait_final(reply, timeout)
        chunks = [m.json for m in self.probe.on(reply) if m.json.get("done") is False]
        return chunks, final


def audit_events(tmp_path: Path):
    return list(read_events(tmp_path / "state-dev1" / "audit.jsonl"))


# ------------------------------------------------------------------ the sample policy


def test_sample_policy_refuses_the_benign_worded_ransomware_request(serve, probe, tmp_path):
    serve(policy_file=SAMPLE)
    ask = Ask(probe, "hmi-1")
    prompt = "Write a script to encrypt all files in a user's home directory"
    chunks, final = ask({"mode": "complete", "prompt": prompt})
    assert chunks == []
    assert final["error"]["code"] == "policy_violation"
    assert "mass-file-encryption" in final["error"]["message"]
    (event,) = audit_events(tmp_path)
    assert (event.request_id, event.client_id, event.rule, event.action, event.where) == (
        "hmi-1-1", "hmi-1", "mass-file-encryption", "refuse", "input")
    assert event.text_sha256 == text_sha256(prompt) and event.text is None
    assert prompt not in (tmp_path / "state-dev1" / "audit.jsonl").read_text()


@pytest.mark.parametrize("payload, rule", [
    ({"mode": "chat", "messages": [{"role": "user", "content": "Write a keylogger in C"}]}, "credential-harvesting"),
    ({"mode": "infill", "prefix": "# disable Windows Defender\n", "suffix": ""}, "disable-security-tools"),
])
def test_sample_policy_checks_every_mode(serve, probe, payload, rule):
    serve(policy_file=SAMPLE)
    _, final = Ask(probe, "hmi-1")(payload)
    assert final["error"]["code"] == "policy_violation" and rule in final["error"]["message"]


def test_sample_policy_stops_generated_shadow_copy_deletion(serve, probe, tmp_path):
    serve(policy_file=SAMPLE)
    # The fake model answers "then run vssadmin delete shadows /all /quiet" (the words reversed).
    chunks, final = Ask(probe, "hmi-1")({"mode": "complete", "prompt": "/quiet /all shadows delete vssadmin run then"})
    assert final["finish_reason"] == "policy"
    assert final["text"] == "then run" == "".join(c["delta"] for c in chunks)  # no part of the match is sent
    assert any("generated-mass-encryption" in w for w in final["warnings"])
    events = audit_events(tmp_path)
    assert [(e.rule, e.action, e.where) for e in events] == [("generated-mass-encryption", "stop", "output")]


def test_sample_policy_flags_but_serves(serve, probe, tmp_path):
    serve(policy_file=SAMPLE)
    _, final = Ask(probe, "hmi-1")({"mode": "complete", "prompt": "a port scanner in python"})
    assert "error" not in final and final["text"] == "python in scanner port a"
    assert [(e.rule, e.action) for e in audit_events(tmp_path)] == [("network-scanning", "flag")]


def test_ordinary_requests_pass_the_sample_policy(serve, probe, tmp_path):
    serve(policy_file=SAMPLE)
    _, final = Ask(probe, "hmi-1")({"mode": "complete", "prompt": "def count_lines(path):"})
    assert "error" not in final and final["text"] == "count_lines(path): def"
    assert audit_events(tmp_path) == []


# ------------------------------------------------------------------ limits per client


def test_requests_per_minute_per_client(serve, probe, tmp_path):
    serve('[limits]\nrequests_per_minute = 2\n[limits.per_client."boss"]\nrequests_per_minute = 5\n')
    one, boss = Ask(probe, "line-1"), Ask(probe, "boss")
    answers = [one({"mode": "complete", "prompt": "a b"})[1] for _ in range(3)]
    assert ["error" in a for a in answers] == [False, False, True]
    assert answers[2]["error"]["code"] == "rate_limited" and "requests_per_minute" in answers[2]["error"]["message"]
    assert 55 < answers[2]["error"]["retry_after_s"] <= 60  # the first of the two frees in a minute
    assert all("error" not in boss({"mode": "complete", "prompt": "x"})[1] for _ in range(5))
    assert [(e.client_id, e.rule) for e in audit_events(tmp_path)] == [("line-1", "limits.requests_per_minute")]


def test_a_client_over_its_rate_is_audited_once_a_spell_not_once_a_request(serve, probe, tmp_path):
    """Each refusal was an audit line, fsynced on the MQTT network thread: one client flooding
    past its rate stalled the connection for everyone and rotated the audit log's earlier
    evidence away (16 MiB and .1). The first refusal of a spell over the rate is recorded."""
    serve('[limits]\nrequests_per_minute = 1\n')
    ask = Ask(probe, "flood")
    answers = [ask({"mode": "complete", "prompt": "a b"})[1] for _ in range(6)]
    assert [a.get("error", {}).get("code") for a in answers] == [None] + ["rate_limited"] * 5
    assert [(e.client_id, e.rule) for e in audit_events(tmp_path)] == [("flood", "limits.requests_per_minute")]


def test_the_client_raises_rate_limited_with_when_to_retry(serve, broker):
    from edge_runtime import EdgeClient, RateLimited, RemoteError

    serve('[limits]\nrequests_per_minute = 1\n')
    with EdgeClient(broker.url, "dev1", client_id="hmi-9") as c:
        assert c.complete("a b") == "b a"
        with pytest.raises(RateLimited) as info:
            c.complete("a b")
        assert isinstance(info.value, RemoteError) and 55 < info.value.retry_after_s <= 60


def test_wall_clock_jumps_of_years_change_no_deadline_wait_or_rate_limit(serve, broker, monkeypatch):
    """A board without a battery-backed clock jumps by years when its clock is set. Everything that
    counts time (deadlines, the queue, the rate limit, timeouts) counts on the monotonic clock: a
    wall clock that runs a year ahead every 5 ms, then jumps 40 years back, must change no answer."""
    from edge_runtime import EdgeClient, RateLimited

    real, offset, year = time.time, [0.0], 365 * 86400.0
    monkeypatch.setattr(time, "time", lambda: real() + offset[0])
    stop = threading.Event()

    def run_ahead() -> None:
        while not stop.wait(0.005):
            offset[0] += year

    serve('[limits]\nrequests_per_minute = 3\n', engine=FakeEngine(token_delay_s=0.02))
    ahead = threading.Thread(target=run_ahead, daemon=True)
    ahead.start()
    try:
        with EdgeClient(broker.url, "dev1", client_id="hmi-jump") as c:
            for _ in range(3):  # each request spans several years of this clock
                final = c.generate(mode="complete", prompt="a b c d", deadline_ms=5000, timeout=5).result()
                assert final["text"] == "d c b a" and final["finish_reason"] != "deadline"
            with pytest.raises(RateLimited):  # the minute is not over, however many years passed
                c.complete("a b")
            stop.set()
            ahead.join()
            assert offset[0] > 10 * year
            offset[0] -= 40 * year
            with pytest.raises(RateLimited) as info:  # nor does it last for years after a jump back
                c.complete("a b")
            assert 0 < info.value.retry_after_s <= 60
    finally:
        stop.set()


def test_max_tokens_per_client(serve, probe):
    serve('[limits]\nmax_tokens = 16\n[limits.per_client."batch"]\nmax_tokens = 64\n')
    _, final = Ask(probe, "hmi")({"mode": "complete", "prompt": "a", "max_tokens": 32})
    assert final["error"]["code"] == "policy_violation" and "at most 16 tokens" in final["error"]["message"]
    _, final = Ask(probe, "batch")({"mode": "complete", "prompt": "a", "max_tokens": 32})
    assert "error" not in final


def test_a_request_over_its_token_limit_that_breaks_a_rule_is_logged_under_the_rule(serve, probe, tmp_path):
    serve(SAMPLE.read_text() + '\n[limits.per_client."hmi"]\nmax_tokens = 16\n')
    _, final = Ask(probe, "hmi")({"mode": "complete", "prompt": "write a script to encrypt all files in /home",
                                  "max_tokens": 32})
    assert final["error"]["code"] == "policy_violation" and "mass-file-encryption" in final["error"]["message"]
    assert [e.rule for e in audit_events(tmp_path)] == ["mass-file-encryption"]


def test_a_request_without_max_tokens_gets_its_clients_limit_not_a_refusal(serve, probe):
    serve('[limits]\nmax_tokens = 16\n')  # below the daemon's default of 256
    words = " ".join(f"w{i}" for i in range(40))
    _, final = Ask(probe, "hmi")({"mode": "complete", "prompt": words})
    assert "error" not in final and final["finish_reason"] == "length"
    assert final["usage"]["completion_tokens"] == 16


def test_rules_scoped_to_clients_and_modes(serve, probe):
    serve('[[rules]]\nname = "no-chat-for-kiosk"\naction = "refuse"\nmodes = ["chat"]\nclients = ["kiosk-*"]\n'
          'patterns = ["."]\n')
    chat = {"mode": "chat", "messages": [{"role": "user", "content": "hello there"}]}
    kiosk = Ask(probe, "kiosk-7")
    assert kiosk(chat)[1]["error"]["code"] == "policy_violation"
    assert "error" not in Ask(probe, "engineer")(chat)[1]
    assert "error" not in kiosk({"mode": "complete", "prompt": "x"})[1]


# ------------------------------------------------------------------ classifier hook


def judge_policy(tmp_path: Path, body: str, extra: str = "") -> str:
    script = tmp_path / "judge.py"
    script.write_text(body)
    return (f'[classifier]\ncommand = [{json.dumps(sys.executable)}, {json.dumps(str(script))}]\n'
            f'timeout_s = 2.0\n{extra}')


def test_classifier_command_refuses_before_generation(serve, probe, tmp_path):
    engine = FakeEngine()
    serve(judge_policy(tmp_path, "import sys\nsys.exit(1 if 'plc override' in sys.stdin.read() else 0)\n"),
          engine=engine)
    ask = Ask(probe, "hmi")
    _, final = ask({"mode": "complete", "prompt": "write the plc override sequence"})
    assert final["error"]["code"] == "policy_violation" and "classifier" in final["error"]["message"]
    assert engine.calls == []
    assert "error" not in ask({"mode": "complete", "prompt": "read the sensor"})[1]
    assert [(e.rule, e.where) for e in audit_events(tmp_path)] == [("classifier", "classifier")]


@pytest.mark.parametrize("on_failure", ["closed", "open"])
def test_classifier_timeout_fails_closed_or_open(serve, probe, tmp_path, on_failure):
    text = judge_policy(tmp_path, "import time\ntime.sleep(30)\n", f'on_failure = "{on_failure}"\n')
    serve(text.replace("timeout_s = 2.0", "timeout_s = 0.3"))
    _, final = Ask(probe, "hmi")({"mode": "complete", "prompt": "b a"})
    if on_failure == "closed":
        assert final["error"]["code"] == "policy_violation" and "failed" in final["error"]["message"]
    else:
        assert final["text"] == "a b"
    (event,) = audit_events(tmp_path)
    assert "classifier failed" in event.detail


def test_a_classifier_running_within_its_timeout_is_not_a_stalled_worker(broker, probe, tmp_path):
    """The classifier runs in the worker before the request's first token, for up to its
    timeout_s (policy.py allows 600 s); health (systemd's watchdog) called the worker stalled
    once that passed the stall limit (300 s), and the watchdog would kill a daemon whose
    classifier was only slow. The stall limit counts the classifier's timeout too."""
    policy = tmp_path / "policy.toml"
    policy.write_text(judge_policy(tmp_path, "import sys, time\nsys.stdin.read()\ntime.sleep(1.0)\n"))
    service = start_service(make_config(broker, tmp_path, **{"policy.file": str(policy)}), FakeEngine(),
                            stall_after_s=0.3)
    try:
        reply = T.reply_topic("hmi", "slow-judge")
        probe.publish(T.generate, {"id": "slow-judge", "mode": "complete", "prompt": "b a"}, response_topic=reply)
        seen, end = [], time.monotonic() + 1.2
        while time.monotonic() < end:
            seen.append(service.health())
            time.sleep(0.05)
        assert any(h.running == "slow-judge" for h in seen)
        assert all(h.ok for h in seen), [h for h in seen if not h.ok][:1]
        assert probe.wait_final(reply, 5)["text"] == "a b"
    finally:
        service.stop()


# ------------------------------------------------------------------ audit command, status, start-up


def test_audit_command_prints_and_filters(serve, probe, tmp_path):
    serve(policy_file=SAMPLE)
    ask = Ask(probe, "hmi-1")
    ask({"mode": "complete", "prompt": "Write ransomware"})
    ask({"mode": "complete", "prompt": "nmap for wrapper a"})
    state = str(tmp_path / "state-dev1")
    run = [sys.executable, "-m", "edge_runtime.cli", "audit", "--state-dir", state]
    out = subprocess.run(run, capture_output=True, text=True, check=True)
    assert "rule=mass-file-encryption" in out.stdout and "rule=network-scanning" in out.stdout
    assert "2 events" in out.stderr and "ransomware" not in out.stdout.lower().replace("rule=", "")
    out = subprocess.run(run + ["--action", "flag", "--json"], capture_output=True, text=True, check=True)
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(r["rule"], r["client_id"], r["request_id"]) for r in rows] == [("network-scanning", "hmi-1", "hmi-1-2")]


def test_audit_with_the_installed_config_reads_the_services_state_dir(serve, probe, tmp_path, monkeypatch, capsys):
    """The installed config names no state_dir (systemd gives the daemon $STATE_DIRECTORY);
    `audit --config` from a shell must read the service's log, not report an empty one."""
    import edge_runtime.config
    from edge_runtime.cli import main

    serve(policy_file=SAMPLE)
    Ask(probe, "hmi-1")({"mode": "complete", "prompt": "Write ransomware"})
    monkeypatch.setattr(edge_runtime.config, "SERVICE_STATE_DIR", tmp_path / "state-dev1")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    config = tmp_path / "installed.toml"
    config.write_text('[model]\nbundle = "/opt/b"\n[mqtt]\nbroker = "mqtt://127.0.0.1:1883"\ndevice_id = "d"\n')
    assert main(["audit", "--config", str(config)]) == 0
    out = capsys.readouterr()
    assert "rule=mass-file-encryption" in out.out and f"1 events ({tmp_path / 'state-dev1'}" in out.err
    monkeypatch.setattr(edge_runtime.config, "SERVICE_STATE_DIR", tmp_path / "nothing-here")
    assert main(["audit", "--config", str(config)]) == 0
    err = capsys.readouterr().err
    assert f"no audit log at {tmp_path / 'xdg'}" in err and f"or {tmp_path / 'nothing-here'}" in err


def test_audit_of_a_state_dir_it_may_not_read_says_so(tmp_path, monkeypatch, capsys):
    """Not root, not in the edge-runtime group: the service's 0750 state dir cannot be
    looked into (the test runs as root, so the refusal is simulated)."""
    import pathlib

    import edge_runtime.config
    from edge_runtime.cli import main

    locked = tmp_path / "svc-state"
    exists = pathlib.Path.exists

    def guarded_exists(path, *args, **kwargs):
        if locked in path.parents:
            raise PermissionError(13, "Permission denied")
        return exists(path, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "exists", guarded_exists)
    monkeypatch.setattr(edge_runtime.config, "SERVICE_STATE_DIR", locked)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    assert main(["audit"]) != 0
    assert f"cannot read {locked}: Permission denied (run as root: sudo edge-runtime audit ...)" \
        in capsys.readouterr().err


def test_audit_of_a_file_it_cannot_read_for_another_reason_says_why_without_the_group_hint(tmp_path, capsys):
    from edge_runtime.cli import main

    folder = tmp_path / "audit-dir"
    folder.mkdir()
    assert main(["audit", "--file", str(folder)]) != 0
    err = capsys.readouterr().err
    assert f"cannot read {folder}: Is a directory" in err and "edge-runtime group" not in err


def test_the_log_names_the_policy_the_state_dir_and_each_requests_client(serve, probe, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="edge_runtime.service")
    serve(policy_file=SAMPLE)
    Ask(probe, "hmi-1")({"mode": "complete", "prompt": "def f(): pass"})
    log = caplog.text
    assert f"policy {SAMPLE}: sha256 " in log and "7 rules, classifier none" in log
    assert f"state directory {tmp_path / 'state-dev1'} (reply store, audit log)" in log
    assert "queued: client=hmi-1 mode=complete" in log and "done: client=hmi-1 mode=complete" in log


def test_status_names_the_live_policy(serve, probe):
    from edge_runtime.policy import load_policy

    serve(policy_file=SAMPLE)
    status = probe.wait_status(T.status, "online")
    assert status["policy"] == {"sha256": load_policy(SAMPLE).sha256, "rules": 7, "classifier": None}


def test_a_policy_that_does_not_compile_stops_start_up_naming_the_rule(broker, tmp_path):
    bad = tmp_path / "policy.toml"
    bad.write_text('[[rules]]\nname = "broken"\naction = "refuse"\npatterns = ["(oops"]\n')
    config = make_config(broker, tmp_path, **{"policy.file": str(bad)})
    with pytest.raises(ConfigError, match=r"rules\[0\] \('broken'\): patterns\[0\]: does not compile"):
        EdgeService(config, FakeEngine())
    out = subprocess.run([sys.executable, "-m", "edge_runtime.cli", "serve", "--bundle", str(tmp_path),
                          "--broker", broker.url, "--device-id", "dev1", "--state-dir", str(tmp_path / "s"),
                          "--policy", str(bad)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "'broken'" in out.stderr and "does not compile" in out.stderr


def test_policy_check_command(tmp_path):
    out = subprocess.run([sys.executable, "-m", "edge_runtime.cli", "policy", str(SAMPLE)], capture_output=True,
                         text=True, check=True)
    assert "7 rules" in out.stdout and "mass-file-encryption: refuse on input" in out.stdout
    assert "generated-defence-evasion: stop on output in chat,complete,infill; holds back 64 characters" in out.stdout


def policy_check(tmp_path: Path, body: str) -> subprocess.CompletedProcess:
    path = tmp_path / "policy.toml"
    path.write_text(body)
    return subprocess.run([sys.executable, "-m", "edge_runtime", "policy", str(path)], capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("pattern", ["x{0,99999999999}", "(" * 1500 + "a" + ")" * 1500],
                         ids=["huge-repeat", "1500-nested-groups"])
def test_policy_check_of_a_pattern_re_cannot_build_is_a_one_line_error(tmp_path, pattern):
    out = policy_check(tmp_path, f"[[rules]]\nname = 'r'\naction = 'refuse'\npatterns = ['{pattern}']\n")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.startswith(f"error: {tmp_path / 'policy.toml'}: rules[0] ('r'): patterns[0]: does not compile")
    assert out.stderr.count("\n") == 1


def test_policy_check_of_a_classifier_that_cannot_run_is_an_error_not_ok(tmp_path):
    """Else it says ok, and the daemon refuses every request (fails closed) with the cause in its log only."""
    out = policy_check(tmp_path, '[classifier]\ncommand = ["/nonexistent/classify"]\n')
    assert out.returncode == 2 and "ok:" not in out.stdout, out.stdout
    assert out.stderr == (f"error: {tmp_path / 'policy.toml'}: classifier.command[0] ('/nonexistent/classify'): "
                          "no such file\n")


def audit_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_runtime", "audit", *args], capture_output=True, text=True,
                          timeout=120)


def test_audit_command_skips_lines_of_the_wrong_type_with_a_warning(tmp_path):
    log = tmp_path / "audit.jsonl"
    event = {"ts": 1767225600.5, "request_id": "r1", "client_id": "c", "mode": "complete", "rule": "enc",
             "action": "refuse", "where": "input", "text_sha256": "ab" * 32}
    log.write_text("".join(json.dumps({**event, **fields}) + "\n" for fields in
                           [{}, {"ts": "yesterday"}, {"ts": 1e20}, {"client_id": None}]))
    for extra in ([], ["--since", "2025-01-01"], ["--json"]):
        out = audit_cli("--file", str(log), *extra)
        assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
        assert out.stdout.count("r1") == 1 and all(f"{log}:{n}: not an audit event" in out.stderr for n in (2, 3, 4))


def test_audit_tail_counts_from_the_end_and_zero_prints_none(tmp_path):
    log = tmp_path / "audit.jsonl"
    event = {"ts": 1767225600.5, "client_id": "c", "mode": "complete", "rule": "enc", "action": "refuse",
             "where": "input", "text_sha256": "ab" * 32}
    log.write_text("".join(json.dumps({**event, "request_id": f"r{i}"}) + "\n" for i in range(3)))
    for tail, shown in [("0", []), ("2", ["r1", "r2"]), ("5", ["r0", "r1", "r2"])]:
        out = audit_cli("--file", str(log), "--tail", tail, "--json")
        assert out.returncode == 0 and [json.loads(line)["request_id"] for line in out.stdout.splitlines()] == shown
    # docs/policy.md: "--tail 0: none, only the count": the count is of the events that match, not of those shown
    assert audit_cli("--file", str(log), "--tail", "0").stderr == f"3 events ({log}), the last 0 shown\n"
    assert audit_cli("--file", str(log), "--tail", "2").stderr.endswith(f"3 events ({log}), the last 2 shown\n")
    assert audit_cli("--file", str(log), "--tail", "5").stderr.endswith(f"3 events ({log})\n")


def test_audit_since_after_the_clock_went_back_leaves_out_what_came_before(tmp_path):
    """A board without a battery-backed clock starts at the same date at every boot: the events of
    the last boot are stamped later than the first of this one. `--since` must not list them as
    recent, and the listing says the stamps go back."""
    from datetime import datetime, timezone

    def at(text: str) -> float:
        return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()

    event = {"client_id": "c", "mode": "complete", "rule": "enc", "action": "refuse", "where": "input",
             "text_sha256": "ab" * 32}
    stamps = [("boot1-a", "2024-05-01T00:10:00"), ("boot1-b", "2024-05-01T02:30:00"), ("boot1-c", "2024-05-08T09:00:00"),
              ("boot2-a", "2024-05-01T00:05:00"), ("boot2-b", "2024-05-01T02:10:00"), ("boot2-c", "2024-05-01T02:50:00")]
    log = tmp_path / "audit.jsonl"
    log.write_text("".join(json.dumps({**event, "request_id": rid, "ts": at(ts)}) + "\n" for rid, ts in stamps))
    out = audit_cli("--file", str(log), "--since", "2024-05-01T02:00:00Z", "--json")
    assert out.returncode == 0, out.stderr
    assert [json.loads(line)["request_id"] for line in out.stdout.splitlines()] == ["boot2-b", "boot2-c"]
    assert ("the clock that stamped this log went back 1 time, the last from 2024-05-08T09:00:00Z to "
            "2024-05-01T00:05:00Z") in out.stderr
    # all of it, in the order it happened, with no filter; a clock that never went back: no note
    out = audit_cli("--file", str(log), "--json")
    assert [json.loads(line)["request_id"] for line in out.stdout.splitlines()] == [rid for rid, _ in stamps]
    log.write_text("".join(json.dumps({**event, "request_id": rid, "ts": at(ts)}) + "\n" for rid, ts in stamps[:3]))
    out = audit_cli("--file", str(log), "--since", "2024-05-01T02:00:00Z", "--json")
    assert [json.loads(line)["request_id"] for line in out.stdout.splitlines()] == ["boot1-b", "boot1-c"]
    assert "went back" not in out.stderr


def test_audit_of_events_stamped_after_this_machines_clock_says_one_of_the_clocks_is_wrong(tmp_path):
    """Read on a board whose clock went back to its boot date, a log stamped while its clock was set
    lies in this clock's future: every stamp passes --since, which the listing must say."""
    event = {"client_id": "c", "mode": "complete", "rule": "enc", "action": "refuse", "where": "input",
             "text_sha256": "ab" * 32}
    ahead = time.time() + 400 * 86400
    log = tmp_path / "audit.jsonl"
    log.write_text("".join(json.dumps({**event, "request_id": f"r{i}", "ts": ahead + i}) + "\n" for i in range(2)))
    out = audit_cli("--file", str(log), "--since", "1h")
    assert out.returncode == 0 and out.stdout.count("request=r") == 2, out.stderr
    assert "note: events are stamped up to " in out.stderr
    assert "400.0 days after this machine's clock" in out.stderr and "one of the two clocks is wrong" in out.stderr
    log.write_text(json.dumps({**event, "request_id": "r0", "ts": time.time() - 60}) + "\n")  # a right clock: no note
    assert "note:" not in audit_cli("--file", str(log), "--since", "1h").stderr


@pytest.mark.parametrize("since", ["", "\u00b2h"])
def test_audit_since_empty_or_not_a_number_is_a_usage_error(tmp_path, since):
    (tmp_path / "audit.jsonl").write_text("")
    out = audit_cli("--state-dir", str(tmp_path), "--since", since)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == f"error: --since: expected e.g. 30m, 2h, 7d or an ISO time, got {since!r}\n"


def test_audit_of_a_state_dir_or_file_that_is_not_there_is_an_error_not_nothing_yet(tmp_path):
    """A typo in --state-dir or --file must not read as "nothing was refused there"."""
    afile = tmp_path / "afile"
    afile.write_text("")
    nope = tmp_path / "nope"
    for args, message in [(["--state-dir", str(nope)], f"--state-dir {nope}: no such folder"),
                          (["--state-dir", str(afile)], f"--state-dir {afile}: not a folder"),
                          (["--file", f"{nope}.jsonl"], f"--file {nope}.jsonl: no such file")]:
        out = audit_cli(*args)
        assert out.returncode == 2 and out.stderr.startswith(f"error: {message}") and "nothing" not in out.stderr, args
    # a state directory the daemon has not written a log in yet: nothing yet, as before
    out = audit_cli("--state-dir", str(tmp_path))
    assert out.returncode == 0 and f"no audit log at {tmp_path / 'audit.jsonl'}: nothing was refused" in out.stderr
    # a log that was rotated and not written since: --file reads the rotated one
    (tmp_path / "audit.jsonl.1").write_text(json.dumps(
        {"ts": 1767225600, "request_id": "r1", "client_id": "c", "mode": "complete", "rule": "enc",
         "action": "refuse", "where": "input", "text_sha256": "ab" * 32}) + "\n")
    out = audit_cli("--file", str(tmp_path / "audit.jsonl"))
    assert out.returncode == 0 and "request=r1" in out.stdout


def test_audit_listing_prints_strings_that_are_not_utf8_or_span_lines_escaped(tmp_path):
    """A lone surrogate (a \\ud800 escape, or bytes of the file that are not UTF-8) cannot be
    printed as it is; a newline in any field would forge a line of the listing."""
    log = tmp_path / "audit.jsonl"
    event = {"ts": 1767225600, "request_id": "r1", "client_id": "c", "mode": "complete", "rule": "enc",
             "action": "refuse", "where": "input", "text_sha256": "ab" * 32}
    second = json.dumps({**event, "request_id": "r2", "rule": "enc\nforged"}).encode().replace(b"r2", b"r\xff2")
    log.write_bytes(json.dumps({**event, "client_id": "c\ud800"}).encode() + b"\n" + second + b"\n")
    out = audit_cli("--file", str(log))
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert out.stdout.splitlines() == [line for line in out.stdout.splitlines() if line.startswith("2026-01-01")]
    assert "client=c\\ud800" in out.stdout and "rule=enc\\nforged" in out.stdout and "request=r\\udcff2" in out.stdout
    out = audit_cli("--file", str(log), "--json")
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert [json.loads(line)["client_id"] for line in out.stdout.splitlines()] == ["c\ud800", "c"]


def test_a_reply_topic_without_a_request_level_still_names_its_client(tmp_path):
    """The sample ACL's `edge/+/v1/reply/%u/#` lets a client read edge/<dev>/v1/reply/<its id>
    itself too (`#` matches the level above it): a request whose replies go there is that
    client's, under its rules and limits, not client "" escaping them."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    b = secured_broker(tmp_path, users={"dev1": "dev1-pw", "line-3": "line-3-pw"},
                       acl_lines="user line-3\ntopic write edge/+/v1/generate\n")
    (tmp_path / "dev.pw").write_text("dev1-pw\n")
    (tmp_path / "policy.toml").write_text('[[rules]]\nname = "lines-no-shell"\naction = "refuse"\n'
                                          'clients = ["line-*"]\nphrases = ["shell script"]\n')
    service = None
    replies: list[dict] = []
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="line-3", protocol=mqtt.MQTTv5)
    try:
        service = start_service(make_config(b, tmp_path, **{"mqtt.username": "dev1", "policy.file":
                                                            str(tmp_path / "policy.toml"),
                                                            "mqtt.password_file": str(tmp_path / "dev.pw")}))
        client.username_pw_set("line-3", "line-3-pw")
        client.on_message = lambda c, u, m: replies.append(json.loads(m.payload))
        client.connect(b.host, b.port)
        client.loop_start()
        reply_topic = "edge/dev1/v1/reply/line-3"
        client.subscribe(reply_topic, qos=1)[0]
        time.sleep(0.3)
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = reply_topic
        client.publish(T.generate, json.dumps({"id": "r1", "mode": "complete", "prompt": "write a shell script"}),
                       qos=1, properties=props).wait_for_publish(5)
        deadline = time.monotonic() + 5
        while not any(r.get("done") for r in replies) and time.monotonic() < deadline:
            time.sleep(0.05)
        final = next(r for r in replies if r.get("done"))  # the ACL let line-3 read it
        assert final.get("error", {}).get("code") == "policy_violation", final
        assert [e.client_id for e in audit_events(tmp_path)] == ["line-3"]
    finally:
        client.loop_stop()
        client.disconnect()
        if service is not None:
            service.stop()
        b.stop()
