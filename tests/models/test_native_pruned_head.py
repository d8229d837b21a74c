"""A native draft with its output head pruned to some tokens: the kept logits are the full head's bit
for bit, the rest are -inf, and speculative output with it as the draft equals plain decoding."""

import pytest
import torch

from specdec.core.sampling import SamplingConfig
from specdec.engine.decoder import SpeculativeDecoder
from specdec.methods.hybrid import HybridDrafter
from specdec.methods.sps import ModelDrafter
from specdec.models.native.linear import GGUFLinear
from specdec.models.native.lm import NativeLM
from specdec.models.native.runner import NativeModel
from tests.conftest import TINY_VOCAB, needs_kernels
from tests.models.test_native import _tiny_native

pytestmark = needs_kernels
KEPT = torch.cat([torch.arange(0, TINY_VOCAB, 3), torch.tensor([TINY_VOCAB - 1])])  # not a multiple of 16 rows


def _tied_native(seed: int) -> NativeModel:
    model = _tiny_native("Q4_K", "qwen2", seed)
    emb = model.model.embed_tokens
    model.lm_head = GGUFLinear(emb.blocks, emb.fmt.name, emb.embedding_dim)
    model.config.tie_word_embeddings = True
    return NativeModel.from_hf(model)


def test_kept_logits_are_the_full_heads_bit_for_bit_and_the_rest_minus_inf(one_thread):
    full = _tied_native(0)
    pruned = full.with_pruned_head(KEPT)
    ids = torch.randint(0, TINY_VOCAB, (9,), generator=torch.Generator().manual_seed(1))
    a, b = NativeLM(full), NativeLM(pruned)
    for lm in (a, b):
        lm.reset(32)
    la, lb = a.forward(ids), b.forward(ids)
    assert torch.equal(lb[:, KEPT], la[:, KEPT])
    rest = torch.ones(TINY_VOCAB, dtype=torch.bool)
    rest[KEPT] = False
    assert bool(torch.isneginf(lb[:, rest]).all()) and b.vocab_size == TINY_VOCAB
    assert pruned.head.nbytes() < full.head.nbytes()
    # A head of its own: its rows come from `head_source` (what the loader reads again from the file).
    model = _tiny_native("Q4_K", "qwen2", 0)
    untied = NativeModel.from_hf(model)
    with pytest.raises(ValueError, match="head's blocks"):
        untied.with_pruned_head(KEPT)
    untied.head_source = lambda kept: (model.lm_head.blocks[kept], model.lm_head.fmt, model.lm_head.in_features)
    c, d = NativeLM(untied), NativeLM(untied.with_pruned_head(KEPT))
    for lm in (c, d):
        lm.reset(32)
    assert torch.equal(d.forward(ids)[:, KEPT], c.forward(ids)[:, KEPT])


def test_a_pruned_native_draft_keeps_the_greedy_output(one_thread):
    target = NativeLM(_tied_native(0))
    prompt = torch.randint(0, TINY_VOCAB, (8,), generator=torch.Generator().manual_seed(5)).tolist() * 2
    ref, _ = SpeculativeDecoder(target).generate(prompt, 24)
    greedy = SamplingConfig()
    for drafter in (ModelDrafter(NativeLM(_tied_native(0).with_pruned_head(KEPT)), greedy, 3),
                    HybridDrafter(NativeLM(_tied_native(0).with_pruned_head(KEPT)), greedy, 8, 4, 3, 0.0, 100.0)):
        out, stats = SpeculativeDecoder(target, drafter, greedy).generate(prompt, 24)
        assert out == ref and stats.accepted_tokens > 0


