"""GGUF targets: a llama.cpp / Ollama model file, converted once into the Hugging Face directory everything else reads.

The conversion is transformers' own GGUF loader (the `gguf` package dequantizes the blocks; nothing here decodes a
quantization format): the weights as the file holds them, dequantized to fp32 (Q4_1 and Q8_0 blocks are fp16
scales times small integers, exact in fp32), the tokenizer and chat template from the file's metadata, and the
stop token. `resolve_target` lets every command take `--target model.gguf`: the converted directory is cached
under the file's sha256, so a second run finds it (`hass_deploy.cache`); `convert_gguf` writes it where a user
says (`hass-deploy convert`); `gguf_source` leads back from a converted directory to its file (the int4 export
reads the file's own blocks: `gguf_blocks.py`). No torch here: the CLI resolves `--target` before anything loads.
"""

from __future__ import annotations

import json
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from hass_deploy.atomic import check_output_dir, replacing_directory
from hass_deploy.cache import file_sha256, home
from hass_deploy.errors import ModelLoadError
from hass_deploy.packages import MODELS, named

MAGIC = b"GGUF"
PROVENANCE = "hass_deploy_gguf.json"  # in a converted directory: the file it came from, and its sha256
# GGUF's `general.architecture` -> the Hugging Face architecture it converts to (both must be supported: by
# transformers' GGUF loader, and by our architecture table in `loading.py`).
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                      "qwen3": "Qwen3ForCausalLM"}
# GGUF's `general.file_type` (llama.cpp's LLAMA_FTYPE) for the common ones, for messages and provenance.
FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 12: "Q3_K_M",
              15: "Q4_K_M", 17: "Q5_K_M", 18: "Q6_K", 32: "BF16"}


@dataclass(frozen=True)
class GGUFInfo:
    """What a GGUF file's header says, read without loading its tensors."""

    path: Path
    architecture: str  # general.architecture, e.g. "llama"
    name: str  # general.name ("" when absent)
    file_type: str  # e.g. "Q4_1" (FILE_TYPES), or the number
    tensors: int


def is_gguf(path: str | Path) -> bool:
    """Whether `path` is a file that is meant to be a GGUF: named *.gguf, or starting with the GGUF magic."""
    path = Path(path)
    if not path.is_file():
        return False
    if path.suffix.lower() == ".gguf":
        return True
    with path.open("rb") as handle:
        return handle.read(4) == MAGIC


def read_info(path: str | Path) -> GGUFInfo:
    """The header of a GGUF file, checked: one line for a file that is not a GGUF, a truncated or corrupt one (its
    tensors must lie inside the file), and an architecture we do not run."""
    path = Path(path)
    with path.open("rb") as handle:
        if handle.read(4) != MAGIC:
            raise ModelLoadError(f"{path}: not a GGUF file (it does not start with the GGUF magic)")
    # gguf is a dependency of GGUF targets only: imported when one is read.
    from gguf import GGUFReader

    try:
        # The reader maps the file and checks that every tensor's data lies inside it.
        reader = GGUFReader(path)
    except Exception as err:  # the reader raises ValueError, KeyError, IndexError... on a broken file
        raise ModelLoadError(f"{path}: truncated or corrupt GGUF ({type(err).__name__}: {err})") from None

    def field(key: str, default=None):
        return reader.fields[key].contents() if key in reader.fields else default

    architecture = field("general.architecture", "")
    if architecture not in GGUF_ARCHITECTURES:
        raise ModelLoadError(f"{path}: GGUF architecture {architecture!r} is not supported; supported: "
                             f"{', '.join(GGUF_ARCHITECTURES)}")
    file_type = field("general.file_type")
    return GGUFInfo(path, architecture, field("general.name", ""), FILE_TYPES.get(file_type, str(file_type)),
                    len(reader.tensors))


