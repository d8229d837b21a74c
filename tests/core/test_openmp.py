"""`import specdec` bounds libgomp's spin before torch loads, and only then (specdec/core/openmp.py)."""

import os
import subprocess
import sys

import pytest

SHOW = "import os; print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'))"


def _run(code: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
                         check=True, timeout=120)
    return out.stdout.strip()


def test_import_sets_the_spin_before_torch_loads():
    assert _run(f"import specdec; import torch; {SHOW}") == "20000 None"


@pytest.mark.parametrize("env", [{"GOMP_SPINCOUNT": "5"}, {"OMP_WAIT_POLICY": "ACTIVE"}])
def test_a_users_setting_is_kept(env):
    shown = _run(f"import specdec; {SHOW}", **env).split()
    assert shown == [env.get("GOMP_SPINCOUNT", "None"), env.get("OMP_WAIT_POLICY", "None")]


def test_too_late_once_torch_is_loaded_and_the_hint_says_so_once():
    code = ("import torch, specdec; from specdec.core.openmp import spin_hint; "
            f"{SHOW}; print(spin_hint() is not None, spin_hint() is None)")
    assert _run(code).splitlines() == ["None None", "True True"]
