"""The on-disk cache (models, conversions, bigram tables) and the store of tune profiles.

Everything lives under `$SPECDEC_CACHE` or `~/.cache/specdec`; per-machine measurements under
`$SPECDEC_MEASUREMENTS` when set. A tune profile is a JSON file keyed by (target, draft, device,
dtype, draft dtype, greedy or sampling, hardware fingerprint); `specdec tune` and `auto`'s first
use write it, and `auto` and `sequoia --tree auto` read it back by key. A profile that is
missing, unreadable, older, from other hardware or left by an interrupted tune is reported as a
`ProfileProblem` (auto then tunes again).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from specdec.core.hardware import describe, fingerprint, fingerprint_digest

log = logging.getLogger(__name__)

PROFILE_VERSION = 2


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
class ProfileProblem(ValueError):
    """A tune profile that cannot be used as it is: missing, unreadable, written by an older
    specdec, measured on other hardware, or left by an interrupted tune. `auto` re-tunes on it;
    everything else reports it."""

    def __init__(self, message: str, command: str | None = None) -> None:
        super().__init__(message)
        self.command = command
        """The `specdec tune` that would write the profile (None: not known here)."""


def profile_key(
    target: str, draft: str | None, device: str, dtype: str, temperature: float, draft_dtype: str = "",
    hardware: str | None = None,
) -> dict[str, Any]:
    """What a tune is valid for: the model pair, device, dtypes, greedy or sampling, and the machine
    (`core.hardware` digest of `device`, by default this one)."""
    if hardware is None:
        hardware = fingerprint_digest(fingerprint(device))
    return {"target": str(target), "draft": str(draft) if draft else "none", "device": str(device),
            "dtype": str(dtype), "draft_dtype": str(draft_dtype or dtype), "mode": mode_of(temperature),
            "hardware": hardware}


def mode_of(temperature: float) -> str:
    """Profiles are kept per greedy vs sampling decoding (a sampling profile serves every T > 0)."""
    return "greedy" if float(temperature) == 0.0 else "sampling"


def profile_path(key: dict[str, Any]) -> Path:
    """Where the profile for `key` lives: a readable name plus a hash of the exact key."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    short = "__".join(Path(str(key.get(k, ""))).name for k in ("target", "draft", "device", "mode"))
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in short)
    return measurement_dir() / "profiles" / f"tune__{safe}__{digest}.json"


CUSTOM_MODELS = "custom"
"""The name a pipeline of model objects (`Pipeline.from_models`) gives its models in profile keys."""


def tune_command(key: dict[str, Any]) -> str:
    """The `specdec tune` that makes the profile for `key`: its flags read back from the key's dtype
    fields, which `Pipeline.profile_key` writes as "<dtype>[-weights-<target>-<draft>]" and
    "<draft precision>[+vocab<N>]" (a precision "native" or "native-<format>" for native drafts).
    Models passed as objects have no name the command line could load: their pipeline tunes itself."""
    if key.get("target") == CUSTOM_MODELS:
        return "pipe.autotune = True"
    temp = "0" if key.get("mode") == "greedy" else "0.7"
    dtype, _, weights = str(key["dtype"]).partition("-weights-")
    target_weights, _, draft_weights = weights.partition("-")
    has_draft = key.get("draft") not in (None, "none")
    flags = [f"--target {key['target']}"] + ([f"--draft {key['draft']}"] if has_draft else [])
    flags += [f"--device {key['device']}", f"--dtype {dtype}"]
    if target_weights:
        flags.append(f"--weights {target_weights}")
    if has_draft:
        precision, _, vocab = str(key.get("draft_dtype") or dtype).partition("+vocab")
        if draft_weights:
            flags.append(f"--draft-weights {draft_weights}")
        if precision == "native":
            flags.append("--draft-quant file")
        elif precision.startswith("native-"):
            flags.append(f"--draft-quant {precision.removeprefix('native-')}")
        else:
            flags.append(f"--draft-dtype {precision}")
        flags.append(f"--draft-vocab {vocab or 0}")
    if key.get("tensor_parallel_size"):
        flags.append(f"--tensor-parallel-size {key['tensor_parallel_size']}")
    return f"specdec tune --quick {' '.join(flags)} --temperature {temp}"


