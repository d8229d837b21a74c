"""Tensor parallelism (models/parallel): a target sharded over 2 or 3 CPU processes (gloo) gives every
method exactly the single-process output, greedy and seeded-sampled; the refusals are clear and
immediate; a killed worker fails the run within seconds and takes the other ranks down with it.

Tiny random checkpoints are saved to a temporary directory, so the worker processes load them
through the same loader as rank 0. The SmolLM2 versions are in test_parallel_real.py.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from specdec.cli import build_parser, main
from specdec.core.sampling import SamplingConfig
from specdec.core.store import profile_path, save_profile
from specdec.engine.pipeline import Pipeline
from specdec.methods.registry import all_methods, get_method
from specdec.models.parallel.group import TensorParallelError
from specdec.models.parallel.launch import check_shardable
from specdec.models.parallel.target import ShardedTarget
from tests.serving.server_helpers import save_tiny_checkpoints, tiny_tokenizer

PROMPT = "hello world, tell me a story"
GREEDY = SamplingConfig()
# Max-Gram's bigram table is built from a corpus; these tests need none of it.
OPTS = {"csd": {"maxgram_fill": "none"}, "maxgram": {"maxgram_fill": "none"}}
METHODS = [m for m in all_methods() if m != "auto"]  # auto needs a tune profile: test_tune_and_auto_…


@pytest.fixture(scope="module")
def restore_threads():
    # A CPU rank 0 lowers torch's thread count so that its ranks share the cores.
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


def save_qwen2_checkpoints(root: Path, tokenizer, noise: float = 0.05) -> tuple[Path, Path]:
    """A tiny random Qwen2 target (q/k/v biases: sharded with their columns, 16 greedy tokens before
    its EOS) and a draft that is the target plus weight noise, saved with the tokenizer."""
    return save_tiny_checkpoints(root, tokenizer, noise, arch="qwen2", seed=2)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return save_qwen2_checkpoints(tmp_path_factory.mktemp("tp-ckpt"), tiny_tokenizer())


@pytest.fixture(scope="module")
def pipes(checkpoints, restore_threads):
    """(single-process pipeline, the same models with the target sharded over 2 processes)."""
    target, draft = checkpoints
    sharded = Pipeline(str(target), str(draft), fast_linear="off", progress=False, tensor_parallel_size=2)
    single = Pipeline(str(target), str(draft), fast_linear="off", progress=False)
    yield single, sharded
    sharded.close()


@pytest.fixture(scope="module")
def sharded_ar(pipes):
    return pipes[1].generate(PROMPT, "ar", 16).token_ids


def test_each_rank_holds_its_share_of_the_kv_heads_and_the_logits_are_the_whole_model(pipes):
    single, sharded = pipes
    ids = torch.tensor(single.encode(PROMPT))
    out = []
    for lm in (single.target_lm, sharded.target_lm):
        lm.reset(64)
        logits = lm.forward(ids[:-2])
        lm.commit(torch.tensor([0, 2, 3]))  # by index: a gather on each rank's shard of the cache
        out.append((logits, lm.forward(ids[-2:]), lm.cached_kv(0)[0]))
    (logits_1, next_1, keys_1), (logits_2, next_2, keys_2) = out
    assert keys_1.shape[1] == 2 and keys_2.shape[1] == 1  # 2 KV heads, split over 2 ranks
    torch.testing.assert_close(keys_2, keys_1[:, :1])  # rank 0 holds the first head
    torch.testing.assert_close(logits_2, logits_1, rtol=1e-4, atol=1e-4)  # all-reduce order: round-off only
    torch.testing.assert_close(next_2, next_1, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_greedy_output_of_every_method_equals_the_single_process_output(pipes, sharded_ar, method):
    single, sharded = pipes
    ref = single.generate(PROMPT, method, 16, **OPTS.get(method, {}))
    got = sharded.generate(PROMPT, method, 16, **OPTS.get(method, {}))
    assert got.token_ids == ref.token_ids == sharded_ar and len(sharded_ar) == 16
    # The same drafts were proposed and accepted: the ranks agreed on every step, not only on the text.
    assert (got.stats.target_calls, got.stats.accepted_tokens) == (ref.stats.target_calls, ref.stats.accepted_tokens)
    if get_method(method).needs_draft_model:  # the sharded commit of kept drafts and of refused ones
        assert 0 < got.stats.accepted_tokens < got.stats.draft_tokens, (method, got.stats)


def test_a_rank_that_commits_the_wrong_slots_is_caught(pipes, sharded_ar, monkeypatch):
    """The planted bug: the other rank keeps the first tokens of a tree instead of gathering the accepted
    path. Rank 0 is right, the other rank's half of the heads is wrong, and the output changes."""
    def commit_in_place_on_the_other_rank(self, keep):
        self.group.check()
        self.lm.commit(keep)
        self._pending.append(["commit", keep if isinstance(keep, int) else len(keep)])

    monkeypatch.setattr(ShardedTarget, "commit", commit_in_place_on_the_other_rank)
    assert pipes[1].generate(PROMPT, "specexec", 16).token_ids != sharded_ar


