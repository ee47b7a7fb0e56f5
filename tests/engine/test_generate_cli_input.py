"""What `edge-runtime generate` does with odd input on its command line and stdin: the
text that is not text, and the flags it cannot honour, stop at the command line (exit 2,
one line naming the flag) before the bundle is loaded, as README's "Generate on this
machine" says; `/nonexistent` as the bundle proves that nothing was loaded."""

from __future__ import annotations

import subprocess
import sys

import pytest

GENERATE = [sys.executable, "-m", "edge_runtime", "generate", "--bundle", "/nonexistent"]


def generate(*args: str | bytes, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*GENERATE, *args], input=stdin, capture_output=True, timeout=120)


def one_line_error(out: subprocess.CompletedProcess) -> str:
    err = out.stderr.decode("utf-8", "replace")
    assert "Traceback" not in err and "/nonexistent" not in err, err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize("flag", ["--prompt", "--prefix", "--suffix", "--stop"])
def test_a_flag_whose_bytes_are_not_utf8_is_refused_before_the_load(flag):
    """Latin-1 bytes in argv reach Python as lone surrogates (U+DC80-U+DCFF): a flag error, not
    a model's "lone surrogate" complaint after a minute of loading."""
    text = b"caf\xe9"
    extra = {"--prompt": [], "--prefix": ["--suffix", ""], "--suffix": ["--prefix", "x"], "--stop": ["--prompt", "x"]}
    out = generate(flag, text, *extra[flag])
    assert out.returncode == 2
    line = one_line_error(out)
    assert f"argument {flag}:" in line and "not valid UTF-8" in line and "0xe9" in line, line


def test_messages_on_stdin_that_are_not_utf8_are_refused_before_the_load():
    out = generate("--messages", "-", stdin=b'[{"role": "user", "content": "caf\xe9"}]')
    assert out.returncode == 2
    line = one_line_error(out)
    assert line.startswith("error: --messages -:") and "UTF-8" in line and "0xe9" in line, line


def test_messages_with_a_lone_surrogate_escape_are_refused_before_the_load():
    """JSON can spell a lone surrogate ("\\ud800"); it is not text."""
    out = generate("--messages", "-", stdin=b'[{"role": "user", "content": "a\\ud800"}]')
    assert out.returncode == 2
    line = one_line_error(out)
    assert line.startswith("error: --messages -: messages[0].content") and "U+D800" in line, line


def test_more_stop_strings_than_the_protocol_takes_are_refused_before_the_load():
    """`--stop` says "at most 16": generate honours it as `ask`'s daemon does, not only over MQTT."""
    from edge_runtime.protocol import MAX_STOP_SEQUENCES

    stops = [arg for i in range(MAX_STOP_SEQUENCES + 1) for arg in ("--stop", f"s{i}")]
    out = generate("--prompt", "x", *stops)
    assert out.returncode == 2
    line = one_line_error(out)
    assert f"at most {MAX_STOP_SEQUENCES}" in line and f"got {MAX_STOP_SEQUENCES + 1}" in line, line
    fine = generate("--prompt", "x", *stops[:-2])  # 16 pass the flags and reach the (missing) bundle
    assert fine.returncode == 2 and "/nonexistent" in fine.stderr.decode()


def test_a_messages_file_saved_with_a_byte_order_mark_is_read(tmp_path):
    """Windows editors (Notepad) save UTF-8 with a BOM; json refused it ("Unexpected UTF-8 BOM").
    Read, the file gets as far as the (missing) bundle; the same file without its messages'
    closing bracket shows the JSON is parsed after the BOM, not skipped."""
    path = tmp_path / "chat.json"
    path.write_bytes(b'\xef\xbb\xbf[{"role": "user", "content": "Reverse a list"}]')
    out = generate("--messages", str(path))
    assert out.returncode == 2 and "/nonexistent" in out.stderr.decode(), out.stderr
    path.write_bytes(b'\xef\xbb\xbf[{"role": "user", "content": "Reverse a list"}')
    line = one_line_error(generate("--messages", str(path)))
    assert line.startswith(f"error: --messages {path}: Expecting") and "BOM" not in line, line


def test_an_empty_prompt_is_refused_at_the_command_line_as_the_daemon_refuses_it():
    """`--prompt "$UNSET"`: the protocol refuses an empty prompt ("prompt must not be empty"), so
    `ask` failed only after reaching the daemon and `generate` sampled from bos alone. Both stop
    at the command line. Whitespace is text and passes."""
    from edge_runtime.protocol import ProtocolError, parse_request

    with pytest.raises(ProtocolError, match="prompt must not be empty"):  # the daemon's rule
        parse_request(b'{"id": "r1", "mode": "complete", "prompt": ""}')
    out = generate("--prompt", "")
    assert out.returncode == 2
    line = one_line_error(out)
    assert line == "error: --prompt is empty: give the text to complete", line
    spaces = generate("--prompt", " ")
    assert spaces.returncode == 2 and "/nonexistent" in spaces.stderr.decode()


def ascii_locale_env() -> dict[str, str]:
    """An ASCII locale with Python's UTF-8 mode off (`LC_ALL=C PYTHONUTF8=0`): a CI job or a
    minimal container that sets the C locale and pins the legacy behaviour; every byte above
    0x7f on the command line then reaches Python as a surrogate escape."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "LANG", "PYTHONIO"))}
    env.update(LC_ALL="C", PYTHONUTF8="0")
    return env


def test_utf8_text_on_the_command_line_is_read_under_an_ascii_locale(tiny_bundle):
    """`--prompt 'def grüße(名前):'` under LC_ALL=C with UTF-8 mode off was refused as "not valid
    UTF-8: byte 0xc3", though it is. The prompt's token ids are the ones a UTF-8 locale gives (the
    tokenizer's, with the umlauts and CJK characters); bytes that are not UTF-8 are still refused."""
    import json
    import os

    prompt = "def grüße(名前):"
    args = [sys.executable, "-m", "edge_runtime", "generate", "--bundle", str(tiny_bundle), "--prompt", prompt,
            "--max-tokens", "1", "--temperature", "0", "--json"]
    ids = {}
    for name, env in (("utf-8", {**os.environ, "LC_ALL": "C.UTF-8"}), ("ascii", ascii_locale_env())):
        out = subprocess.run(args, capture_output=True, timeout=120, env=env)
        assert out.returncode == 0, (name, out.stderr.decode("utf-8", "replace"))
        ids[name] = json.loads(out.stdout)["prompt_token_ids"]
    assert ids["ascii"] == ids["utf-8"], ids
    from tokenizers import Tokenizer

    assert Tokenizer.from_file(str(tiny_bundle / "tokenizer.json")).decode(ids["ascii"]) == prompt, ids
    bad = subprocess.run([*GENERATE, "--prompt", b"caf\xe9"], capture_output=True, timeout=120, env=ascii_locale_env())
    assert bad.returncode == 2
    line = one_line_error(bad)
    assert "not valid UTF-8" in line and "0xe9" in line, line
