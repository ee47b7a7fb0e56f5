"""`edge-runtime install-service`: put the daemon in its places as a systemd service.

What it does, each step printed as done or skipped (idempotent: a second run with
the same arguments changes nothing and says so, except that an installed bundle whose
files no longer match their hashes is copied again):

1. the system user ``edge-runtime`` (``useradd --system``; skipped if it exists);
2. the unit ``/etc/systemd/system/edge-runtime.service``, its ``ExecStart=``
   pointing at the console script of the environment this command runs from
   (a venv under ``/opt/edge-runtime/venv`` is the documented place);
3. for a GPU profile (one whose execution providers go beyond the CPU: nvidia-gpu,
   jetson-*), the drop-in ``edge-runtime.service.d/gpu.conf`` with the NVIDIA
   device access; a CPU profile removes a drop-in left by an earlier run. The
   profile that decides is ``--profile``, else the ``[model] profile`` of the
   installed config, else the bundle's own (what the daemon will run);
4. the bundle, verified first as the daemon verifies it at start (size and SHA-256
   of every file, `bundle.load_bundle`; a bundle that fails is refused before
   anything is changed, as is one over the memory budget of the profile the daemon will
   run, unless the kept config sets [model] check_memory = false), then bundle.json and the files it lists (nothing else) copied to
   ``/opt/edge-runtime/bundles/<name>`` through a new folder renamed into place
   (root-owned and read-only to the service under ``ProtectSystem=strict``);
5. a ``--profile`` given as a TOML file, copied to ``/etc/edge-runtime/profiles/``
   (the service reads neither the operator's home nor paths relative to where this ran);
6. ``/etc/edge-runtime/config.toml`` from the sample, with [model] filled in,
   only if there is none (an existing config is never overwritten; a warning says
   when its [model] profile or bundle differs from what this run installs, and one that
   is not valid TOML is refused, as the daemon would refuse it);
7. ``systemctl daemon-reload`` (when a unit file changed, or systemd holds older ones) and
   ``systemctl enable edge-runtime``, only on the live system (``--root /``)
   with systemd running. It does not start the service: edit [mqtt] first.

``--root DIR`` installs into an image or a test tree (DIR/etc/passwd and
DIR/etc/group must be the image's own: ``useradd --prefix`` adds the user there);
``--dry-run`` prints what would be done and changes nothing. A check that would stop
a real run (a bundle that fails verification, an executable the unit hides or that is
not there) is shown as a warning in the plan, and the dry run then fails with it.

``--uninstall`` stops and disables the service (live systemd only), removes the unit
and the GPU drop-in, and keeps the config, the state directory, the bundles and the
user, saying how to remove each by hand.

The unit, drop-in and sample config are the
files in the repository's ``systemd/`` folder, kept here so an installed wheel
carries them (tests/system/test_systemd_units.py checks they are identical).
"""

from __future__ import annotations

import argparse
import grp
import importlib.resources
import json
import os
import pwd
import shlex
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from .config import SERVICE_STATE_DIR
from .durable_files import exchange_paths, fsync_path, fsync_tree, write_file_durably
from .errors import BundleError, ConfigError, EdgeRuntimeError
from .interrupts import Terminated, terminate_as_interrupt
from .memory_fit import human_bytes
from .native_paths import native_path
from .profiles import is_profile_path
from .request_flags import empty_flag

__all__ = [
    "BUNDLES_DIR",
    "DEFAULT_EXECUTABLE",
    "SERVICE_USER",
    "DryRunRefused",
    "add_arguments",
    "install_service",
    "is_gpu_profile",
    "render_config",
    "render_gpu_dropin",
    "render_unit",
    "run_install_service",
    "uninstall_service",
]

SERVICE_NAME = "edge-runtime"
SERVICE_USER = "edge-runtime"
STATE_DIR = str(SERVICE_STATE_DIR)
DEFAULT_EXECUTABLE = "/opt/edge-runtime/venv/bin/edge-runtime"
BUNDLES_DIR = "/opt/edge-runtime/bundles"
UNIT_FILE = "etc/systemd/system/edge-runtime.service"
GPU_DROPIN_FILE = "etc/systemd/system/edge-runtime.service.d/gpu.conf"
CONFIG_FILE = "etc/edge-runtime/config.toml"
PROFILES_DIR = "etc/edge-runtime/profiles"  # a --profile given as a TOML file is installed here
# What --uninstall keeps (data and the operator's files), with what each holds.
KEPT_ON_UNINSTALL = (("etc/edge-runtime", "the config, MQTT password and CA"),
                     (STATE_DIR.lstrip("/"), "the state: audit log, reply store"),
                     ("var/cache/edge-runtime", "the GPU caches: TensorRT engines, CUDA's JIT cache"),
                     (BUNDLES_DIR.lstrip("/"), "the bundles"))
GPU_GROUPS = ("video", "render")
# Directories the unit hides from the service (ProtectHome=, PrivateTmp=): its
# interpreter and code must live elsewhere.
HIDDEN_PREFIXES = ("/home", "/root", "/run/user", "/tmp", "/var/tmp")

# -- the files of systemd/, shipped as package data (edge_systemd) -------------------------
def _systemd_file(name: str) -> str:
    return importlib.resources.files("edge_systemd").joinpath(name).read_text(encoding="utf-8")


UNIT_TEMPLATE = _systemd_file("edge-runtime.service")
GPU_DROPIN_TEMPLATE = _systemd_file("edge-runtime-gpu.conf")
CONFIG_TEMPLATE = _systemd_file("config.toml")


# -- rendering ------------------------------------------------------------------------------
def _unit_quote(path: str) -> str:
    """The ExecStart= program `path` as a unit file spells it: `%` starts a specifier there (`%%`
    is one), and a path with a space is double-quoted (systemd substitutes no `$` in the program)."""
    word = path.replace("%", "%%")
    return f'"{word}"' if any(c.isspace() for c in word) else word