def convert_gguf(path: str | Path, out: str | Path, force: bool = False, progress: bool = True,
                 digest: str | None = None) -> Path:
    """Convert a GGUF file into a Hugging Face directory at `out` (written atomically): model.safetensors in fp32,
    config.json, generation_config.json, the tokenizer and its chat template (when the file has one), and
    `hass_deploy_gguf.json` (the source and its sha256: `digest` when the caller hashed the file already).
    Returns `out`."""
    path, out = Path(path), Path(out)
    info = read_info(path)
    check_output_dir(out, force)
    digest = digest or file_sha256(path)
    with nullcontext() if progress else _transformers_bars_off():
        _convert(path, out, info, digest)
    return out


@contextmanager
def _transformers_bars_off():
    """transformers' progress bars off: its logging ones (saving), and its GGUF loader's, a tqdm of its own that the
    logging switch does not reach."""
    from transformers import modeling_gguf_pytorch_utils as gguf_loader
    from transformers.utils import logging as hf_logging

    bar = gguf_loader.tqdm
    hf_logging.disable_progress_bar()
    gguf_loader.tqdm = partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_loader.tqdm = bar
        hf_logging.enable_progress_bar()


def _convert(path: Path, out: Path, info: GGUFInfo, digest: str) -> None:
    # transformers is imported only when a file is converted (start-up time of every other command).
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    except Exception as err:
        raise ModelLoadError(f"{path}: transformers cannot convert this GGUF ({type(err).__name__}: {err})") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    except Exception:  # a GGUF without tokenizer metadata: the target takes --prompt-ids, as a random one does
        tokenizer = None
    # The weights are dequantized now; transformers' GGUF quantizer record (on the model and in its config) would
    # make save_pretrained refuse, and make a later load look for the GGUF file.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = [GGUF_ARCHITECTURES[info.architecture]]
    with replacing_directory(out) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        provenance = {"source": str(path.resolve()), "sha256": digest, "size": path.stat().st_size,
                      "architecture": info.architecture, "name": info.name, "file_type": info.file_type}
        (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")


def gguf_source(directory: str | Path) -> Path | None:
    """The GGUF file a converted directory was made from (its provenance), checked to be those bytes still; None
    for a directory that was not converted from a GGUF. One line for a source that is gone or has changed."""
    directory = Path(directory)
    try:
        provenance = json.loads((directory / PROVENANCE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{directory / PROVENANCE}: unreadable ({err})") from None
    source = Path(provenance.get("source", ""))
    if not source.is_file():
        raise ModelLoadError(f"{directory} was converted from {source}, which is no longer there")
    if file_sha256(source) != provenance.get("sha256"):
        raise ModelLoadError(f"{source} has changed since {directory} was converted from it (sha256 differs): "
                             f"convert it again (hass-deploy convert, or --target {source.name})")
    return source


def cached_dir(path: Path, digest: str) -> Path:
    return home() / "gguf" / f"{path.stem}-{digest[:16]}"


def _intact(directory: Path, digest: str) -> bool:
    """A cache entry is used only when it is whole and made from these bytes."""
    try:
        provenance = json.loads((directory / PROVENANCE).read_text())
    except (OSError, ValueError):
        return False
    return (provenance.get("sha256") == digest and (directory / "config.json").is_file()
            and any(directory.glob("*.safetensors")))


def resolve_target(path: str | Path, progress: bool = True) -> Path:
    """The Hugging Face directory of a target given as a directory (itself) or as a GGUF file (its conversion,
    cached under the file's sha256 and made on first use), or a packaged model's name (`smollm2`: packages.py). One
    line for a path that is none of these."""
    path = named(path, MODELS)
    if path.is_dir():
        return path
    if not path.exists():
        raise ModelLoadError(f"{path}: no such model directory or GGUF file")
    if not is_gguf(path):
        raise ModelLoadError(f"{path}: not a model directory or a GGUF file")
    digest = file_sha256(path)
    directory = cached_dir(path, digest)
    if _intact(directory, digest):
        return directory
    return convert_gguf(path, directory, force=True, progress=progress, digest=digest)

