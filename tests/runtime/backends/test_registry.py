"""The backend registry: specs by name, the `auto` choice (the CLI default), which backends run an export, and the
one-line refusals of a missing or misplaced --artifacts."""

import pytest

from hass_deploy.artifacts import Artifacts
from hass_deploy.config import RuntimeConfig
from hass_deploy.errors import HassDeployError
from hass_deploy.config import choose_backend
from hass_deploy.runtime.backends import BACKENDS, BackendOptions, backend_spec


def test_auto_runs_exported_artifacts_on_onnxruntime_and_models_on_torch():
    assert choose_backend("auto", "exports/hass") == "onnxruntime"
    assert choose_backend("auto", None) == "torch"
    assert choose_backend("torch", "exports/hass") == "torch"  # explicit wins (and is refused later, loudly)


def test_specs_say_which_backends_run_an_export():
    assert {name: spec.needs_export for name, spec in BACKENDS.items()} == {
        "torch": False, "onnxruntime": True, "tensorrt": True}
    assert all(backend_spec(name).name == name for name in BACKENDS)
    with pytest.raises(HassDeployError, match="unknown backend 'vllm'; available: torch, onnxruntime, tensorrt"):
        backend_spec("vllm")


def test_artifacts_are_opened_for_the_backends_that_run_them_only(tmp_path):
    assert backend_spec("torch").artifacts(None) is None
    with pytest.raises(HassDeployError, match="--artifacts is for --backend onnxruntime or tensorrt; the torch "
                                              "backend runs the models directly"):
        backend_spec("torch").artifacts(tmp_path)
    for name in ("onnxruntime", "tensorrt"):
        with pytest.raises(HassDeployError, match=f"--backend {name} needs --artifacts DIR"):
            backend_spec(name).artifacts(None)
    with pytest.raises(HassDeployError, match="not an export"):
        backend_spec("onnxruntime").artifacts(tmp_path)
    opened = Artifacts(tmp_path, manifest=None)  # an export opened already is used as given, not read again
    assert backend_spec("onnxruntime").artifacts(opened) is opened


def test_options_come_from_the_runtime_configuration():
    assert BackendOptions.of(RuntimeConfig()) == BackendOptions(device="cpu", steps="auto", ort_provider="auto")
    assert BackendOptions.of(RuntimeConfig(device="cuda:1", cuda_graphs=False, ort_provider="tensorrt")) == \
        BackendOptions(device="cuda:1", steps="eager", ort_provider="tensorrt", ort_graphs="auto")
