"""hass-deploy: train, export and serve HASS speculative-decoding draft heads, losslessly."""

import importlib

from hass_deploy.config import GenerationConfig, LookupConfig, RuntimeConfig, SamplingConfig, TreeConfig
from hass_deploy.errors import HassDeployError

__all__ = ["GenerationConfig", "HassDeployError", "LookupConfig", "Pipeline", "RuntimeConfig", "SamplingConfig",
           "TreeConfig"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Pipeline imports torch: loaded on first use, so that `hass-deploy --help` and the configs stay light.
    if name == "Pipeline":
        return importlib.import_module("hass_deploy.generation").Pipeline
    raise AttributeError(f"module 'hass_deploy' has no attribute {name!r}")