def test_the_drafts_are_sometimes_rejected(pipes):
    # Otherwise the equality above would not exercise rejection and commit-by-index.
    stats = pipes[1].generate(PROMPT, "specinfer", 16).stats
    assert 0 < stats.accepted_tokens < stats.draft_tokens


@pytest.mark.parametrize("method", ["sps", "specinfer", "sequoia"])
def test_a_seeded_sampled_run_equals_the_single_process_run(pipes, sharded_ar, method):
    single, sharded = pipes
    sampling = SamplingConfig(temperature=0.9, top_p=0.95)
    ref = single.generate(PROMPT, method, 16, sampling=sampling, seed=11)
    got = sharded.generate(PROMPT, method, 16, sampling=sampling, seed=11)
    assert got.token_ids == ref.token_ids
    assert got.token_ids != sharded_ar  # it really sampled
    other = sharded.generate(PROMPT, method, 16, sampling=sampling, seed=12)
    assert other.token_ids != got.token_ids  # and the seed matters


def test_a_call_every_rank_refuses_leaves_the_ranks_in_step(pipes, sharded_ar):
    lm = pipes[1].target_lm
    lm.reset(32)
    lm.forward(torch.arange(4))
    with pytest.raises(ValueError, match="parents must be"):  # refused on rank 0 and, identically, on rank 1
        lm.forward(torch.arange(3), torch.tensor([-1, 7, 0]), append=True)
    with pytest.raises(ValueError, match="cannot commit 9 tokens of 4 pending"):  # refused here, never sent
        lm.commit(9)
    assert pipes[1].generate(PROMPT, "sps", 16).token_ids == sharded_ar


def test_tune_and_auto_run_on_a_sharded_target(pipes, sharded_ar, tmp_path, monkeypatch):
    from specdec.tuning.choice import tune

    single, sharded = pipes
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path))
    key = sharded.profile_key(GREEDY)
    assert key["tensor_parallel_size"] == 2 and "tensor_parallel_size" not in single.profile_key(GREEDY)  # timed apart
    profile = tune(sharded.target_lm, sharded.draft_lm, [sharded.encode(PROMPT)], GREEDY, key, sizes=(1, 2),
                   max_depth=2, width=2, gen_tokens=4, measure_prompts=0, repeats=1, context=16)
    assert set(profile["timing"]["target_ms"]) >= {"1", "2", "3"}
    save_profile(profile, profile_path(key))
    assert sharded.generate(PROMPT, "auto", 16).token_ids == sharded_ar


def test_the_server_answers_from_rank_0(pipes):
    httpx = pytest.importorskip("httpx", reason="needs the test extra")
    pytest.importorskip("fastapi", reason="needs the server extra")
    from specdec.serving.app import create_app
    from tests.serving.server_helpers import running_server

    single, sharded = pipes
    ref = single.generate(PROMPT, "specinfer", 12, chat=False)
    app = create_app(sharded, "specinfer", {}, "tiny", default_max_tokens=12)
    with running_server(app) as url:
        res = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": PROMPT, "temperature": 0},
                         timeout=120)
    assert res.status_code == 200, res.text
    body = res.json()
    assert body["choices"][0]["text"] == ref.text
    assert body["usage"]["speculative"]["target_calls"] == ref.stats.target_calls


# ---- the command line ----------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["generate", "serve", "bench", "tune", "demo"])
def test_every_model_command_takes_the_flag(command):
    required = ["--prompts", "p.jsonl", "--out", "o"] if command == "bench" else []
    args = build_parser(command).parse_args([command, *required, "--tensor-parallel-size", "4"])
    assert args.tensor_parallel_size == 4