def render_unit(executable: str | os.PathLike[str] = DEFAULT_EXECUTABLE) -> str:
    """The unit with ``ExecStart=`` running `executable` (an absolute path)."""
    executable = os.fspath(executable)
    if not os.path.isabs(executable):
        raise ConfigError(f"the ExecStart= executable must be an absolute path, got {executable!r}")
    text = native_path(executable)  # the unit file is UTF-8, whatever the locale Python runs in
    if text is None or any(c in "\"'\\" or not c.isprintable() and c != " " for c in text):
        raise ConfigError(f"the ExecStart= executable {executable!r} has characters systemd refuses in a program's "
                          "path (quotes, backslashes, control characters, bytes that are not UTF-8): install the "
                          "venv under another path")
    executable = text
    old = f"ExecStart={DEFAULT_EXECUTABLE} "
    assert old in UNIT_TEMPLATE
    return UNIT_TEMPLATE.replace(old, f"ExecStart={_unit_quote(executable)} ")


def render_gpu_dropin(available_groups: set[str] | None = None) -> str:
    """The GPU drop-in; with `available_groups`, ``SupplementaryGroups=`` keeps only
    those (systemd refuses to start a unit naming a group the system lacks)."""
    if available_groups is None:
        return GPU_DROPIN_TEMPLATE
    line = "SupplementaryGroups=" + " ".join(GPU_GROUPS)
    kept = [g for g in GPU_GROUPS if g in available_groups]
    new = f"SupplementaryGroups={' '.join(kept)}" if kept else "# SupplementaryGroups=: neither video nor render exists here"
    return GPU_DROPIN_TEMPLATE.replace(line, new)


