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
