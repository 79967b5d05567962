"""hass-deploy: train, export and serve HASS speculative-decoding draft heads, losslessly."""

from hass_deploy.config import GenerationConfig, LookupConfig, RuntimeConfig, SamplingConfig, TreeConfig
from hass_deploy.errors import HassDeployError
from hass_deploy.generation import Pipeline

__all__ = ["GenerationConfig", "HassDeployError", "LookupConfig", "Pipeline", "RuntimeConfig", "SamplingConfig",
           "TreeConfig"]
__version__ = "0.1.0"
