"""The on-disk cache (models, conversions, bigram tables) and the store of tune profiles.

Everything lives under `$SPECDEC_CACHE` or `~/.cache/specdec`. A tune profile is a JSON file
keyed by (target, draft, device, dtype, temperature); `specdec tune` writes it, and the `auto`
method and `sequoia --tree auto` read it back by key.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

PROFILE_VERSION = 1


def cache_dir() -> Path:
    """The cache root: ``$SPECDEC_CACHE`` or ``~/.cache/specdec`` (created on demand)."""
    root = Path(os.environ.get("SPECDEC_CACHE") or Path.home() / ".cache" / "specdec").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


# ---- tune profiles -----------------------------------------------------------------------------
def profile_key(target: str, draft: str, device: str, dtype: str, temperature: float) -> dict[str, Any]:
    return {"target": str(target), "draft": str(draft), "device": str(device), "dtype": str(dtype),
            "temperature": float(temperature)}


def profile_path(key: dict[str, Any]) -> Path:
    """Where the profile for `key` lives: a readable name plus a hash of the exact key."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    short = "__".join(Path(key[k]).name for k in ("target", "draft")) + f"__{key['device']}__T{key['temperature']:g}"
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in short)
    return cache_dir() / "profiles" / f"tune__{safe}__{digest}.json"


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


def profile_temperatures(key: dict[str, Any]) -> list[float]:
    """The temperatures of the saved profiles whose key equals `key` but for the temperature
    (sorted; unreadable files are skipped)."""
    found = set()
    for path in sorted((cache_dir() / "profiles").glob("tune__*.json")):
        try:
            other = json.loads(path.read_text()).get("key")
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            continue
        if isinstance(other, dict) and all(other.get(k) == v for k, v in key.items() if k != "temperature"):
            try:
                found.add(float(other["temperature"]))
            except (KeyError, TypeError, ValueError):
                continue
    return sorted(found)


def save_profile(profile: dict[str, Any], path: Path | None = None) -> Path:
    path = path or profile_path(profile["key"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(profile, indent=1))
    tmp.replace(path)  # an interrupted save never leaves half a profile behind
    return path
