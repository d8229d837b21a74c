"""Cascade Speculative Drafting: review rule, k-matrix, greedy equivalence for any lenience and
k-matrix (with a planted bug — lenience at the target — that the same check catches), chi-square
at T = 1 on a toy with the cascade, SWI arithmetic, pipeline and command line."""

import copy
import json
from collections import Counter

import pytest
import torch

from specdec.core.results import VerifyResult
from specdec.core.sampling import SamplingConfig, sample
from specdec.drafting.bigram import BigramTable
from specdec.engine.cost import cost_ratios, parameter_count, standardized_walltime_improvement
from specdec.engine.decoder import SpeculativeDecoder
from specdec.methods.csd import CascadeDrafter, _ModelLevel, default_k_matrix, parse_k_matrix, review_accepts
from specdec.methods.sps import ModelDrafter
from specdec.models.hf import HFLanguageModel
from specdec.models.toy import MarkovLM
from tests.conftest import TINY_VOCAB, tiny_hf_model
from tests.engine.test_distribution import ALPHA, L, PROMPT, V, chi_square_pvalue, detectable_effect, exact_continuations

GREEDY = SamplingConfig()


# ---- the review rule ------------------------------------------------------------------------
def test_review_keeps_argmax_and_lenient_tokens_only():
    # (binary fractions, so the strict comparisons below are exact)
    probs = torch.tensor([[0.125, 0.625, 0.25], [0.5, 0.25, 0.25], [0.25, 0.125, 0.625]])  # [3, V=3]
    drafts = torch.tensor([1, 2, 2])
    one_hot = torch.ones(3)  # Max-Gram drafts: the bar is 1/l
    assert review_accepts(drafts, one_hot, probs, 1.0) == 1  # 2 is not the argmax of row 1
    assert review_accepts(drafts, one_hot, probs, 4.0) == 1  # 0.25 > 1/4 fails (strict)
    assert review_accepts(drafts, one_hot, probs, 5.0) == 3  # 0.25 > 1/5 passes; row 2 is argmax
    # a neural drafter's token x, proposed with probability q(x): kept when P(x) > q(x)/l
    assert review_accepts(drafts, torch.tensor([1.0, 0.75, 1.0]), probs, 3.0) == 1  # 0.25 > 0.25 fails
    assert review_accepts(drafts, torch.tensor([1.0, 0.5, 1.0]), probs, 3.0) == 3
    assert review_accepts(drafts[:0], one_hot[:0], probs[:0], 5.0) == 0


# ---- k-matrix -------------------------------------------------------------------------------
def test_default_k_matrices():
    assert default_k_matrix(1) == [[4, 2], [0, 6]]
    assert default_k_matrix(2) == [[4, 2, 2], [0, 2, 4], [0, 0, 6]]
    assert default_k_matrix(1, maxgram=False) == [[4]]
    assert default_k_matrix(2, maxgram=False) == [[4, 2], [0, 3]]
    for n in range(4):
        for mg in (True, False):
            if n + mg:
                assert parse_k_matrix(default_k_matrix(n, mg), n + mg) == default_k_matrix(n, mg)