def _toml_string(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid TOML basic string


def render_config(bundle: str | os.PathLike[str] | None, profile: str | None) -> str:
    """The sample config with [model] bundle (and profile, when given) filled in."""
    text = CONFIG_TEMPLATE
    if bundle is not None:
        old = f'bundle = "{BUNDLES_DIR}/model"'
        assert old in text
        path = native_path(bundle)  # the file is UTF-8, whatever the locale (install_service checks the name)
        text = text.replace(old, f"bundle = {_toml_string(path if path is not None else os.fspath(bundle))}")
    if profile is not None:
        old = '# profile = "cpu-x86_64"'
        assert old in text
        text = text.replace(old, f"profile = {_toml_string(profile)}")
    return text


# -- facts ----------------------------------------------------------------------------------
def is_gpu_profile(profile: str) -> bool:
    """True when the profile runs on an accelerator (any provider besides the CPU's). The
    profile is loaded (a packaged name or a TOML path); an unknown one raises `ConfigError`."""
    from .profiles import load_profile

    return any(name != "CPUExecutionProvider" for name in load_profile(profile).provider_names)


def _gpu_by_name(profile: str) -> bool:
    """Whether a profile's name says GPU (nvidia-gpu, jetson-*), for one that cannot be loaded."""
    stem = Path(profile).stem
    return stem == "nvidia-gpu" or stem.startswith("jetson-")


def _executable_problem(path: Path) -> str | None:
    for prefix in HIDDEN_PREFIXES:
        if path == Path(prefix) or Path(prefix) in path.parents:
            return (f"{path} is under {prefix}, which the unit hides from the service "
                    f"(ProtectHome=/PrivateTmp=)")
    return None


def _interpreter_of(script: Path) -> Path | None:
    try:
        with open(script, "rb") as f:
            first = f.readline(4096)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    words = first[2:].decode(errors="replace").split()
    return Path(words[0]) if words else None


def _locate_console_script() -> Path:
    """The console script of the running environment, unchecked (`ConfigError` if none)."""
    candidates = [Path(sysconfig.get_path("scripts")) / SERVICE_NAME,
                  Path(sys.executable).parent / SERVICE_NAME]
    found = shutil.which(SERVICE_NAME)
    if found:
        candidates.append(Path(found))
    script = next((c for c in candidates if c.is_file() and os.access(c, os.X_OK)), None)
    if script is None:
        raise ConfigError(f"cannot find the {SERVICE_NAME} console script next to {sys.executable}; "
                          f"pass --executable PATH")
    return script.absolute()


def _console_script_problem(script: Path) -> str | None:
    """Why the service could not run `script`, or None: neither it, the interpreter its
    ``#!`` line names (symlinks resolved), nor this package's code may sit where the unit
    hides files (/home, /root, /tmp, ...)."""
    checks = [script, Path(os.path.realpath(script))]
    interpreter = _interpreter_of(script)
    if interpreter is not None:
        checks.append(Path(os.path.realpath(interpreter)))
    checks.append(Path(__file__).resolve())
    for path in checks:
        problem = _executable_problem(path)
        if problem:
            return (f"{problem}. Install into a venv the service can see: python3 -m venv "
                    f"{Path(DEFAULT_EXECUTABLE).parent.parent} && {Path(DEFAULT_EXECUTABLE).parent}/pip install "
                    f"'/path/to/edge-runtime[cpu]' (the source folder), then run {DEFAULT_EXECUTABLE} "
                    f"install-service (or pass --executable)")
    return None


def _systemd_running() -> bool:
    return Path("/run/systemd/system").is_dir()


def _is_live(root: Path) -> bool:
    """Whether `root` is this machine's own / (systemctl is run only there)."""
    return root.resolve() == Path("/")


def _same_path(a: Path, b: Path) -> bool:
    return os.path.normpath(a) == os.path.normpath(b)


def _manifest_profile(manifest: dict[str, Any] | None) -> str | None:
    """The profile name a bundle manifest records, if any."""
    section = manifest.get("profile") if isinstance(manifest, dict) else None
    name = section.get("name") if isinstance(section, dict) else None
    return name if isinstance(name, str) else None


@dataclass(frozen=True)
class _KeptConfig:
    """What an installed config says, as far as install-service needs it."""

    model_bundle: str | None
    model_profile: str | None
    state_dir: str | None
    bundle_sha256: str | None = None  # [model] bundle_sha256: the pinned bundle.json
    check_memory: bool = True  # [model] check_memory: false starts a bundle over the profile's budget
    readable: bool = True  # False: the file exists but is not valid TOML
    problem: str = ""  # why it is not readable


class DryRunRefused(ConfigError):
    """A dry run listed its plan, but a real run would stop at `problems`."""

    def __init__(self, problems: list[EdgeRuntimeError], steps: list[str]) -> None:
        self.problems = problems
        self.steps = steps
        super().__init__("dry run: a real run would stop: " + "; ".join(str(p) for p in problems))


def _names_in(db_file: Path) -> set[str] | None:
    """User or group names in a passwd/group file, None if it cannot be read."""
    try:
        text = db_file.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    return {line.split(":", 1)[0] for line in text.splitlines() if line and not line.startswith("#")}


def _tree_signature(root: Path) -> dict[str, tuple[int, int]]:
    """Relative path -> (size, mtime in ns) of every file under `root`."""
    sig = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            st = path.stat()
            sig[path.relative_to(root).as_posix()] = (st.st_size, st.st_mtime_ns)
    return sig


def _make_dirs(path: Path) -> None:
    """Create `path` and its missing parents, each mode 0755 whatever root's umask (a hardened
    umask 027 or 077 made /etc/edge-runtime or /opt/edge-runtime root-only: the service user
    could reach neither its config nor its bundle). Folders that exist are left as they are."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        folder.mkdir()
        os.chmod(folder, 0o755)
        fsync_path(folder.parent)  # its name, on the disk


def _bundle_files(source: Path, manifest: dict[str, Any]) -> dict[str, Path]:
    """What installing a verified bundle copies: bundle.json and the files it lists (relative
    path -> the file, resolved inside the bundle as verification resolved it). Nothing else:
    the daemon reads no other file, and a link among the rest may point anywhere (a root-only
    file copied world-readable) or nowhere."""
    from .bundle import MANIFEST_NAME, safe_relative_path

    files = {MANIFEST_NAME: source / MANIFEST_NAME}
    for entry in manifest["files"]:
        files[PurePosixPath(entry["path"]).as_posix()] = safe_relative_path(source, entry["path"], what="file")
    return files


def _files_signature(files: dict[str, Path]) -> dict[str, tuple[int, int]]:
    """`_tree_signature` of the files `_bundle_files` names, as a copy of them has it."""
    stats = {name: path.stat() for name, path in sorted(files.items())}
    return {name: (st.st_size, st.st_mtime_ns) for name, st in stats.items()}


# -- the installer --------------------------------------------------------------------------
class _Installer:
    def __init__(self, root: Path, dry_run: bool, run: Callable[..., subprocess.CompletedProcess],
                 report: Callable[[str], None] | None) -> None:
        self.root = root
        self.live = _is_live(root)
        self.dry_run = dry_run
        self.run = run
        self.report = report
        self.steps: list[str] = []
        self.problems: list[EdgeRuntimeError] = []
        self.changed = False
        self.units_changed = False
        self.removed: set[Path] = set()  # by this run (a dry run: would be)

    def target(self, relative: str) -> Path:
        return self.root / relative

    def shown(self, path: Path) -> str:
        """A target path as it will be on the installed system."""
        return "/" + path.relative_to(self.root).as_posix()

    def on_target(self, value: str, base: Path) -> Path:
        """A path named on the installed system (absolute, or relative to `base`) in this tree."""
        return self.target(value.lstrip("/")) if value.startswith("/") else base / value

    def step(self, message: str, *, changes: bool = False) -> None:
        if changes:
            self.changed = True
        self.steps.append(message)
        if self.report is not None:
            self.report(message)

    def did(self, what: str, done: str, would: str) -> None:
        self.step(f"{what}: {'would ' + would if self.dry_run else done}", changes=True)

    def refuse(self, problem: EdgeRuntimeError) -> None:
        """A check a real run stops at: raised now, or in a dry run shown as a warning (the
        plan goes on, and `finish` fails with it)."""
        if not self.dry_run:
            raise problem
        self.problems.append(problem)
        self.step(f"warning: a real run would stop here: {problem}")

    def require_root(self, what: str) -> None:
        if self.live and not self.dry_run and os.geteuid() != 0:
            raise ConfigError(f"{what}: run it as root (or with --dry-run to see what it would do)")
        if not self.root.is_dir():
            raise ConfigError(f"--root {self.root} is not a directory")

    def finish(self, nothing_to_do: str) -> list[str]:
        if self.problems:
            self.step("dry run: nothing was changed; a real run would stop (see the warnings above)")
            raise DryRunRefused(self.problems, self.steps)
        if not self.changed:
            self.step(nothing_to_do)
        elif self.dry_run:
            self.step("dry run: nothing was changed")
        return self.steps

    def command(self, argv: list[str]) -> subprocess.CompletedProcess:
        try:
            return self.run(argv, check=True, capture_output=True, text=True)
        except subprocess.CalledProcessError as exc:
            detail = (exc.stderr or exc.stdout or "").strip()
            raise EdgeRuntimeError(f"{shlex.join(argv)} failed (exit {exc.returncode})"
                                   f"{': ' + detail if detail else ''}") from None
        except FileNotFoundError as exc:
            raise EdgeRuntimeError(f"{argv[0]} not found: {exc}") from None

    def query(self, argv: list[str]) -> str:
        """The first line a read-only command prints (systemctl is-enabled ...), run even in a dry run."""
        return (self.run(argv, capture_output=True, text=True).stdout or "").strip()

    # -- facts
    def _named_in(self, lookup: Callable[[str], object], db_file: str) -> bool:
        """Whether the service's name is in a user database: `lookup` (pwd/grp) on the live
        system, the image's `db_file` under --root."""
        if self.live:
            try:
                lookup(SERVICE_USER)
                return True
            except KeyError:
                return False
        return SERVICE_USER in (_names_in(self.target(db_file)) or set())

    def group_exists(self) -> bool:
        return self._named_in(grp.getgrnam, "etc/group")

    def user_exists(self) -> bool:
        return self._named_in(pwd.getpwnam, "etc/passwd")

    def read_config(self) -> _KeptConfig | None:
        """The installed config's [model] bundle and profile and [service] state_dir; None if
        there is no config. One that cannot be read has `readable` False and the reason."""
        path = self.target(CONFIG_FILE)
        if not path.exists():
            return None
        from .typed_toml import parse_toml

        try:
            data = parse_toml(path.read_bytes(), source=self.shown(path))
        except (OSError, ConfigError) as exc:
            return _KeptConfig(model_bundle=None, model_profile=None, state_dir=None, readable=False,
                               problem=str(exc))

        def text(table: str, key: str) -> str | None:
            section = data.get(table)
            value = section.get(key) if isinstance(section, dict) else None
            return value if isinstance(value, str) else None

        model = data.get("model")
        return _KeptConfig(model_bundle=text("model", "bundle"), model_profile=text("model", "profile"),
                           state_dir=text("service", "state_dir"), bundle_sha256=text("model", "bundle_sha256"),
                           check_memory=not (isinstance(model, dict) and model.get("check_memory") is False))

    def config_bundle_profile(self, config: _KeptConfig) -> str | None:
        """The profile recorded by the bundle the installed config names, if it can be read."""
        from .bundle import read_manifest

        if config.model_bundle is None:
            return None
        try:
            manifest, _ = read_manifest(self.on_target(config.model_bundle, self.target(CONFIG_FILE).parent))
        except BundleError:
            return None
        return _manifest_profile(manifest)

    # -- steps
    def verify_bundle(self, source: Path) -> tuple[dict[str, Any] | None, str | None, Any]:
        """Verify `source` as the daemon does at start (`bundle.load_bundle`): its manifest and
        the manifest's SHA-256 (None when unreadable), and the verified `Bundle` (None when it
        failed). A failure is refused (`refuse`)."""
        from .bundle import listed_bytes, load_bundle, read_manifest

        try:
            manifest, manifest_sha = read_manifest(source)
        except BundleError as exc:
            self.refuse(exc)
            return None, None, None
        files = manifest.get("files") if isinstance(manifest.get("files"), list) else []
        self.step(f"bundle {source}: verifying the size and SHA-256 of its {len(files)} files "
                  f"({human_bytes(listed_bytes(manifest))}) against bundle.json, as the daemon does at start (a "
                  f"while for a large bundle)")
        try:
            bundle = load_bundle(source)
        except BundleError as exc:
            self.refuse(exc)
            return manifest, manifest_sha, None
        if bundle.manifest_sha256 != manifest_sha:  # still being copied or written: not the one described above
            self.refuse(BundleError(f"bundle {source}: bundle.json changed while it was verified; install it once "
                                    "it is complete"))
            return manifest, manifest_sha, None
        return bundle.manifest, manifest_sha, bundle

    def check_bundle_fits(self, bundle, profile: str, config: _KeptConfig | None) -> None:
        """Refuse (`refuse`) a bundle that does not fit `profile`'s memory budget, which the daemon
        refuses at start too (`memory_fit.check_bundle_fits`), unless the kept config sets
        [model] check_memory = false. A profile this run cannot load is left to the daemon."""
        from .memory_fit import MemoryBudgetExceeded, check_bundle_fits
        from .profiles import load_profile

        if config is not None and not config.check_memory:
            return
        try:
            loaded = load_profile(profile)
        except (ConfigError, ImportError):
            return
        try:
            check_bundle_fits(bundle, loaded)
        except MemoryBudgetExceeded as exc:
            self.refuse(ConfigError(f"bundle {bundle.root}: {exc}. The daemon checks this at start and would refuse "
                                    f"it (set [model] check_memory = false in {self.shown(self.target(CONFIG_FILE))} "
                                    "to start it anyway)"))

    def check_user_database(self) -> None:
        """Under --root, the image's etc/passwd and etc/group that `useradd --prefix` adds the
        user to (refused when missing and the user is not there yet)."""
        if self.live or self.user_exists():
            return
        missing = [name for name in ("etc/passwd", "etc/group") if not self.target(name).is_file()]
        if missing:
            self.refuse(ConfigError(
                f"--root {self.root} has no {' or '.join(missing)}: useradd --prefix adds {SERVICE_USER} to "
                f"the image's own user database (etc/passwd and etc/group; etc/shadow and etc/gshadow "
                f"too when present), so copy it into the tree first"))

    def ensure_user(self) -> None:
        if self.user_exists():
            self.step(f"user {SERVICE_USER}: exists, skipped")
            return
        # a group of the name left by an earlier `userdel` (it outlives the user while it has
        # members): join it, as `useradd --user-group` refuses to make it again
        group = ["--gid", SERVICE_USER] if self.group_exists() else ["--user-group"]
        argv = ["useradd", "--system", "--no-create-home", "--home-dir", STATE_DIR,
                "--shell", "/usr/sbin/nologin", *group, "--comment", "edge-runtime daemon", SERVICE_USER]
        if not self.live:
            argv[1:1] = ["--prefix", str(self.root)]
        if not self.dry_run:
            self.command(argv)
        self.did(f"user {SERVICE_USER}", f"created ({shlex.join(argv)})", f"create it ({shlex.join(argv)})")

    def ensure_file(self, relative: str, content: str, mode: int, *, overwrite: bool = True,
                    note_if_kept: str = "") -> bool:
        path = self.target(relative)
        shown = self.shown(path)
        if path.exists():
            try:
                same = path.read_text(encoding="utf-8") == content
            except (OSError, UnicodeDecodeError):
                same = False
            if same:
                self.step(f"{shown}: unchanged, skipped")
                return False
            if not overwrite:
                self.step(f"{shown}: exists, not overwritten{note_if_kept}")
                return False
            verb, would = "updated", "update it"
        else:
            verb, would = "installed", "install it"
        if not self.dry_run:
            _make_dirs(path.parent)
            # encoded first: a text that cannot be leaves no empty file; flushed before and after
            # the rename, so that a power cut after this run finds the file whole (durable_files)
            write_file_durably(path, content.encode("utf-8"), mode)
        self.did(shown, verb, would)
        return True

    def remove_file(self, relative: str, why: str) -> bool:
        path = self.target(relative)
        if not path.exists():
            return False
        if not self.dry_run:
            path.unlink()
            fsync_path(path.parent)  # a power cut must not bring the removed unit or drop-in back
            if path.parent.name.endswith(".d"):
                try:
                    path.parent.rmdir()  # the drop-in folder, if now empty
                    fsync_path(path.parent.parent)
                except OSError:
                    pass
        self.removed.add(path)
        self.did(self.shown(path), f"removed ({why})", f"remove it ({why})")
        return True

    def bundle_destination(self, source: Path) -> Path:
        return self.target(BUNDLES_DIR.lstrip("/")) / source.name

    def install_bundle(self, source: Path, manifest: dict[str, Any]) -> Path:
        """Copy a verified bundle (bundle.json and the files it lists) into place: into a new
        folder, renamed over the old one only once complete (a running daemon keeps the files
        it mapped), the partial copy removed if the copy fails."""
        from .bundle import unlisted_files

        dest = self.bundle_destination(source)
        shown = self.shown(dest)
        if dest.resolve() == source:
            self.step(f"bundle {shown}: already in place, skipped")
            return dest
        files = _bundle_files(source, manifest)
        left_out = unlisted_files(source, manifest)
        if left_out:
            self.step(f"note: bundle {source}: {len(left_out)} files not listed in bundle.json are not installed "
                      f"(the daemon reads none of them): {', '.join(left_out[:5])}"
                      + (", ..." if len(left_out) > 5 else ""))
        if dest.is_dir() and _tree_signature(dest) == _files_signature(files):
            # the same names, sizes and times; the bytes may still have changed since (a bad SD
            # card, a copy over it that kept the times): the daemon would refuse it at every start
            from .bundle import MANIFEST_NAME, verify_files

            self.step(f"bundle {shown}: the same files as {source} by name, size and time; checking their SHA-256 "
                      "too (the installed copy may have changed since)")
            try:
                if (dest / MANIFEST_NAME).read_bytes() != (source / MANIFEST_NAME).read_bytes():
                    raise BundleError(f"its {MANIFEST_NAME} differs from the source's")
                verify_files(dest, manifest)
            except (BundleError, OSError) as exc:
                self.step(f"bundle {shown}: the installed copy fails verification ({exc}); copying it again")
            else:
                self.step(f"bundle {shown}: unchanged, skipped")
                return dest
        replacing = dest.exists()
        if not self.dry_run:
            _make_dirs(dest.parent)
            os.chmod(dest.parent, 0o755)
            tmp = dest.with_name(f".{dest.name}.tmp-install")
            old = dest.with_name(f".{dest.name}.old-install")
            for leftover in (tmp, old):
                if leftover.exists():
                    shutil.rmtree(leftover)
            try:
                tmp.mkdir(mode=0o755)
                for name, path in files.items():
                    target = tmp / name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, target)
                for path in [tmp, *tmp.rglob("*")]:  # readable by the service user, writable by root only
                    os.chmod(path, 0o755 if path.is_dir() else 0o644)
                    if self.live and os.geteuid() == 0:
                        os.chown(path, 0, 0)
                # every byte on the disk before the copy takes the name: without it, a power cut
                # in the seconds after this run could leave the installed bundle's files empty or
                # short (delayed allocation), and the daemon refuses such a bundle at every boot
                self.step(f"bundle {shown}: copied, now flushing it to the disk (minutes for a large bundle "
                          "on an SD card; do not cut the power before this command ends)")
                fsync_tree(tmp)
            except OSError as exc:
                shutil.rmtree(tmp, ignore_errors=True)
                raise ConfigError(f"cannot copy the bundle to {self.shown(tmp)}: "
                                  f"{exc.strerror or exc}{f' ({exc.filename})' if exc.filename else ''}; "
                                  f"{'the installed bundle is unchanged' if replacing else 'nothing installed'} "
                                  "and the partial copy removed") from None
            except BaseException:  # Ctrl-C, SIGTERM, SIGHUP (interrupts): no partial copy left either
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            if replacing and exchange_paths(tmp, dest):
                # one step: the name holds the old bundle or the new one at every moment (a
                # daemon starting then, a power cut then); the temporary name now holds the old
                fsync_path(dest.parent)
                shutil.rmtree(tmp)
            else:
                if replacing:
                    os.replace(dest, old)
                os.replace(tmp, dest)
                fsync_path(dest.parent)  # the renames, on the disk
                if replacing:
                    shutil.rmtree(old)
        self.did(f"bundle {shown}", f"{'replaced' if replacing else 'copied'} from {source}",
                 f"{'replace' if replacing else 'copy'} it from {source}")
        if replacing:
            self.step(f"note: a running {SERVICE_NAME} keeps serving the bundle it loaded until "
                      f"`systemctl restart {SERVICE_NAME}`")
        return dest

    def check_kept_config(self, config: _KeptConfig, profile: str | None, bundle_profile: str | None,
                          installed_bundle: Path | None, manifest_sha256: str | None = None) -> None:
        """Warn where the kept config makes the daemon run another profile or bundle than
        this run installs (it is never overwritten: the operator edits it)."""
        path = self.target(CONFIG_FILE)
        shown = self.shown(path)
        restart = f"then `systemctl restart {SERVICE_NAME}`"
        if installed_bundle is not None and config.model_bundle is not None:
            named = self.on_target(config.model_bundle, path.parent)
            if not _same_path(named, installed_bundle):
                wanted = self.shown(installed_bundle)
                self.step(f"warning: {shown} keeps [model] bundle = {_toml_string(config.model_bundle)}, not "
                          f"{_toml_string(wanted)}: the service loads the old bundle. Set bundle = "
                          f"{_toml_string(wanted)} in its [model], {restart}")
        if installed_bundle is not None and config.bundle_sha256 is not None and manifest_sha256 is not None \
                and config.bundle_sha256 != manifest_sha256:
            self.step(f"warning: {shown} pins [model] bundle_sha256 = {_toml_string(config.bundle_sha256)}, and "
                      f"this bundle's bundle.json is {manifest_sha256}: the service refuses it at start. Set "
                      f"bundle_sha256 = {_toml_string(manifest_sha256)} in its [model] (or remove the pin), {restart}")
        if profile is None:
            return
        if config.model_profile is not None:
            if config.model_profile != profile:
                self.step(f"warning: {shown} keeps [model] profile = {_toml_string(config.model_profile)}, not "
                          f"{_toml_string(profile)} as --profile asks: the service runs "
                          f"{config.model_profile}. Set profile = {_toml_string(profile)} in its [model], {restart}")
            return
        runs = self.config_bundle_profile(config)
        if runs is None and installed_bundle is not None and config.model_bundle is not None \
                and _same_path(self.on_target(config.model_bundle, path.parent), installed_bundle):
            runs = bundle_profile  # a dry run: the bundle it names is not copied yet
        if runs != profile:
            self.step(f"warning: {shown} sets no [model] profile, so the service runs its bundle's own "
                      f"({runs or 'unknown'}), not {_toml_string(profile)} as --profile asks. Add profile = "
                      f"{_toml_string(profile)} to its [model], {restart}")

    def systemctl(self) -> None:
        if not self.systemctl_here():
            return
        self.daemon_reload()
        state = self.query(["systemctl", "is-enabled", SERVICE_NAME])
        if state == "enabled":
            self.step(f"systemctl enable {SERVICE_NAME}: already enabled, skipped")
            return
        if not self.dry_run:
            self.command(["systemctl", "enable", SERVICE_NAME])
        self.did(f"systemctl enable {SERVICE_NAME}", "done (starts at boot; not started now)", "run it")

    def systemctl_here(self, what: str = "enable") -> bool:
        """Whether systemctl is run (live system, systemd running); says why not."""
        if not self.live:
            self.step(f"systemctl: skipped (--root {self.root}: {what} it on the device with "
                      f"`systemctl {what} {SERVICE_NAME}`)")
            return False
        if not _systemd_running():
            self.step(f"systemctl: skipped (systemd is not running here; {what} it with "
                      f"`systemctl {what} {SERVICE_NAME}` where it runs)")
            return False
        return True

    def daemon_reload(self) -> None:
        """When this run changed a unit file, or systemd holds an older one than the disk (a
        run stopped after writing the units and before reloading: the rerun finds them as
        it wants them, and only systemd's NeedDaemonReload tells)."""
        stale = not self.units_changed and self.query(
            ["systemctl", "show", "--property=NeedDaemonReload", "--value", SERVICE_NAME]) == "yes"
        if self.units_changed or stale:
            if not self.dry_run:
                self.command(["systemctl", "daemon-reload"])
            self.did("systemctl daemon-reload" + (" (systemd held older unit files)" if stale else ""), "done",
                     "run it")
        else:
            self.step("systemctl daemon-reload: skipped (no unit file changed)")

    def stop_and_disable(self) -> None:
        if self.query(["systemctl", "is-active", SERVICE_NAME]) in ("active", "activating", "reloading"):
            if not self.dry_run:
                self.command(["systemctl", "stop", SERVICE_NAME])
            self.did(f"systemctl stop {SERVICE_NAME}", "done", "run it")
        else:
            self.step(f"systemctl stop {SERVICE_NAME}: not running, skipped")
        state = self.query(["systemctl", "is-enabled", SERVICE_NAME])
        if state in ("", "disabled", "not-found", "static", "masked"):
            self.step(f"systemctl disable {SERVICE_NAME}: not enabled ({state or 'unknown'}), skipped")
            return
        if not self.dry_run:
            self.command(["systemctl", "disable", SERVICE_NAME])
        self.did(f"systemctl disable {SERVICE_NAME}", "done", "run it")

    def remove_enable_links(self) -> bool:
        """In an image tree, the links `systemctl enable` made (`systemctl disable` removes them live)."""
        removed = False
        for wants in sorted(self.target("etc/systemd/system").glob("*.wants")):
            link = wants / f"{SERVICE_NAME}.service"  # dangling in a tree: glob would not see it
            if link.is_symlink():
                if not self.dry_run:
                    link.unlink()
                self.did(self.shown(link), "removed (the enable link)", "remove it (the enable link)")
                removed = True
        return removed

    def report_kept(self, config: _KeptConfig | None) -> None:
        """Say what --uninstall leaves, and how to remove each by hand."""
        dropins = self.target(GPU_DROPIN_FILE).parent
        if dropins.is_dir():
            for path in sorted(set(dropins.iterdir()) - self.removed):  # a dry run's are still there
                self.step(f"{self.shown(path)}: kept (not installed by install-service); to remove it: rm {path}")
        kept = list(KEPT_ON_UNINSTALL)
        if config is not None and config.state_dir is not None:
            state = self.on_target(config.state_dir, self.target(CONFIG_FILE).parent)
            if not _same_path(state, self.target(STATE_DIR.lstrip("/"))):
                kept.append((os.path.relpath(state, self.root), "the state named by [service] state_dir"))
        for relative, what in kept:
            path = self.target(relative)
            if path.exists():
                self.step(f"{self.shown(path)}: kept ({what}); to remove it: rm -r {shlex.quote(str(path))}")
        if self.user_exists():
            userdel = ["userdel"] if self.live else ["userdel", "--prefix", str(self.root)]
            self.step(f"user {SERVICE_USER}: kept (it owns the state files); to remove it: "
                      f"{shlex.join([*userdel, SERVICE_USER])}")


