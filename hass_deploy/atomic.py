"""Writes that are all or nothing: a crash or Ctrl-C leaves the previous file or directory, never half of a new one.

Everything a user waits for (a trained draft, an export, the demo target, a quickstart's records) is written
beside its destination under a temporary name and renamed into place; a rename within one filesystem is atomic.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hass_deploy.errors import HassDeployError


@contextmanager
def replacing_directory(out: str | Path) -> Iterator[Path]:
    """Yield an empty directory to fill; when the block ends without an exception it becomes `out`.

    An existing `out` is moved aside first and put back if the final rename fails, so `out` is at every moment
    either the old directory or the new one. The new directory gets the usual permissions (umask applied), not
    mkdtemp's 0700.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    try:
        yield tmp
        if not out.exists():
            os.replace(tmp, out)
            return
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | Path, text: str) -> None:
    """Replace the file at `path` with `text` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_output_dir(out: str | Path, force: bool | None = None,
                     hint: str = "use --force to overwrite") -> Path:
    """Refuse an output that is a file, or (when `force` is given and False) a directory with something in it.

    Every command that writes a directory asks this before it loads anything, so a wrong path fails in a second.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise HassDeployError(f"{out} exists and is not a directory")
    if force is False and out.exists() and any(out.iterdir()):
        raise HassDeployError(f"{out} exists and is not empty ({hint})")
    return out
