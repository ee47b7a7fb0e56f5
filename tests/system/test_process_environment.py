"""The process environment the commands really run in, which is not a developer's shell:
standard streams closed (`<&-`, `>&-`) or empty (`</dev/null` in CI), a working directory
removed under the shell. Each ends in one line naming the problem, never a traceback, and
an export leaves nothing behind."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

EDGE = [sys.executable, "-m", "edge_runtime"]


def run_in_shell(script: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`script` under /bin/sh, where `$EDGE` is the edge-runtime command (this interpreter)."""
    return subprocess.run(["/bin/sh", "-c", f"EDGE={shlex.quote(shlex.join(EDGE))}; {script}"],
                          capture_output=True, text=True, timeout=timeout)


def last_line(out: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in out.stderr, out.stderr
    return out.stderr.strip().splitlines()[-1]


def test_messages_from_a_closed_or_empty_stdin_is_one_line():
    """`--messages -` with stdin closed (`<&-`) stopped with AttributeError ('NoneType' object has no
    attribute 'read'); from /dev/null it said "Expecting value: line 1 column 1". The missing
    bundle shows nothing was loaded."""
    closed = run_in_shell("$EDGE generate --bundle /nonexistent --messages - <&-")
    assert closed.returncode == 2
    assert last_line(closed) == "error: --messages -: standard input is closed: give the messages on it, or a file"
    empty = run_in_shell("$EDGE generate --bundle /nonexistent --messages - </dev/null")
    assert empty.returncode == 2
    assert last_line(empty).startswith("error: --messages -: empty: expected a JSON list"), empty.stderr
    asked = run_in_shell("$EDGE ask --broker mqtt://127.0.0.1:9 --device-id d --messages - <&-")
    assert asked.returncode == 2 and "standard input is closed" in last_line(asked), asked.stderr


def test_generate_and_ask_with_stdout_closed_stop_before_the_work():
    """`generate ... >&-` loaded the bundle, then stopped with AttributeError ('NoneType' object has
    no attribute 'write'); `ask` did so after sending the request. Now exit 1, as for a full disk,
    before the bundle is loaded (/nonexistent) or the broker called (nothing listens on port 9)."""
    for command in ("generate --bundle /nonexistent --prompt x", "ask --broker mqtt://127.0.0.1:9 --device-id d "
                                                                    "--prompt x"):
        out = run_in_shell(f"$EDGE {command} >&-")
        assert out.returncode == 1, (command, out.stderr)
        assert last_line(out) == "error: cannot write the output: standard output is closed (`>/dev/null` discards it)"


def test_export_from_a_removed_working_directory_is_refused_and_leaves_nothing(tiny_checkpoint, tmp_path):
    """`cd build && rm -rf ../build` in another shell, then `export` with absolute paths: torch's
    oneMKL killed the process at the first matrix product ("Intel oneMKL FATAL ERROR: Cannot load
    libtorch_cpu.so", exit 2) and left `OUTPUT.partial/` behind. Now refused before any work."""
    gone, output = tmp_path / "gone", tmp_path / "out" / "bundle"
    script = (f"mkdir {shlex.quote(str(gone))} && cd {shlex.quote(str(gone))} && rmdir {shlex.quote(str(gone))} && "
              f"$EDGE export --checkpoint {shlex.quote(str(tiny_checkpoint))} --profile cpu-x86_64 --precision int8 "
              f"--skip-fidelity --output {shlex.quote(str(output))}")
    out = run_in_shell(script)
    assert out.returncode == 2, out.stderr
    assert "the current folder no longer exists" in last_line(out) and "cd to a folder that exists" in last_line(out)
    assert not (tmp_path / "out").exists(), sorted(p.name for p in (tmp_path / "out").iterdir())



def ascii_locale_env() -> dict[str, str]:
    """LC_ALL=C with Python's UTF-8 mode off: the filesystem encoding is ASCII, and a name's bytes
    above 0x7f reach Python as surrogate escapes (a CI job or container that pins the C locale)."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "LANG", "PYTHONIO"))}
    env.update(LC_ALL="C", PYTHONUTF8="0")
    return env


def test_a_bundle_in_a_non_ascii_folder_loads_under_an_ascii_locale(tiny_bundle, tmp_path):
    """`bundles/bündle 模型` under LC_ALL=C PYTHONUTF8=0: tokenizers and onnxruntime take a str
    path and encode it as UTF-8, so the surrogate-escaped one Python holds was refused ("surrogates
    not allowed") and `generate`/`serve` said the tokenizer.json was "not a tokenizer this runtime
    reads; export the bundle again"; `verify` stopped with a UnicodeEncodeError printing the path."""
    import json
    import shutil

    bundle = tmp_path / "bündle 模型"
    shutil.copytree(tiny_bundle, bundle)
    env = ascii_locale_env()
    out = subprocess.run([*EDGE, "generate", "--bundle", str(bundle), "--prompt", "def f(x):", "--max-tokens", "2",
                          "--temperature", "0", "--json"], capture_output=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr.decode("utf-8", "replace")
    assert json.loads(out.stdout)["usage"]["completion_tokens"] == 2
    verify = subprocess.run([*EDGE, "verify", "--bundle", str(bundle)], capture_output=True, timeout=120, env=env)
    assert verify.returncode == 0, verify.stderr.decode("utf-8", "replace")
    assert verify.stdout.startswith(b"ok: " + str(bundle).encode("utf-8") + b" ("), verify.stdout  # the path's bytes


def test_a_bundle_folder_whose_name_is_not_utf8_is_named_as_such(tiny_bundle, tmp_path):
    """A folder named under a Latin-1 locale (`caf\\xe9`): onnxruntime takes a model's path only as
    UTF-8 text, so no str opens it; the error says so instead of "export the bundle again"."""
    import os
    import shutil

    bundle = os.path.join(os.fsencode(tmp_path), b"caf\xe9")
    shutil.copytree(tiny_bundle, os.fsdecode(bundle))
    out = subprocess.run([*EDGE, "generate", "--bundle", bundle, "--prompt", "x", "--max-tokens", "1"],
                         capture_output=True, timeout=120)
    assert out.returncode == 2
    line = out.stderr.decode("utf-8", "replace").strip().splitlines()[-1]
    assert "Traceback" not in out.stderr.decode("utf-8", "replace")
    assert "path is not UTF-8" in line and "rename the folder" in line and "export the bundle again" not in line, line


def test_config_paths_with_non_ascii_names_are_found_under_an_ascii_locale(tmp_path):
    """A config's paths are UTF-8 text (TOML): under LC_ALL=C PYTHONUTF8=0 `state_dir = "état 状态"`
    was a str Python could not encode, so the folder "did not exist" (`serve`: "model.bundle: ... is
    not a directory"; `audit --config`: "no audit log at ..." beside the log; `policy`: the
    classifier's bundle "no such folder", its program "no such file")."""
    import json

    base = tmp_path / "ü 設定"
    state = base / "état 状态"
    state.mkdir(parents=True)
    event = {"ts": 1796321759.324, "request_id": "r1", "client_id": "c1", "mode": "complete", "rule": "kein-passwort",
             "action": "refuse", "where": "input", "text_sha256": "0" * 64}
    (state / "audit.jsonl").write_text(json.dumps(event) + "\n", encoding="utf-8")
    config = base / "cönfig.toml"
    config.write_text('# Gerät — 設定\n[model]\nbundle = "bündle"\n[mqtt]\nbroker = "mqtt://127.0.0.1:1883"\n'
                      'device_id = "dev1"\n[service]\nstate_dir = "état 状态"\n', encoding="utf-8")
    out = subprocess.run([*EDGE, "audit", "--config", str(config)], capture_output=True, timeout=120,
                         env=ascii_locale_env())
    assert out.returncode == 0, out.stderr.decode("utf-8", "replace")
    assert b"rule=kein-passwort" in out.stdout and b"1 events" in out.stderr, (out.stdout, out.stderr)
    # and a policy's classifier bundle, relative to the policy file, the same way
    (base / "bündle").mkdir()
    policy = base / "pölicy.toml"
    policy.write_text('version = 1\n[classifier]\nbundle = "bündle"\nblock_labels = ["unsafe"]\n', encoding="utf-8")
    checked = subprocess.run([*EDGE, "policy", str(policy)], capture_output=True, timeout=120, env=ascii_locale_env())
    assert checked.returncode == 0, checked.stderr.decode("utf-8", "replace")
    assert b"classifier: bundle " + str(base / "bündle").encode("utf-8") in checked.stdout, checked.stdout
    # and a classifier program named in UTF-8 (with an argument in UTF-8)
    program = base / "prüfer.sh"
    program.write_text("#!/bin/sh\nexit 0\n", encoding="utf-8")
    program.chmod(0o755)
    policy.write_text(f'version = 1\n[classifier]\ncommand = ["{program}", "--modus=größer"]\n', encoding="utf-8")
    checked = subprocess.run([*EDGE, "policy", str(policy)], capture_output=True, timeout=120, env=ascii_locale_env())
    assert checked.returncode == 0, checked.stderr.decode("utf-8", "replace")


def test_export_with_non_ascii_paths_under_an_ascii_locale(tiny_checkpoint, tmp_path):
    """`export --checkpoint "modèles/ckpt 模型" --output "bündle"` under LC_ALL=C PYTHONUTF8=0: the
    checkpoint's tokenizer.json "cannot be read as a tokenizer ('utf-8' codec can't encode
    characters ...: surrogates not allowed)", and past that onnxruntime refused the KV cache's
    calibration graph and the fidelity session by path, and the fidelity step read config.json in the
    locale's encoding (a non-ASCII `_name_or_path`: UnicodeDecodeError); bundle.json recorded the
    calibration folder's name as lone surrogates (`"kalibrierung \\udcc3\\udcbc"`). The bundle is
    written and verifies."""
    import json
    import os
    import shutil

    checkpoint = tmp_path / "modèles" / "ckpt 模型"
    shutil.copytree(tiny_checkpoint, checkpoint)
    config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    config["_name_or_path"] = "/home/jörg/modèles/ckpt 模型"  # as save_pretrained records it
    (checkpoint / "config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    calibration = tmp_path / "kalibrierung ü"
    calibration.mkdir()
    (calibration / "grüße.py").write_text("".join(f"def f_{i}(x):\n    return x * {i} + 1\n" for i in range(40)),
                                          encoding="utf-8")
    with open(os.path.join(os.fsencode(calibration), b"bin\xe9.py"), "wb") as f:  # named under Latin-1, binary
        f.write(b"\xff\xfe\x00binary")
    output = tmp_path / "bündle"
    out = subprocess.run([*EDGE, "export", "--checkpoint", str(checkpoint), "--profile", "cpu-x86_64",
                          "--precision", "int8", "--output", str(output), "--fidelity-tokens", "4",
                          "--fidelity-corpus-tokens", "64", "--calibration-text", str(calibration),
                          "--calibration-tokens", "4000"], capture_output=True, timeout=300, env=ascii_locale_env())
    assert out.returncode == 0, out.stderr.decode("utf-8", "replace")[-2000:]
    assert b"PASSED" in out.stdout, out.stdout
    # bundle.json names them as text: no lone surrogates, which strict JSON parsers refuse
    manifest = (output / "bundle.json").read_bytes()
    assert b"\\ud" not in manifest, manifest
    calibrated = json.loads(manifest)["quantization"]["calibration"]
    assert calibrated["text"] == "kalibrierung ü" and calibrated["skipped_files"] == ["bin\ufffd.py"], calibrated
    verify = subprocess.run([*EDGE, "verify", "--bundle", str(output)], capture_output=True, timeout=120)
    assert verify.returncode == 0, verify.stderr


def test_a_relative_xdg_state_home_is_ignored(tmp_path):
    """XDG_STATE_HOME=state (relative, which the XDG Base Directory spec says to ignore) put the
    default state directory, reply store and audit log under whatever folder the daemon was
    started from; `audit` looked there too. Now ~/.local/state/edge-runtime, as with it unset."""
    import os

    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    home.mkdir()
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("STATE_DIRECTORY", "XDG_STATE_HOME")}
    env.update(HOME=str(home), XDG_STATE_HOME="state")
    out = subprocess.run([*EDGE, "audit"], capture_output=True, text=True, timeout=60, env=env, cwd=elsewhere)
    assert out.returncode == 0, out.stderr
    assert f"no audit log at {home}/.local/state/edge-runtime/audit.jsonl" in out.stderr, out.stderr


def as_user_without_a_home(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    """`args` with no $HOME as user id 12345, which the user database lacks (`docker run --user
    12345`): a user namespace mapping 12345 to this user, so the files stay readable."""
    import os
    import shutil

    import pytest

    unshare = shutil.which("unshare")
    probe = subprocess.run([unshare or "unshare", "-U", "--map-user=12345", "--map-group=12345", "true"],
                           capture_output=True) if unshare else None
    if probe is None or probe.returncode != 0:
        pytest.skip("no user namespaces here (unshare -U --map-user)")
    env = {k: v for k, v in os.environ.items() if k not in ("HOME", "STATE_DIRECTORY", "XDG_STATE_HOME")}
    return subprocess.run([unshare, "-U", "--map-user=12345", "--map-group=12345", *args], capture_output=True,
                          text=True, env=env, **kwargs)


def test_no_home_and_a_user_the_user_database_lacks(tiny_bundle):
    """`serve` without a state_dir, and `audit`, stopped with RuntimeError "Could not determine
    home directory." (Path.home()). `serve` now names the key to set, before loading the bundle;
    `audit` looks in the service's state directory alone."""
    served = as_user_without_a_home([*EDGE, "serve", "--bundle", str(tiny_bundle), "--broker", "mqtt://127.0.0.1:9",
                                     "--device-id", "d"], timeout=120)
    assert served.returncode == 2, served.stderr
    assert last_line(served).startswith("error: service.state_dir: no default state directory: $HOME is unset "
                                        "and user id 12345 has no home"), served.stderr
    audited = as_user_without_a_home([*EDGE, "audit"], timeout=60)
    assert audited.returncode == 0, audited.stderr
    assert "no audit log at /var/lib/edge-runtime/audit.jsonl" in audited.stderr, audited.stderr


def test_demo_model_without_a_home_names_what_to_set():
    """`demo-model` (scripts/quickstart.sh's first step) in a container run as a user id without a
    home stopped with RuntimeError "Could not determine home directory."."""
    out = as_user_without_a_home([*EDGE, "demo-model"], timeout=120)
    assert out.returncode == 2, out.stderr
    assert last_line(out).startswith("error: no cache folder for the demo model: $HOME is unset") and \
        "--cache-dir" in last_line(out), out.stderr


def test_errors_are_written_in_utf8_under_an_ascii_locale(tmp_path):
    """stdout was UTF-8 whatever the locale, stderr not: under LC_ALL=C PYTHONUTF8=0 (or
    PYTHONIOENCODING=ascii) a policy error naming the rule `kein-passwört` said
    `kein-passw\\xf6rt`."""
    import os

    policy = tmp_path / "policy.toml"
    policy.write_text('version = 1\n' + '[[rules]]\nname = "kein-passwört"\naction = "refuse"\nphrases = ["x"]\n' * 2,
                      encoding="utf-8")
    for env in (ascii_locale_env(), {**os.environ, "PYTHONIOENCODING": "ascii"}):
        out = subprocess.run([*EDGE, "policy", str(policy)], capture_output=True, timeout=60, env=env)
        assert out.returncode == 2
        assert "rules[1] ('kein-passwört'): name: another rule has the same name" in out.stderr.decode("utf-8"), \
            out.stderr


def test_onnxruntime_keeps_no_telemetry_in_the_home(tiny_bundle, tmp_path):
    """onnxruntime's wheels collect telemetry on Linux: loading a bundle wrote a persistent device id
    and an event queue (onnxruntime.db, megabytes after a day) under
    $HOME/.cache/Microsoft/DeveloperTools: for the installed service, in its state directory (the
    service user's home), uploaded to Microsoft whenever the device reaches the Internet. The
    runtime and the unit set ORT_DISABLE_TELEMETRY=1; a user who sets it to 0 still opts in."""
    import os

    from edge_runtime.install_service import render_unit

    # onnxruntime collects nothing where CI is set (as in .ci/run), whatever ORT_DISABLE_TELEMETRY says
    env = {k: v for k, v in os.environ.items() if k not in ("ORT_DISABLE_TELEMETRY", "CI")}
    homes = {}
    for name, extra in (("default", {}), ("opted-in", {"ORT_DISABLE_TELEMETRY": "0"})):
        homes[name] = home = tmp_path / name
        home.mkdir()
        out = subprocess.run([*EDGE, "generate", "--bundle", str(tiny_bundle), "--prompt", "x", "--max-tokens", "1"],
                             capture_output=True, text=True, timeout=120, env={**env, **extra, "HOME": str(home)})
        assert out.returncode == 0, out.stderr
    assert sorted(p.relative_to(homes["default"]).as_posix() for p in homes["default"].rglob("*")) == []
    assert (homes["opted-in"] / ".cache" / "Microsoft" / "DeveloperTools").is_dir()  # what the variable stops
    environment = [line for line in render_unit().splitlines() if line.startswith("Environment=")]
    assert any("ORT_DISABLE_TELEMETRY=1" in line.split("=", 1)[1].split() for line in environment), environment


def test_export_stopped_by_sigterm_or_sighup_leaves_nothing(tiny_checkpoint, tmp_path):
    """`timeout 1h edge-runtime export ...`, a cancelled CI job (SIGTERM) or a dropped ssh session
    (SIGHUP) killed the export on the spot: `OUTPUT.partial/` (as large as the bundle) and the
    folders made for --output stayed. Now they end it as Ctrl-C does: nothing left, one line,
    exit 128 + the signal."""
    import signal

    for signum in (signal.SIGTERM, signal.SIGHUP):
        output = tmp_path / signum.name / "sub" / "bundle"
        proc = subprocess.Popen([*EDGE, "export", "--checkpoint", str(tiny_checkpoint), "--profile", "cpu-x86_64",
                                 "--precision", "int8", "--skip-fidelity", "--output", str(output)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        seen = []
        for line in proc.stderr:  # the build step has begun: the staging folder holds files
            seen.append(line)
            if line.startswith("[2/4]"):
                break
        proc.send_signal(signum)
        rest = proc.stderr.read()
        assert proc.wait(timeout=120) == 128 + signum, "".join(seen) + rest
        assert "Traceback" not in rest and rest.strip().splitlines()[-1] == f"error: interrupted ({signum.name})", rest
        assert not (tmp_path / signum.name).exists(), sorted(str(p) for p in (tmp_path / signum.name).rglob("*"))