def _running_profile(inst: _Installer, profile: str | None, config: _KeptConfig | None,
                     bundle_profile: str | None) -> tuple[str, str, str] | None:
    """The profile the daemon will run: `profile` if given, else the installed config's [model]
    profile, else the bundle's; as (what `load_profile` takes -- a TOML path of the installed
    system inside the tree --, its name as written, which of the three decided). None where it
    is not known (nothing names one, or the installed config cannot be read)."""
    if profile is not None:
        return profile, profile, "--profile"
    if config is not None and not config.readable:
        return None
    if config is not None and config.model_profile is not None:
        name = config.model_profile  # a TOML path names a file on the installed system
        loadable = str(inst.on_target(name, inst.root)) if name.startswith("/") else name
        return loadable, name, f"the [model] profile of {inst.shown(inst.target(CONFIG_FILE))}"
    if bundle_profile is not None:
        return bundle_profile, bundle_profile, "the bundle's own"
    return None


def _deciding_profile(inst: _Installer, running: tuple[str, str, str] | None, *, chosen: bool) -> bool | None:
    """Whether the service runs a GPU profile (None: not known, so the drop-in is left as it
    is), from `_running_profile`; `chosen`: --profile named it. Says which decided."""
    if running is None:
        return None
    loadable, name, source = running
    gpu = is_gpu_profile(loadable) if chosen else _loaded_kind(inst, loadable, name)
    if gpu is not None:
        inst.step(f"profile: {name} ({source}; {'a GPU' if gpu else 'a CPU'} profile)")
    return gpu