def test_k_matrix_parsing_and_errors():
    assert parse_k_matrix("4,2;0,6", 2) == [[4, 2], [0, 6]]
    assert parse_k_matrix(" [[5, 14, 10], [0, 1, 10], [0, 0, 10]] ", 3)[0] == [5, 14, 10]
    assert parse_k_matrix([[3]], 1) == [[3]]
    for bad, message in [
        ("4,2", "must be 2x2"),
        ("4,2;0,6;0,0", "must be 2x2"),
        ("4,x;0,6", "must look like"),
        ("4,-1;0,6", "integers >= 0"),
        ("4,2;1,6", "below the diagonal"),
        ("0,0;0,6", "must sum to >= 1"),
        (7, "list of rows"),
        ([[1.5, 0], [0, 1]], "integers >= 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_k_matrix(bad, 2)


def test_drafter_rejects_bad_settings():
    a, b = MarkovLM.random(4, seed=1), MarkovLM.random(5, seed=2)
    with pytest.raises(ValueError, match="lenience"):
        CascadeDrafter([a], lenience=0.5)
    with pytest.raises(ValueError, match="lenience"):
        CascadeDrafter([a], lenience=float("nan"))
    with pytest.raises(ValueError, match="different vocabularies"):
        CascadeDrafter([a, b])
    with pytest.raises(ValueError, match="at least one level"):
        CascadeDrafter([], maxgram=False)
    with pytest.raises(ValueError, match="must be 2x2"):
        CascadeDrafter([a], k_matrix=[[4]])
    with pytest.raises(ValueError, match="another tokenizer"):
        CascadeDrafter([a], bigram=BigramTable(torch.tensor([1, 2, 3, 4, 5, 0], dtype=torch.int32)))


# ---- greedy equivalence ---------------------------------------------------------------------
def _prompt(seed: int, n: int = 16) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, TINY_VOCAB, (n // 2,), generator=g)
    return torch.cat([base, base]).tolist()  # a repeat gives Max-Gram something to copy


def _perturbed(model, scale: float, seed: int) -> HFLanguageModel:
    """The target with noise on every weight: a drafter that agrees with it part of the time."""
    noisy = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return HFLanguageModel(noisy)


def _bigram(seed: int) -> BigramTable:
    g = torch.Generator().manual_seed(seed)
    return BigramTable(torch.randint(0, TINY_VOCAB, (TINY_VOCAB,), generator=g, dtype=torch.int32))


def lenient_target_verifier(target, drafter: CascadeDrafter, lenience: float):
    """THE BUG the cascade must not have: the target reviewing the chain as the levels below it do,
    with lenience (softmax of its own logits against the proposing level's confidence)."""
    seen = {}
    forward = target.forward

    def recording_forward(*args, **kwargs):
        seen["logits"] = forward(*args, **kwargs)
        return seen["logits"]

    target.forward = recording_forward

    def verifier(tree, target_probs, generator):  # tree: a chain of γ drafts; target_probs: [γ + 1, V]
        probs = torch.softmax(seen["logits"].float(), dim=-1)
        n = review_accepts(tree.tokens[1:], drafter.last_conf, probs[:-1], lenience)
        return VerifyResult(tuple(range(1, n + 1)), int(probs[n].argmax()))

    return verifier


def run_cascade_greedy(target, drafter: CascadeDrafter, prompt, max_new: int, eos=(), target_lenience=None):
    """Stream a greedy cascade run, checking the loop's invariants after every target call."""
    verifier = lenient_target_verifier(target, drafter, target_lenience) if target_lenience else None
    dec = SpeculativeDecoder(target, drafter, GREEDY, eos_token_ids=eos, verifier=verifier)
    assert dec.gamma == sum(drafter.k_matrix[0])
    out: list[int] = []
    try:
        for chunk in dec.stream(prompt, max_new):
            assert 1 <= len(chunk) <= dec.gamma + 1
            out.extend(chunk)
            if dec.last_stats.stopped_by == "":
                committed = torch.tensor(prompt + out)
                assert target.kv_len == committed.shape[0] - 1
                for level in drafter.levels:  # draft caches hold committed tokens only
                    if isinstance(level, _ModelLevel):
                        assert level.lm.kv_len == level.cached.shape[0] <= committed.shape[0]
                        assert torch.equal(level.cached, committed[: level.cached.shape[0]])
    finally:
        target.__dict__.pop("forward", None)  # undo the recording wrapper of a planted bug
    stats = dec.last_stats
    assert stats.target_calls <= stats.new_tokens
    return out, stats


@pytest.fixture(scope="module")
def tiny_family():
    """A tiny target, an exact copy and two noisier copies of it, and its AR greedy outputs."""
    model = tiny_hf_model("llama", seed=0)
    target = HFLanguageModel(model)
    prompts = [_prompt(1), _prompt(2)]
    refs = [SpeculativeDecoder(target, None, GREEDY).generate(p, 40)[0] for p in prompts]
    return model, target, prompts, refs


# (drafters: "copy" = the target's weights, "near"/"far" = small/larger noise), maxgram, k-matrix, lenience
CONFIGS = [
    (("copy", "far"), True, None, 1.0),
    (("copy", "far"), True, [[4, 0, 0], [0, 2, 4], [0, 0, 6]], 1.0),
    (("copy", "far"), True, [[4, 0, 0], [0, 2, 4], [0, 0, 6]], 20.0),
    (("near", "far"), True, [[3, 2, 1], [0, 1, 4], [0, 0, 5]], 2.0),
    (("near", "far"), True, [[2, 0, 3], [0, 2, 2], [0, 0, 3]], 10.0),
    (("near", "far"), False, [[3, 2], [0, 2]], 3.0),
    (("near",), True, None, 5.0),
]


def _drafter(model, names, maxgram, k, lenience) -> CascadeDrafter:
    make = {"copy": lambda: HFLanguageModel(model), "near": lambda: _perturbed(model, 0.02, 1),
            "far": lambda: _perturbed(model, 0.1, 2)}
    return CascadeDrafter([make[n]() for n in names], k, lenience, maxgram=maxgram, bigram=_bigram(3))


@pytest.mark.parametrize("config", range(len(CONFIGS)))
def test_greedy_cascade_equals_ar(tiny_family, config):
    model, target, prompts, refs = tiny_family
    names, maxgram, k, lenience = CONFIGS[config]
    for prompt, ref in [(prompts[config % 2], refs[config % 2])]:
        drafter = _drafter(model, names, maxgram, k, lenience)
        out, stats = run_cascade_greedy(target, drafter, prompt, 40)
        assert out == ref
        assert stats.draft_tokens > 0
        if names[0] == "copy" and k and k[0] == [4, 0, 0]:
            # Every token the target sees was kept by a copy of itself: with exact reviews all pass;
            # with lenience the copy also lets non-argmax tokens through, which the target rejects.
            if lenience == 1.0:
                assert stats.accepted_tokens == stats.draft_tokens
            else:
                assert stats.accepted_tokens < stats.draft_tokens


def test_planted_bug_lenience_at_the_target_is_caught(tiny_family):
    """The same check as above, with the target reviewing leniently: the output leaves AR's."""
    model, target, prompts, refs = tiny_family
    caught = 0
    for config, (names, maxgram, k, lenience) in enumerate(CONFIGS):
        if lenience == 1.0:
            continue
        drafter = _drafter(model, names, maxgram, k, lenience)
        out, _ = run_cascade_greedy(target, drafter, prompts[config % 2], 40, target_lenience=lenience)
        caught += out != refs[config % 2]
    assert caught >= 3


def test_eos_and_length_with_the_cascade(tiny_family):
    model, target, prompts, refs = tiny_family
    ref = refs[0]
    eos = ref[12]
    cut = ref.index(eos) + 1
    out, stats = run_cascade_greedy(target, _drafter(model, ("copy", "far"), True, None, 2.0), prompts[0], 40, eos=[eos])
    assert out == ref[:cut] and stats.stopped_by == "eos"
    out, stats = run_cascade_greedy(target, _drafter(model, ("near", "far"), True, None, 2.0), prompts[0], 9)
    assert out == ref[:9] and stats.stopped_by == "length"


def test_qwen2_architecture():
    model = tiny_hf_model("qwen2", seed=4)
    target = HFLanguageModel(model)
    prompt = _prompt(5)
    ref, _ = SpeculativeDecoder(target, None, GREEDY).generate(prompt, 32)
    for lenience in (1.0, 4.0):
        drafter = CascadeDrafter([_perturbed(model, 0.02, 6), _perturbed(model, 0.1, 7)], None, lenience, bigram=_bigram(8))
        assert run_cascade_greedy(target, drafter, prompt, 32)[0] == ref


# ---- sampling: chi-square at T = 1 on a toy ----------------------------------------------------
def _toy_cascade(lenience: float) -> tuple[MarkovLM, CascadeDrafter]:
    target = MarkovLM.random(V, seed=11, sharpness=1.5)
    g = torch.Generator().manual_seed(12)
    # drafters: the target's table with more and more noise (they agree with it part of the time)
    drafts = [MarkovLM(target.table + noise * torch.randn(target.table.shape, generator=g, dtype=target.table.dtype))
              for noise in (0.5, 1.5)]
    bigram = BigramTable(torch.tensor([2, 0, 3, 1], dtype=torch.int32))
    return target, CascadeDrafter(drafts, [[1, 1, 1], [0, 1, 2], [0, 0, 2]], lenience, bigram=bigram)


def lenient_sampling_verifier(drafter: CascadeDrafter, lenience: float):
    """THE BUG, sampling edition: drafts kept when the target's p(x) > q(x)/l, then a target sample."""
    def verifier(tree, target_probs, generator):  # tree: a chain of γ drafts; target_probs: [γ + 1, V]
        n = review_accepts(tree.tokens[1:], drafter.last_conf, target_probs[:-1], lenience)
        return VerifyResult(tuple(range(1, n + 1)), int(sample(target_probs[n], generator)))

    return verifier


def _sample_cascade(n: int, planted_bug: bool = False):
    sampling = SamplingConfig(temperature=1.0)
    target, drafter = _toy_cascade(lenience=3.0)
    verifier = lenient_sampling_verifier(drafter, 3.0) if planted_bug else None
    dec = SpeculativeDecoder(target, drafter, sampling, verifier=verifier)
    gen = torch.Generator().manual_seed(1)
    counts: Counter = Counter()
    accepted = 0
    for _ in range(n):
        out, stats = dec.generate(PROMPT, L, gen)
        counts[tuple(out)] += 1
        accepted += stats.accepted_tokens
        assert 1 <= stats.target_calls <= stats.new_tokens
    return counts, exact_continuations(target, sampling, None), accepted


def test_cascade_sampling_matches_target_distribution(one_thread):
    """n = 2000 over 42 cells: power ≥ 0.99 at alpha = 1e-3 against any law at total variation ≥ 0.097
    from the target's (chi-square divergence ≥ 0.038). Sample-and-match has no residual to get wrong."""
    n = 2000
    counts, expected, accepted = _sample_cascade(n)
    assert detectable_effect(n, expected).tv < 0.1
    assert accepted > 0.1 * n, "the cascade's drafts were rarely accepted: verification would not be exercised"
    assert chi_square_pvalue(counts, expected, n) > ALPHA


def test_planted_bug_lenient_target_fails_chi_square(one_thread):
    """Lenience at the target: chi-square divergence 6.1 (TV 0.86, exact: tests.exact_law over the whole
    mutated loop), caught with power ≥ 0.99 from n ≈ 12 on; n = 1000 here."""
    n = 1000
    counts, expected, _ = _sample_cascade(n, planted_bug=True)
    assert chi_square_pvalue(counts, expected, n) < ALPHA


# ---- SWI --------------------------------------------------------------------------------------
def test_swi_arithmetic_on_a_fixed_trace():
    # FLAN-T5-xxl target (11300) with base (220) and small (60) drafters and Max-Gram (free):
    # 10 target calls, 30 base reviews, 50 small reviews, 42 tokens
    swi = standardized_walltime_improvement(42, 10, [30, 50, 400], [220 / 11300, 60 / 11300, 0.0])
    assert swi == pytest.approx(42 * 11300 / (10 * 11300 + 30 * 220 + 50 * 60))
    assert standardized_walltime_improvement(17, 17, [], []) == 1.0  # AR
    assert standardized_walltime_improvement(30, 10, [0], [0.5]) == 3.0
    assert standardized_walltime_improvement(0, 0, [], []) == 0.0
    with pytest.raises(ValueError, match="cost ratios"):
        standardized_walltime_improvement(1, 1, [1], [])
    with pytest.raises(ValueError, match=">= 0"):
        standardized_walltime_improvement(1, 1, [1], [-0.5])


def test_swi_in_decoder_stats_counts_every_draft_forward():
    target, drafter = _toy_cascade(lenience=2.0)
    d1, d2 = drafter.draft_models
    target.num_parameters, d1.num_parameters, d2.num_parameters = 1000, 100, 10
    out, stats = SpeculativeDecoder(target, drafter, GREEDY).generate(PROMPT, 12)
    # MarkovLM counts its own forward passes: the trace is the models' real call counts
    assert stats.draft_forward_calls == [d1.calls, d2.calls] and d1.calls > 0 and d2.calls > 0
    assert stats.draft_cost_ratios == [0.1, 0.01]
    assert stats.swi == pytest.approx(stats.new_tokens / (stats.target_calls + 0.1 * d1.calls + 0.01 * d2.calls))
    assert json.loads(json.dumps(stats.to_dict()))["swi"] == stats.swi
    # AR is 1 by definition; classic SpS pays one draft call per drafted token
    assert SpeculativeDecoder(target, None, GREEDY).generate(PROMPT, 12)[1].swi == 1.0
    draft = MarkovLM.random(V, seed=12)
    draft.num_parameters = 500
    sps = SpeculativeDecoder(target, ModelDrafter(draft, GREEDY), GREEDY, gamma=3).generate(PROMPT, 12)[1]
    assert sps.draft_forward_calls == [draft.calls] == [sps.draft_tokens]
    assert sps.swi == pytest.approx(12 / (sps.target_calls + 0.5 * sps.draft_tokens))
    # without parameter counts there is no SWI rather than a wrong one
    _, unknown = _toy_cascade(lenience=1.0)
    assert SpeculativeDecoder(MarkovLM.random(V, seed=11), unknown, GREEDY).generate(PROMPT, 6)[1].swi is None


def test_parameter_count_is_the_architectures():
    model = tiny_hf_model("llama", seed=0)
    lm = HFLanguageModel(model)
    assert parameter_count(lm) == sum(p.numel() for p in model.parameters())
    from specdec.models.dense.fastpath import enable_packed_linears, packed_linear_supported

    packed = copy.deepcopy(model)
    if packed_linear_supported(packed) and enable_packed_linears(packed, "on"):
        assert parameter_count(HFLanguageModel(packed)) == parameter_count(lm)  # weights moved to buffers
    assert cost_ratios(lm, [lm]) == [1.0]
    assert cost_ratios(lm, [MarkovLM.random(4, seed=0)]) is None


# ---- pipeline and command line ------------------------------------------------------------------
def test_pipeline_methods_and_options(tiny_family):
    from specdec.engine.pipeline import Pipeline

    model, target, prompts, refs = tiny_family
    pipe = Pipeline.from_models(target, None, _perturbed(model, 0.02, 1))
    pipe.draft_lms = [pipe.draft_lm, _perturbed(model, 0.1, 2)]
    res = pipe.generate(prompts[0], "csd", 40, k_matrix="3,1,1;0,1,2;0,0,3", lenience=2, maxgram_fill="none")
    assert res.token_ids == refs[0] and len(res.stats.draft_forward_calls) == 2
    res = pipe.generate(prompts[0], "csd", 40, no_maxgram=True, k_matrix=[[2, 1], [0, 2]])
    assert res.token_ids == refs[0]
    res = pipe.generate(prompts[0], "maxgram", 40, maxgram_fill="none", gamma=3)
    assert res.token_ids == refs[0] and res.stats.draft_tokens > 0
    with pytest.raises(ValueError, match="needs the target's tokenizer"):
        pipe.generate(prompts[0], "csd", 4)
    with pytest.raises(ValueError, match="3x3"):
        pipe.generate(prompts[0], "csd", 4, maxgram_fill="none", k_matrix="4,2;0,6")
    with pytest.raises(ValueError, match="lenience"):
        pipe.generate(prompts[0], "csd", 4, maxgram_fill="none", lenience="lots")
    with pytest.raises(ValueError, match="maxgram_fill"):
        pipe.generate(prompts[0], "maxgram", 4, maxgram_fill="trigram")


def test_cli_generate_csd_json(tmp_path, monkeypatch, capsys):
    import specdec.drafting.bigram as maxgram
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from specdec.cli import main

    vocab = {f"w{i}": i for i in range(TINY_VOCAB - 1)}
    vocab["[UNK]"] = TINY_VOCAB - 1
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    model = tiny_hf_model("llama", seed=0)
    dirs = {}
    for name, m in [("target", model), ("near", _perturbed(model, 0.02, 1).model), ("far", _perturbed(model, 0.1, 2).model)]:
        m.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
        dirs[name] = str(tmp_path / name)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "c.py").write_text("w1 w2 w3 w1 w2 w4")
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(maxgram, "default_corpus_root", lambda: corpus)
    monkeypatch.setattr(maxgram, "_LOADED", {})
    common = ["generate", "--target", dirs["target"], "--prompt", "w5 w6 w7 w8 w5 w6", "--max-new-tokens", "16", "--json"]
    assert main(common + ["--method", "ar"]) == 0
    ar = json.loads(capsys.readouterr().out)
    assert main(common + ["--method", "csd", "--draft", dirs["near"], "--draft", dirs["far"],
                          "--k-matrix", "3,1,1;0,1,2;0,0,3", "--lenience", "2"]) == 0
    csd = json.loads(capsys.readouterr().out)
    assert csd["token_ids"] == ar["token_ids"]
    assert csd["stats"]["swi"] > 0 and len(csd["stats"]["draft_forward_calls"]) == 2
    assert ar["stats"]["swi"] == 1.0
    assert list((tmp_path / "cache" / "bigram").glob("*.safetensors"))  # built on first use, cached
    assert main(common + ["--method", "maxgram"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == ar["token_ids"]
    assert main(common + ["--method", "csd", "--draft", dirs["near"], "--k-matrix", "4"]) == 2
    assert "2x2" in capsys.readouterr().err


# ---- the real SmolLM2-135M ----------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.real
def test_cascade_greedy_equivalence_on_smollm2(smol):
    from specdec.drafting.bigram import build_bigram_table, corpus_files, read_corpus
    from specdec.engine.pipeline import eos_ids
    from tests.engine.test_real import _shallow_copy

    model, tok = smol
    prompt = tok("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n")["input_ids"]
    eos = eos_ids(model, tok)
    target = HFLanguageModel(model)
    ref, _ = SpeculativeDecoder(target, None, GREEDY, eos_token_ids=eos).generate(prompt, 20)
    # a bigram table from a slice of the standard library (the real build reads ~4 MB)
    texts, _ = read_corpus(corpus_files(None), 200_000)
    table, _ = build_bigram_table(lambda s: tok(s, add_special_tokens=False, verbose=False)["input_ids"], texts,
                                  target.vocab_size)
    full = HFLanguageModel(model)  # the target's weights: what it keeps at lenience 1, the target accepts
    shallow = HFLanguageModel(_shallow_copy(model, 8))
    tiny = HFLanguageModel(_shallow_copy(model, 2))
    exact_top = [[4, 0, 0], [0, 2, 4], [0, 0, 6]]  # the target sees only tokens `full` kept
    for drafts, k, lenience in [([full, shallow], exact_top, 1.0), ([shallow, tiny], None, 3.0)]:
        drafter = CascadeDrafter(drafts, k, lenience, bigram=table)
        out, stats = run_cascade_greedy(target, drafter, prompt, 20, eos=eos)
        assert out == ref, f"csd {k} lenience {lenience} changed the greedy output"
        if drafts[0] is full:
            assert stats.accepted_tokens == stats.draft_tokens > 0
    # the planted bug: with lenience the copy keeps non-argmax tokens, and a lenient target passes them
    drafter = CascadeDrafter([full, shallow], exact_top, 20.0, bigram=table)
    assert run_cascade_greedy(target, drafter, prompt, 20, eos=eos, target_lenience=20.0)[0] != ref
