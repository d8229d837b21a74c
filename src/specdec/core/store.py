"""The on-disk cache (models, conversions, bigram tables) and the store of tune profiles.

Everything lives under `$SPECDEC_CACHE` or `~/.cache/specdec`. A tune profile is a JSON file
keyed by (target, draft, device, dtype, temperature); `specdec tune` writes it, and the `auto`
method and `sequoia --tree auto` read it back by key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PROFILE_VERSION = 1


def cache_dir() -> Path:
    """The cache root: ``$SPECDEC_CACHE`` or ``~/.cache/specdec`` (created on demand)."""
    root = Path(os.environ.get("SPECDEC_CACHE") or Path.home() / ".cache" / "specdec").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def measurement_dir() -> Path:
    """Where per-machine measurements live (linear paths, draft precision, tune profiles):
    ``$SPECDEC_MEASUREMENTS``, or the cache root. Tests point it at a temporary folder so timings
    taken on a busy test machine never reach a real cache."""
    env = os.environ.get("SPECDEC_MEASUREMENTS")
    if not env:
        return cache_dir()
    root = Path(env).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


# ---- per-machine measurement caches ------------------------------------------------------------
def read_json(path: Path, version: int, fp: dict[str, Any]) -> dict[str, Any]:
    """The `entries` of a per-machine cache file, or {} when it is missing, unreadable, of another
    version or of another machine (the caller then measures again and rewrites it)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        log.warning("ignoring the unreadable cache file %s (%s); measuring again", path, exc)
        return {}
    if not isinstance(data, dict) or data.get("version") != version or data.get("fingerprint") != fp:
        log.warning("ignoring the cache file %s (another version or machine); measuring again", path)
        return {}
    entries = data.get("entries")
    return entries if isinstance(entries, dict) else {}


def write_json(path: Path, version: int, fp: dict[str, Any], entries: dict[str, Any]) -> None:
    """Write a per-machine cache file atomically (an interrupted write leaves the old one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"version": version, "fingerprint": fp, "entries": entries}, indent=1))
    tmp.replace(path)


# ---- tune profiles -----------------------------------------------------------------------------
def profile_key(target: str, draft: str, device: str, dtype: str, temperature: float) -> dict[str, Any]:
    return {"target": str(target), "draft": str(draft), "device": str(device), "dtype": str(dtype),
            "temperature": float(temperature)}


def profile_path(key: dict[str, Any]) -> Path:
    """Where the profile for `key` lives: a readable name plus a hash of the exact key."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    short = "__".join(Path(key[k]).name for k in ("target", "draft")) + f"__{key['device']}__T{key['temperature']:g}"
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in short)
    return measurement_dir() / "profiles" / f"tune__{safe}__{digest}.json"


def read_profile(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no tune profile at {path}; run `specdec tune` first")
    try:
        profile = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not a readable tune profile ({exc})") from None
    if not isinstance(profile, dict) or profile.get("version") != PROFILE_VERSION or "winner" not in profile:
        raise ValueError(f"{path} is not a version-{PROFILE_VERSION} tune profile; run `specdec tune` again")
    return profile


def find_profile(key: dict[str, Any]) -> dict[str, Any]:
    """The saved profile for `key`, or a ValueError saying which `specdec tune` makes it."""
    path = profile_path(key)
    if not path.is_file():
        raise ValueError(
            f"no tune profile for target {key['target']}, draft {key['draft']}, device {key['device']}, dtype "
            f"{key['dtype']}, temperature {key['temperature']:g} (looked for {path}); run "
            f"`specdec tune --target {key['target']} --draft {key['draft']} --device {key['device']} "
            f"--dtype {key['dtype']} --temperature {key['temperature']:g}` first, or pass --tree PROFILE.json"
        )
    return read_profile(path)


def save_profile(profile: dict[str, Any], path: Path | None = None) -> Path:
    path = path or profile_path(profile["key"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(profile, indent=1))
    tmp.replace(path)  # an interrupted save never leaves half a profile behind
    return path