def _loaded_kind(inst: _Installer, loadable: str, name: str) -> bool | None:
    """`is_gpu_profile` of a profile this run did not choose; one it cannot load is GPU when
    its name says so (nvidia-gpu, jetson-*), else unknown (None, with a warning): a custom
    GPU profile this version cannot read must not lose its drop-in."""
    try:
        return is_gpu_profile(loadable)
    except (ConfigError, ImportError) as exc:
        if _gpu_by_name(name):
            return True
        inst.step(f"warning: cannot load profile {name} ({exc}): the GPU drop-in is left as it is; pass --profile "
                  "to decide it")
        return None


def _missing_program(inst: _Installer, path: Path) -> str | None:
    """Why `path` (absolute, on the installed system: in the --root tree) is no program
    systemd can run (status=203/EXEC at every start), or None. A symlink with an absolute
    target is followed inside the tree, as it will be on the device."""
    here = inst.target(str(path).lstrip("/"))
    for _ in range(40):
        if not here.is_symlink():
            break
        link = os.readlink(here)
        here = inst.target(link.lstrip("/")) if link.startswith("/") else here.parent / link
    where = "" if inst.live else f" in --root {inst.root} ({here})"
    if not here.exists():
        return f"{path} does not exist{where}: ExecStart= would fail with status=203/EXEC"
    if not here.is_file() or not os.access(here, os.X_OK):
        return f"{path} is not an executable file{where}: ExecStart= would fail with status=203/EXEC"
    return None