def read_profile(path: str | Path, fp: dict[str, Any] | None = None) -> dict[str, Any]:
    """A tune profile from `path`; ProfileProblem (one clear line) when it is missing, unreadable,
    of an older version, or (with `fp`) measured on another machine than `fp`."""
    path = Path(path)
    if not path.is_file():
        raise ProfileProblem(f"no tune profile at {path} (no such file): check the path, or run `specdec tune` "
                             "to write one")
    try:
        profile = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProfileProblem(f"{path} is not a readable tune profile ({exc})") from None
    if not isinstance(profile, dict) or "winner" not in profile or not isinstance(profile.get("winner"), dict):
        raise ProfileProblem(f"{path} is not a tune profile (no winner); tune again")
    version = profile.get("version")
    if version != PROFILE_VERSION:
        raise ProfileProblem(f"{path} was written by {'an older' if isinstance(version, int) and version < PROFILE_VERSION else 'another'} "
                             f"specdec (profile version {version}, this one reads {PROFILE_VERSION}); tune again")
    if fp is not None and profile.get("fingerprint") != fp:
        other = profile.get("fingerprint")
        where = describe(other) if isinstance(other, dict) else "an unknown machine"
        raise ProfileProblem(f"{path} was tuned on {where}; this is {describe(fp)}: its choice does not apply here")
    return profile


def tune_marker(key: dict[str, Any]) -> Path:
    """Present while a tune for `key` runs; left behind when one was interrupted."""
    return profile_path(key).with_suffix(".tuning")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except PermissionError:
        return True
    except (OSError, ValueError, OverflowError):
        return False
    return True


def begin_tune(key: dict[str, Any]) -> None:
    marker = tune_marker(key)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}))


def end_tune(key: dict[str, Any]) -> None:
    tune_marker(key).unlink(missing_ok=True)


def interrupted_tune(key: dict[str, Any]) -> str | None:
    """A message when a tune for `key` started and never finished (its process is gone), else None."""
    marker = tune_marker(key)
    if not marker.is_file():
        return None
    try:
        info = json.loads(marker.read_text())
        pid, started = int(info["pid"]), str(info["started"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"a tune for this setting left an unreadable marker {marker}"
    if pid != os.getpid() and _pid_alive(pid):
        return None  # another process is tuning right now
    return f"a tune for this setting started {started} (process {pid}) and was interrupted"


def find_profile(key: dict[str, Any], fp: dict[str, Any] | None = None) -> dict[str, Any]:
    """The saved profile for `key`, or a ProfileProblem saying what is wrong and which tune fixes it."""
    path = profile_path(key)
    what = (f"target {key['target']}, draft {key['draft']}, device {key['device']}, dtype {key['dtype']}, "
            f"draft dtype {key.get('draft_dtype')}, {key.get('mode')} decoding")
    command = tune_command(key)
    interrupted = interrupted_tune(key)
    if interrupted is not None and not path.is_file():
        raise ProfileProblem(f"{interrupted}: no profile for {what}; run `{command}`", command)
    if not path.is_file():
        advice = (f"set `{command}` (auto then tunes on first use) or pass tree=PROFILE.json"
                  if key.get("target") == CUSTOM_MODELS else f"run `{command}` first, or pass --tree PROFILE.json")
        raise ProfileProblem(f"no tune profile for {what} on this machine (looked for {path}); {advice}", command)
    try:
        profile = read_profile(path, fp if fp is not None else fingerprint(key["device"]))
    except ProfileProblem as exc:
        raise ProfileProblem(f"{exc}; run `{command}`", command) from None
    if profile.get("key") != key:
        raise ProfileProblem(f"{path} holds a profile for another setting ({profile.get('key')}); run "
                             f"`{command}`", command)
    return profile


def profile_modes(key: dict[str, Any]) -> list[str]:
    """The decoding modes ("greedy", "sampling") of the saved profiles whose key equals `key` but
    for the mode (sorted; unreadable files are skipped)."""
    found = set()
    for path in sorted((measurement_dir() / "profiles").glob("tune__*.json")):
        try:
            other = json.loads(path.read_text()).get("key")
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            continue
        if isinstance(other, dict) and other.get("mode") in ("greedy", "sampling") \
                and all(other.get(k) == v for k, v in key.items() if k != "mode"):
            found.add(other["mode"])
    return sorted(found)


def save_profile(profile: dict[str, Any], path: Path | None = None) -> Path:
    path = path or profile_path(profile["key"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(profile, indent=1))
    tmp.replace(path)  # an interrupted save never leaves half a profile behind
    return path
