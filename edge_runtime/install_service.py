"""`edge-runtime install-service`: put the daemon in its places as a systemd service.

What it does, each step printed as done or skipped (idempotent: a second run with
the same arguments changes nothing and says so):

1. the system user ``edge-runtime`` (``useradd --system``; skipped if it exists);
2. the unit ``/etc/systemd/system/edge-runtime.service``, its ``ExecStart=``
   pointing at the console script of the environment this command runs from
   (a venv under ``/opt/edge-runtime/venv`` is the documented place);
3. for a GPU profile (one whose execution providers go beyond the CPU: nvidia-gpu,
   jetson-*), the drop-in ``edge-runtime.service.d/gpu.conf`` with the NVIDIA
   device access; a CPU profile removes a drop-in left by an earlier run;
4. the bundle, copied to ``/opt/edge-runtime/bundles/<name>`` (root-owned and
   read-only to the service under ``ProtectSystem=strict``);
5. ``/etc/edge-runtime/config.toml`` from the sample, with [model] filled in,
   only if there is none (an existing config is never overwritten);
6. ``systemctl daemon-reload`` (when a unit file changed) and
   ``systemctl enable edge-runtime``, only on the live system (``--root /``)
   with systemd running. It does not start the service: edit [mqtt] first.

``--root DIR`` installs into an image or a test tree; ``--dry-run`` prints what
would be done and changes nothing. The unit, drop-in and sample config are the
files in the repository's ``systemd/`` folder, kept here so an installed wheel
carries them (tests/system/test_systemd_units.py checks they are identical).
"""

from __future__ import annotations

import argparse
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
from pathlib import Path

from .errors import BundleError, ConfigError, EdgeRuntimeError

__all__ = [
    "BUNDLES_DIR",
    "DEFAULT_EXECUTABLE",
    "SERVICE_USER",
    "add_arguments",
    "find_console_script",
    "install_service",
    "is_gpu_profile",
    "render_config",
    "render_gpu_dropin",
    "render_unit",
    "run_install_service",
]

SERVICE_NAME = "edge-runtime"
SERVICE_USER = "edge-runtime"
STATE_DIR = "/var/lib/edge-runtime"
DEFAULT_EXECUTABLE = "/opt/edge-runtime/venv/bin/edge-runtime"
BUNDLES_DIR = "/opt/edge-runtime/bundles"
UNIT_FILE = "etc/systemd/system/edge-runtime.service"
GPU_DROPIN_FILE = "etc/systemd/system/edge-runtime.service.d/gpu.conf"
CONFIG_FILE = "etc/edge-runtime/config.toml"
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
    return f'"{path}"' if any(c.isspace() for c in path) else path


def render_unit(executable: str | os.PathLike[str] = DEFAULT_EXECUTABLE) -> str:
    """The unit with ``ExecStart=`` running `executable` (an absolute path)."""
    executable = os.fspath(executable)
    if not os.path.isabs(executable):
        raise ConfigError(f"the ExecStart= executable must be an absolute path, got {executable!r}")
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
        text = text.replace(old, f"bundle = {_toml_string(os.fspath(bundle))}")
    if profile is not None:
        old = '# profile = "cpu-x86_64"'
        assert old in text
        text = text.replace(old, f"profile = {_toml_string(profile)}")
    return text


# -- facts ----------------------------------------------------------------------------------
def is_gpu_profile(profile: str, *, strict: bool = True) -> bool:
    """True when the profile runs on an accelerator (any provider besides the CPU's).

    The profile is loaded (a packaged name or a TOML path); an unknown one raises
    `ConfigError` when `strict`, else the name decides (nvidia-gpu, jetson-*).
    """
    try:
        from .profiles import load_profile

        loaded = load_profile(profile)
    except (ConfigError, ImportError):
        if strict:
            raise
        name = Path(profile).stem
        return name == "nvidia-gpu" or name.startswith("jetson-")
    return any(name != "CPUExecutionProvider" for name in loaded.provider_names)


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


def find_console_script() -> Path:
    """The ``edge-runtime`` console script of the running environment.

    Checked to be usable by the service: neither it, the interpreter its ``#!``
    line names (symlinks resolved), nor this package's code may sit where the
    unit hides files (/home, /root, /tmp, ...). Raises `ConfigError` saying how
    to fix it (a venv under /opt/edge-runtime/venv, or ``--executable``).
    """
    candidates = [Path(sysconfig.get_path("scripts")) / SERVICE_NAME,
                  Path(sys.executable).parent / SERVICE_NAME]
    found = shutil.which(SERVICE_NAME)
    if found:
        candidates.append(Path(found))
    script = next((c for c in candidates if c.is_file() and os.access(c, os.X_OK)), None)
    if script is None:
        raise ConfigError(f"cannot find the {SERVICE_NAME} console script next to {sys.executable}; "
                          f"pass --executable PATH")
    script = script.absolute()
    checks = [script, Path(os.path.realpath(script))]
    interpreter = _interpreter_of(script)
    if interpreter is not None:
        checks.append(Path(os.path.realpath(interpreter)))
    checks.append(Path(__file__).resolve())
    for path in checks:
        problem = _executable_problem(path)
        if problem:
            raise ConfigError(
                f"{problem}. Install into a venv the service can see: python3 -m venv "
                f"{Path(DEFAULT_EXECUTABLE).parent.parent} && {Path(DEFAULT_EXECUTABLE).parent}/pip install "
                f"'/path/to/edge-runtime[cpu]' (the source folder), then run {DEFAULT_EXECUTABLE} install-service "
                f"(or pass --executable)")
    return script