def _service_executable(inst: _Installer, executable: str | os.PathLike[str] | None) -> Path:
    """The ``ExecStart=`` program: `executable`, else this environment's console script; one
    the unit would hide is refused (in a dry run: a warning, and the plan goes on)."""
    if executable is not None:
        path = Path(executable)
        problem = _executable_problem(path) or _missing_program(inst, path)
        if problem:
            inst.refuse(ConfigError(f"--executable: {problem}"))
        return path
    try:
        script = _locate_console_script()
    except ConfigError as exc:
        inst.refuse(exc)
        return Path(DEFAULT_EXECUTABLE)
    problem = _console_script_problem(script)
    if problem:
        inst.refuse(ConfigError(problem))
    return script


def install_service(profile: str | None, bundle: Path | None, *, root: Path = Path("/"),
                    dry_run: bool = False, run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
                    executable: str | os.PathLike[str] | None = None,
                    report: Callable[[str], None] | None = None) -> list[str]:
    """Install the service (see the module docstring); returns the steps, one line each.

    `run` runs every external command (useradd, systemctl), so tests inject a fake.
    `executable` is the ``ExecStart=`` program (default: this environment's console script).
    `report`, when given, is called with each step as it happens. Checks come before
    any change; in a dry run a failed one is a warning, and `DryRunRefused` is raised
    once the whole plan is listed.
    """
    if executable is not None and not Path(executable).is_absolute():  # no plan can be shown without the unit
        raise ConfigError(f"--executable: {executable} is not an absolute path (ExecStart= needs one, e.g. "
                          f"{DEFAULT_EXECUTABLE})")
    inst = _Installer(Path(root).resolve(), dry_run, run, report)  # absolute: useradd --prefix needs it
    inst.require_root("install-service changes /etc, /opt and the user database")
    source = Path(bundle).resolve() if bundle is not None else None
    if source is not None and source.exists() and not source.is_dir():
        from .bundle import MANIFEST_NAME

        folder = source.parent
        raise BundleError(f"--bundle {bundle} is a file, not the bundle folder: " + (
            f"give the folder it is in, --bundle {folder}" if (folder / MANIFEST_NAME).is_file()
            else f"give the folder that holds {MANIFEST_NAME} and the files it lists"))
    if source is not None and not source.is_dir():
        raise BundleError(f"bundle folder {bundle} does not exist")
    if profile is not None:
        is_gpu_profile(profile)  # an unknown profile is an error before anything else
    # the cheap checks first: hashing a large bundle takes minutes
    inst.check_user_database()
    exec_path = _service_executable(inst, executable)
    unit = render_unit(exec_path)  # refuses a path systemd would refuse, before any change
    if source is not None and native_path(source.name) is None:
        raise BundleError(f"bundle folder {bundle}: its name is not UTF-8 text ({os.fsencode(source.name)!r}): the "
                          "config names the bundle in UTF-8, and onnxruntime opens a model only by a UTF-8 path; "
                          "rename the folder")
    config = inst.read_config()
    if config is not None and not config.readable:
        path = inst.target(CONFIG_FILE)
        inst.refuse(ConfigError(
            f"the installed config cannot be read ({config.problem}): the daemon refuses it at start. "
            f"install-service never overwrites it: fix it, or move it aside "
            f"({shlex.join(['mv', str(path), f'{path}.bad'])}) and run install-service again to write a fresh "
            f"sample"))
    manifest, manifest_sha, verified = inst.verify_bundle(source) if source is not None else (None, None, None)
    bundle_profile = _manifest_profile(manifest)
    if bundle_profile is None and source is None and config is not None:
        bundle_profile = inst.config_bundle_profile(config)
    running = _running_profile(inst, profile, config, bundle_profile)
    gpu = _deciding_profile(inst, running, chosen=profile is not None)
    if verified is not None and running is not None:
        inst.check_bundle_fits(verified, running[0], config)

    inst.ensure_user()
    unit_changed = inst.ensure_file(UNIT_FILE, unit, 0o644)
    dropin_changed = False
    if gpu is None:
        inst.step("GPU drop-in: left as it is (no profile to decide it by: no --profile, and no readable "
                  "[model] profile or bundle profile)")
    elif gpu:
        groups_file = inst.target("etc/group")
        groups = _names_in(groups_file)
        if groups is not None:
            for group in GPU_GROUPS:
                if group not in groups:
                    inst.step(f"note: group {group} does not exist; left out of SupplementaryGroups=")
        dropin_changed = inst.ensure_file(GPU_DROPIN_FILE, render_gpu_dropin(groups), 0o644)
    else:
        dropin_changed = inst.remove_file(GPU_DROPIN_FILE, "CPU profile")
        if not dropin_changed:
            inst.step("GPU drop-in: not needed (CPU profile), skipped")
    inst.units_changed = unit_changed or dropin_changed

    installed_bundle = None
    if source is None:
        inst.step("bundle: skipped (no --bundle)")
    elif verified:
        installed_bundle = inst.install_bundle(source, manifest)
    else:  # a dry run past a bundle that failed verification
        installed_bundle = inst.bundle_destination(source)
        inst.step(f"bundle {inst.shown(installed_bundle)}: would refuse to copy it (see the warning above)")
    profile_in_config = profile
    if profile is not None and is_profile_path(profile):
        # the service cannot read the operator's copy (another working directory, ProtectHome):
        # it gets its own, named by an absolute path
        installed_profile = f"{PROFILES_DIR}/{Path(profile).name}"
        inst.ensure_file(installed_profile, Path(profile).read_text(encoding="utf-8"), 0o644)
        profile_in_config = "/" + installed_profile
    bundle_in_config = inst.shown(installed_bundle) if installed_bundle is not None else None
    note = f" (check that its [model] bundle is {bundle_in_config})" if config is None and bundle_in_config else ""
    inst.ensure_file(CONFIG_FILE, render_config(bundle_in_config, profile_in_config), 0o644,
                     overwrite=False, note_if_kept=note)
    if config is not None and config.readable:
        inst.check_kept_config(config, profile_in_config, bundle_profile, installed_bundle, manifest_sha)

    inst.systemctl()
    return inst.finish("nothing to do: everything is already installed")


