"""The backend registry's `auto` choice (the CLI default)."""

from hass_deploy.runtime.backends import choose_backend


def test_auto_runs_exported_artifacts_on_onnxruntime_and_models_on_torch():
    assert choose_backend("auto", "exports/hass") == "onnxruntime"
    assert choose_backend("auto", None) == "torch"
    assert choose_backend("torch", "exports/hass") == "torch"  # explicit wins (and is refused later, loudly)