def _systemd_running() -> bool:
    return Path("/run/systemd/system").is_dir()


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


# -- the installer --------------------------------------------------------------------------
class _Installer:
    def __init__(self, root: Path, dry_run: bool, run: Callable[..., subprocess.CompletedProcess],
                 report: Callable[[str], None] | None) -> None:
        self.root = root
        self.live = root.resolve() == Path("/")
        self.dry_run = dry_run
        self.run = run
        self.report = report
        self.steps: list[str] = []
        self.changed = False
        self.units_changed = False

    def target(self, relative: str) -> Path:
        return self.root / relative

    def shown(self, path: Path) -> str:
        """A target path as it will be on the installed system."""
        return "/" + path.relative_to(self.root).as_posix()

    def step(self, message: str, *, changes: bool = False) -> None:
        if changes:
            self.changed = True
        self.steps.append(message)
        if self.report is not None:
            self.report(message)

    def did(self, what: str, done: str, would: str) -> None:
        self.step(f"{what}: {'would ' + would if self.dry_run else done}", changes=True)

    def command(self, argv: list[str]) -> subprocess.CompletedProcess:
        try:
            return self.run(argv, check=True, capture_output=True, text=True)
        except subprocess.CalledProcessError as exc:
            detail = (exc.stderr or exc.stdout or "").strip()
            raise EdgeRuntimeError(f"{shlex.join(argv)} failed (exit {exc.returncode})"
                                   f"{': ' + detail if detail else ''}") from None
        except FileNotFoundError as exc:
            raise EdgeRuntimeError(f"{argv[0]} not found: {exc}") from None

    # -- steps
    def ensure_user(self) -> None:
        if self.live:
            try:
                pwd.getpwnam(SERVICE_USER)
                exists = True
            except KeyError:
                exists = False
        else:
            exists = SERVICE_USER in (_names_in(self.target("etc/passwd")) or set())
        if exists:
            self.step(f"user {SERVICE_USER}: exists, skipped")
            return
        argv = ["useradd", "--system", "--no-create-home", "--home-dir", STATE_DIR,
                "--shell", "/usr/sbin/nologin", "--user-group", "--comment", "edge-runtime daemon", SERVICE_USER]
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
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
            tmp = path.with_name(f".{path.name}.tmp-install")
            tmp.write_text(content, encoding="utf-8")
            os.chmod(tmp, mode)
            os.replace(tmp, path)
        self.did(shown, verb, would)
        return True

    def remove_file(self, relative: str, why: str) -> bool:
        path = self.target(relative)
        if not path.exists():
            return False
        if not self.dry_run:
            path.unlink()
            try:
                path.parent.rmdir()  # the .d folder, if now empty
            except OSError:
                pass
        self.did(self.shown(path), f"removed ({why})", f"remove it ({why})")
        return True

    def install_bundle(self, source: Path) -> Path:
        from .bundle import read_manifest

        source = source.resolve()
        read_manifest(source)  # a bundle folder (raises BundleError naming the problem)
        dest = self.target(BUNDLES_DIR.lstrip("/")) / source.name
        shown = self.shown(dest)
        if dest.resolve() == source:
            self.step(f"bundle {shown}: already in place, skipped")
            return dest
        if dest.is_dir() and _tree_signature(dest) == _tree_signature(source):
            self.step(f"bundle {shown}: unchanged, skipped")
            return dest
        replacing = dest.exists()
        if not self.dry_run:
            dest.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
            os.chmod(dest.parent, 0o755)
            tmp = dest.with_name(f".{dest.name}.tmp-install")
            old = dest.with_name(f".{dest.name}.old-install")
            for leftover in (tmp, old):
                if leftover.exists():
                    shutil.rmtree(leftover)
            shutil.copytree(source, tmp, copy_function=shutil.copy2, symlinks=False)
            for path in [tmp, *tmp.rglob("*")]:  # readable by the service user, writable by root only
                os.chmod(path, 0o755 if path.is_dir() else 0o644)
                if self.live and os.geteuid() == 0:
                    os.chown(path, 0, 0)
            if replacing:
                os.replace(dest, old)
            os.replace(tmp, dest)
            if replacing:
                shutil.rmtree(old)
        self.did(f"bundle {shown}", f"{'replaced' if replacing else 'copied'} from {source}",
                 f"{'replace' if replacing else 'copy'} it from {source}")
        return dest

    def systemctl(self) -> None:
        if not self.live:
            self.step(f"systemctl: skipped (--root {self.root}: enable it on the device with "
                      f"`systemctl enable {SERVICE_NAME}`)")
            return
        if not _systemd_running():
            self.step(f"systemctl: skipped (systemd is not running here; enable it with "
                      f"`systemctl enable {SERVICE_NAME}` where it runs)")
            return
        if self.units_changed:
            if not self.dry_run:
                self.command(["systemctl", "daemon-reload"])
            self.did("systemctl daemon-reload", "done", "run it")
        else:
            self.step("systemctl daemon-reload: skipped (no unit file changed)")
        state = self.run(["systemctl", "is-enabled", SERVICE_NAME], capture_output=True, text=True)
        if (state.stdout or "").strip() == "enabled":
            self.step(f"systemctl enable {SERVICE_NAME}: already enabled, skipped")
            return
        if not self.dry_run:
            self.command(["systemctl", "enable", SERVICE_NAME])
        self.did(f"systemctl enable {SERVICE_NAME}", "done (starts at boot; not started now)", "run it")


