import subprocess
import sys
from pathlib import Path

from edge_export.demo_model import RECIPE, default_cache_dir, demo_model_dir


def test_demo_model_cache_follows_edge_runtime_cache_else_home():
    assert default_cache_dir({"EDGE_RUNTIME_CACHE": "~/models"}) == Path.home() / "models"
    assert default_cache_dir({"EDGE_RUNTIME_CACHE": ""}) == Path.home() / ".cache" / "edge-runtime"
    assert default_cache_dir({}) == Path.home() / ".cache" / "edge-runtime"
    assert demo_model_dir(Path("/c")) == Path("/c") / f"demo-model-{RECIPE.key()}"


def test_demo_model_without_torch_says_what_to_install(tmp_path):
    """A device-side install (`pip install '.[cpu]'`, no torch) asked to train the demo model is
    told what to install, as `export` is: it was a ModuleNotFoundError traceback from training."""
    code = ("import sys; sys.modules['torch'] = None\n"  # import torch now fails as if not installed
            "from edge_runtime.cli import main\n"
            f"sys.exit(main(['demo-model', '--cache-dir', {str(tmp_path)!r}]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: the export side is not installed (torch missing)"), done.stderr
    assert "pip install '/path/to/edge-runtime[export,cpu]'" in done.stderr and "Traceback" not in done.stderr
    assert not demo_model_dir(tmp_path).exists() and done.stdout == ""


def test_a_trained_demo_model_is_on_the_disk_before_it_takes_its_cached_name(tmp_path, monkeypatch):
    """The demo checkpoint is trained into a temporary folder, marked complete and renamed into
    the cache: without an fsync, a power cut soon after could leave the marker (so the cache is
    taken as complete, never trained again) beside weights that are empty or short. Every file
    is flushed before the rename, the cache folder after it; a replaced one (force) too.
    Training is stood in for (it takes minutes): the files it writes are what is checked."""
    import edge_export.demo_model as demo
    from disk_flushes import DiskFlushes

    def train(out_dir, recipe, *, progress=True):
        (out_dir / "config.json").write_text("{}")
        (out_dir / "model.safetensors").write_bytes(b"w" * 4096)
        return out_dir

    monkeypatch.setattr(demo, "train_demo_model", train)
    out = demo_model_dir(tmp_path)
    for force in (False, True):
        flushes = DiskFlushes().install(monkeypatch)
        assert demo.build_demo_model(out, force=force, progress=False) == out
        renames = flushes.renames_into(out)
        assert len(renames) == 1, flushes.events
        _, src, _, files = flushes.events[renames[0]]
        assert {Path(f).name for f in files} == {Path(src).name, "config.json", "model.safetensors",
                                                 demo.COMPLETE_MARKER}
        assert flushes.problems_of_rename(renames[0]) == []
