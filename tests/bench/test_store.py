"""`specdec bench` output directory: rows made with other settings are refused, older ones resume."""

import pytest

from specdec.bench.settings import BenchSettings, fingerprint
from specdec.bench.store import check_out_dir, write_config


def test_out_dir_refuses_rows_made_with_other_run_settings(tmp_path):
    settings = BenchSettings(methods=["ar"], run_info={"device": "cpu", "fast_linear": "auto"})
    fp = fingerprint(settings, "t", "torch.float32")
    write_config(tmp_path, fp, None, "cmd", "s1")
    check_out_dir(tmp_path, fp)  # same settings: resumes
    other = fingerprint(
        BenchSettings(methods=["ar"], run_info={"device": "cpu", "fast_linear": "off"}), "t", "torch.float32"
    )
    with pytest.raises(ValueError, match="fast_linear"):
        check_out_dir(tmp_path, other)
    # A directory written before `run` was recorded can still be resumed.
    legacy = dict(fp)
    del legacy["run"]
    write_config(tmp_path, legacy, None, "cmd", "s0")
    check_out_dir(tmp_path, other)