def test_bench_refuses_the_hf_peers_with_a_sharded_target(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "a", "task": "qa", "turns": ["hi"]}) + "\n")
    code = main(["bench", "--prompts", str(prompts), "--out", str(tmp_path / "o"), "--methods", "ar,hf-ar",
                 "--tensor-parallel-size", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot drive a target sharded" in err and "Traceback" not in err


def test_under_torchrun_the_size_must_be_given_and_match(checkpoints, capsys, monkeypatch, restore_threads):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    base = ["generate", "--target", str(checkpoints[0]), "--method", "ar", "--prompt", "x", "--fast-linear", "off"]
    assert main(base) == 2
    assert "pass --tensor-parallel-size 2" in capsys.readouterr().err
    assert main(base + ["--tensor-parallel-size", "3"]) == 2
    assert "started 2 processes (WORLD_SIZE) but the tensor-parallel size is 3" in capsys.readouterr().err


# ---- refusals (no process is started) ------------------------------------------------------------
def test_a_size_that_does_not_divide_the_heads_is_refused(checkpoints):
    with pytest.raises(ValueError, match=r"4 attention heads and 2 key/value heads, which do not split evenly over "
                                         r"3 tensor-parallel ranks; sizes that divide both: 1, 2"):
        Pipeline(str(checkpoints[0]), tensor_parallel_size=3, progress=False)


@pytest.mark.parametrize("size", [0, -2, 1.5, True])
def test_a_bad_size_is_refused(checkpoints, size):
    with pytest.raises(ValueError, match="tensor-parallel size must be a positive integer"):
        Pipeline(str(checkpoints[0]), tensor_parallel_size=size, progress=False)


def test_offload_and_tensor_parallelism_are_refused_together(checkpoints):
    with pytest.raises(ValueError, match="offloading and tensor parallelism do not combine"):
        Pipeline(str(checkpoints[0]), tensor_parallel_size=2, offload=True, progress=False)


def test_a_missing_backend_is_refused(checkpoints, monkeypatch):
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_gloo_available", lambda: False)
    with pytest.raises(TensorParallelError, match="needs the gloo backend"):
        Pipeline(str(checkpoints[0]), tensor_parallel_size=2, progress=False)


def test_a_model_without_a_tensor_parallel_plan_is_refused():
    from transformers import LlamaConfig

    config = LlamaConfig(num_attention_heads=4, num_key_value_heads=2)
    check_shardable(config, 2, "tiny")  # Llama has a plan
    config.base_model_tp_plan = None
    with pytest.raises(ValueError, match="transformers has no tensor-parallel plan for tiny"):
        check_shardable(config, 2, "tiny")


# ---- a dying worker ------------------------------------------------------------------------------
def _worker_pids() -> dict[int, int]:
    """{rank: pid} of the tensor-parallel workers this process started (Linux /proc)."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) != os.getpid():
                continue
            env = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        ranks = [int(e[5:]) for e in env if e.startswith(b"RANK=")]
        if ranks:
            out[ranks[0]] = int(stat.parent.name)
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker through /proc")
def test_a_killed_worker_ends_the_command_within_seconds_with_one_clear_line(tmp_path, capsys, monkeypatch,
                                                                             restore_threads):
    """`specdec generate --tensor-parallel-size 2` (Llama this time): the worker is killed before the 6th
    target forward; the command fails at once with the reason, and nothing is left running."""
    target, _ = save_tiny_checkpoints(tmp_path, tiny_tokenizer())
    forward = ShardedTarget.forward
    calls, victims = [], {}

    def forward_then_die(self, *args, **kwargs):
        calls.append(time.monotonic())
        if len(calls) == 6:
            victims.update(_worker_pids())
            os.kill(victims[1], signal.SIGKILL)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(ShardedTarget, "forward", forward_then_die)
    code = main(["generate", "--target", str(target), "--method", "ar", "--prompt", PROMPT, "--max-new-tokens", "64",
                 "--fast-linear", "off", "--json", "--tensor-parallel-size", "2"])
    err = capsys.readouterr().err
    assert code == 2 and len(calls) == 6  # the call that met the dead worker was the last
    assert time.monotonic() - calls[-1] < 10
    assert f"specdec: error: tensor-parallel worker rank 1 (pid {victims[1]}) was killed by signal 9" in err
    assert "Traceback" not in err
    assert not _worker_pids()  # reaped: nothing left running