def uninstall_service(*, root: Path = Path("/"), dry_run: bool = False,
                      run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
                      report: Callable[[str], None] | None = None) -> list[str]:
    """Take the service out: stop and disable it (live systemd only), remove the unit and
    the GPU drop-in, reload systemd. Keeps the config, the state directory (audit log,
    reply store), the bundles, other drop-ins and the user, saying how to remove each."""
    inst = _Installer(Path(root).resolve(), dry_run, run, report)
    inst.require_root("install-service --uninstall changes /etc and systemd")
    config = inst.read_config()
    if config is not None and not config.readable:
        inst.step(f"warning: cannot read {inst.shown(inst.target(CONFIG_FILE))} ({config.problem}): a [service] "
                  f"state_dir it names is not listed below as kept")
    live_systemd = inst.systemctl_here("disable")
    if live_systemd:
        inst.stop_and_disable()
    elif not inst.live:
        inst.remove_enable_links()
    removed_dropin = inst.remove_file(GPU_DROPIN_FILE, "installed by install-service")
    removed_unit = inst.remove_file(UNIT_FILE, "installed by install-service")
    if not (removed_dropin or removed_unit):
        inst.step(f"{inst.shown(inst.target(UNIT_FILE))}: not installed, skipped")
    inst.units_changed = removed_dropin or removed_unit
    if live_systemd:
        inst.daemon_reload()
    inst.report_kept(config)
    return inst.finish(f"nothing to do: {SERVICE_NAME} is not installed as a service")