def test_compact_logits_are_the_kept_columns_whoever_runs_the_call(one_thread):
    """`compact` calls return the kept tokens' logits only, alone or beside a widened call in one batched pass."""
    from specdec.models.base import kept_token_ids
    from specdec.models.batch import ModelCall, batched_model, run_calls

    pruned = _tied_native(0).with_pruned_head(KEPT)
    ids = torch.randint(0, TINY_VOCAB, (7,), generator=torch.Generator().manual_seed(2))
    wide, narrow = NativeLM(pruned), NativeLM(pruned)
    for lm in (wide, narrow):
        lm.reset(32)
    reference = wide.forward(ids)  # [7, V]
    kept = torch.unique(KEPT)
    assert torch.equal(kept_token_ids(narrow), kept)
    assert torch.equal(ModelCall(narrow, ids, compact=True).run(), reference[:, kept])
    batched = batched_model(NativeLM(pruned), max_rows=2)
    a, b = batched.new_row(), batched.new_row()
    for row in (a, b):
        row.reset(32)
    out_a, out_b = run_calls([ModelCall(a, ids, compact=True), ModelCall(b, ids)])
    assert torch.equal(out_a, reference[:, kept]) and torch.equal(out_b, reference)
    assert kept_token_ids(NativeLM(_tied_native(0))) is None


def test_a_compact_draft_proposes_what_a_wide_one_does(one_thread):
    """The sps drafter on a pruned head reads compact logits: the same drafts, and each draft's
    distribution over the whole vocabulary, zero outside the kept tokens (what the verifier needs)."""
    from specdec.drafting.base import run_proposal
    from specdec.drafting.draft_model import DraftModel

    prompt = torch.randint(0, TINY_VOCAB, (10,), generator=torch.Generator().manual_seed(3))
    for sampling in (SamplingConfig(), SamplingConfig(temperature=0.8, top_p=0.9)):
        trees = []
        for compact in (True, False):
            drafter = ModelDrafter(NativeLM(_tied_native(0).with_pruned_head(KEPT)), sampling, 4, stop_below=0.01)
            drafter.draft = DraftModel(drafter.model, compact=compact)
            assert (drafter.draft.kept is not None) == compact
            drafter.begin(prompt, 64)
            trees.append(run_proposal(drafter.propose(prompt, 4, torch.Generator().manual_seed(7))))
        narrow, wide = trees
        assert narrow.tokens.numel() == 5 and bool(torch.isin(narrow.tokens[1:], KEPT).all())
        if sampling.greedy:  # the same argmax (kept ids ascend)
            assert torch.equal(narrow.tokens, wide.tokens)
            assert narrow.draft_probs is None and wide.draft_probs is None
            continue
        # Sampled: the same distributions up to rounding (sums over K entries, not V), zero outside
        # the kept tokens, and each draft has mass in the row it was drawn from.
        q = narrow.draft_probs
        assert q.shape == wide.draft_probs.shape == (4, TINY_VOCAB)
        torch.testing.assert_close(q, wide.draft_probs)
        outside = torch.ones(TINY_VOCAB, dtype=torch.bool)
        outside[KEPT] = False
        assert bool((q[:, outside] == 0).all())
        assert bool((q[narrow.cand_draft_row, narrow.tokens[1:]] > 0).all())


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_a_pruned_draft_through_the_batch_engine_equals_it_alone(temperature, one_thread):
    """A long prompt's draft catch-up runs in the engine's fill lane over several steps and still
    hands the drafter the kept logits it asked for; output equals the request decoded alone (and AR's
    when greedy)."""
    from specdec.engine.batch import LANE_FILL
    from specdec.engine.pipeline import Pipeline

    target = NativeLM(_tied_native(0))
    draft = NativeLM(_tied_native(0).with_pruned_head(KEPT))
    pipe = Pipeline.from_models(target, None, draft)
    prompt = torch.randint(0, TINY_VOCAB, (3 * LANE_FILL,), generator=torch.Generator().manual_seed(4)).tolist()
    sampling = SamplingConfig(temperature=temperature)
    seed = 11 if temperature else None
    alone = pipe.generate(prompt, "sps", 20, sampling=sampling, seed=seed, gamma=3).token_ids
    if sampling.greedy:
        assert alone == pipe.generate(prompt, "ar", 20).token_ids
    batched = pipe.generate_batch([prompt, prompt[:9]], "sps", [20, 12], sampling=sampling, seed=[seed, seed],
                                  prefill_chunk=LANE_FILL // 2, gamma=3)
    assert batched[0].token_ids == alone and batched[0].stats.accepted_tokens > 0
