from pathlib import Path

from edge_export.demo_model import RECIPE, default_cache_dir, demo_model_dir


def test_demo_model_cache_follows_edge_runtime_cache_else_home():
    assert default_cache_dir({"EDGE_RUNTIME_CACHE": "~/models"}) == Path.home() / "models"
    assert default_cache_dir({"EDGE_RUNTIME_CACHE": ""}) == Path.home() / ".cache" / "edge-runtime"
    assert default_cache_dir({}) == Path.home() / ".cache" / "edge-runtime"
    assert demo_model_dir(Path("/c")) == Path("/c") / f"demo-model-{RECIPE.key()}"