# -- command line ---------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``edge-runtime install-service``."""
    parser.add_argument("--profile", help="device profile name or TOML file; a GPU profile (nvidia-gpu, "
                        "jetson-*) adds the NVIDIA device drop-in (default: the installed config's "
                        "[model] profile, else the bundle's profile)")
    parser.add_argument("--bundle", help=f"bundle folder to verify and copy to {BUNDLES_DIR}/<name>")
    parser.add_argument("--root", default="/",
                        help="install into this tree (an image or a test folder) instead of / ; "
                             "systemctl is run only for /")
    parser.add_argument("--dry-run", action="store_true", help="print what would be done, change nothing "
                        "(exit 2 if a real run would stop)")
    parser.add_argument("--executable", help="the ExecStart= program, an absolute path to an executable file "
                        "(inside --root when given) (default: the edge-runtime script of this environment, e.g. "
                        f"{DEFAULT_EXECUTABLE})")
    parser.add_argument("--uninstall", action="store_true", help="stop and disable the service, remove the "
                        "unit and GPU drop-in; keep the config, state, bundles and user (with --root, --dry-run)")


# What each flag names, for the error that refuses it empty.
WHAT_FLAG_NAMES = {"--root": "image tree to install into (leave --root out for /)",
                   "--bundle": "bundle folder", "--profile": "device profile's name or TOML file",
                   "--executable": "absolute path of the ExecStart= program"}


def run_install_service(args: argparse.Namespace) -> int:
    """Run the subcommand: steps go to stdout, an error to stderr (exit 2)."""
    try:
        empty = empty_flag(args, WHAT_FLAG_NAMES)
        if empty:
            raise ConfigError(empty)
        if getattr(args, "uninstall", False):
            extra = [flag for flag, value in (("--profile", args.profile), ("--bundle", args.bundle),
                                              ("--executable", args.executable)) if value is not None]
            if extra:
                raise ConfigError(f"--uninstall takes only --root and --dry-run, not {', '.join(extra)}")
            uninstall_service(root=Path(args.root), dry_run=args.dry_run, report=print)
        else:
            bundle = Path(args.bundle) if args.bundle is not None else None
            with terminate_as_interrupt():
                install_service(args.profile, bundle, root=Path(args.root), dry_run=args.dry_run,
                                executable=args.executable, report=print)
    except Terminated as exc:
        print(f"error: interrupted ({exc.name})", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except EdgeRuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edge-runtime install-service",
                                     description="Install edge-runtime as a systemd service.")
    add_arguments(parser)
    return run_install_service(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