def install_service(profile: str | None, bundle: Path | None, *, root: Path = Path("/"),
                    dry_run: bool = False, run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
                    executable: str | os.PathLike[str] | None = None,
                    report: Callable[[str], None] | None = None) -> list[str]:
    """Install the service (see the module docstring); returns the steps, one line each.

    `run` runs every external command (useradd, systemctl), so tests inject a fake.
    `executable` is the ``ExecStart=`` program (default: `find_console_script`).
    `report`, when given, is called with each step as it happens.
    """
    root = Path(root)
    inst = _Installer(root, dry_run, run, report)
    if inst.live and not dry_run and os.geteuid() != 0:
        raise ConfigError("install-service changes /etc, /opt and the user database: run it as root "
                          "(or with --dry-run to see what it would do)")
    if not root.is_dir():
        raise ConfigError(f"--root {root} is not a directory")
    if bundle is not None and not Path(bundle).is_dir():
        raise BundleError(f"bundle folder {bundle} does not exist")
    gpu: bool | None = None
    if profile is not None:
        gpu = is_gpu_profile(profile)
    elif bundle is not None:
        from .bundle import read_manifest

        manifest, _ = read_manifest(Path(bundle).resolve())
        bundle_profile = (manifest.get("profile") or {}).get("name")
        if isinstance(bundle_profile, str):
            gpu = is_gpu_profile(bundle_profile, strict=False)
    if executable is not None:
        exec_path = Path(executable)
        problem = _executable_problem(exec_path)
        if problem:
            raise ConfigError(f"--executable: {problem}")
    else:
        exec_path = find_console_script()

    inst.ensure_user()
    unit_changed = inst.ensure_file(UNIT_FILE, render_unit(exec_path), 0o644)
    dropin_changed = False
    if gpu is None:
        inst.step("GPU drop-in: skipped (no --profile, and no bundle to read one from)")
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

    installed_bundle = inst.install_bundle(Path(bundle)) if bundle is not None else None
    if installed_bundle is None:
        inst.step("bundle: skipped (no --bundle)")
    bundle_in_config = inst.shown(installed_bundle) if installed_bundle is not None else None
    note = ""
    if bundle_in_config is not None:
        note = f" (check that its [model] bundle is {bundle_in_config})"
    inst.ensure_file(CONFIG_FILE, render_config(bundle_in_config, profile), 0o644,
                     overwrite=False, note_if_kept=note)

    inst.systemctl()
    if not inst.changed:
        inst.step("nothing to do: everything is already installed")
    elif dry_run:
        inst.step("dry run: nothing was changed")
    return inst.steps


# -- command line ---------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``edge-runtime install-service``."""
    parser.add_argument("--profile", help="device profile name or TOML file; a GPU profile (nvidia-gpu, "
                        "jetson-*) adds the NVIDIA device drop-in (default: the bundle's profile)")
    parser.add_argument("--bundle", type=Path, help=f"bundle folder to copy to {BUNDLES_DIR}/<name>")
    parser.add_argument("--root", type=Path, default=Path("/"),
                        help="install into this tree (an image or a test folder) instead of / ; "
                             "systemctl is run only for /")
    parser.add_argument("--dry-run", action="store_true", help="print what would be done, change nothing")
    parser.add_argument("--executable", help="the ExecStart= program (default: the edge-runtime script "
                        f"of this environment, e.g. {DEFAULT_EXECUTABLE})")


def run_install_service(args: argparse.Namespace) -> int:
    """Run the subcommand: steps go to stdout, an error to stderr (exit 2)."""
    try:
        install_service(args.profile, args.bundle, root=args.root, dry_run=args.dry_run,
                        executable=args.executable, report=print)
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
