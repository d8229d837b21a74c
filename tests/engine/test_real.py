"""The real SmolLM2-135M-Instruct (fetched from its carrier wheel on first use)."""

import copy
import json

import pytest

from specdec.cli import main
from specdec.core.sampling import SamplingConfig
from specdec.engine.decoder import SpeculativeDecoder
from specdec.engine.pipeline import eos_ids
from specdec.methods.pld import PromptLookupDrafter
from specdec.methods.sps import ModelDrafter
from specdec.models.hf import HFLanguageModel

pytestmark = pytest.mark.real
NAME = "smollm2-135m-instruct"
GREEDY = SamplingConfig()


def _shallow_copy(model, layers: int):
    """The first `layers` blocks of the model: a genuinely weaker drafter with the same vocabulary."""
    small = copy.deepcopy(model)
    small.model.layers = small.model.layers[:layers]
    small.config.num_hidden_layers = layers
    return small


@pytest.mark.slow
def test_greedy_equivalence_on_smollm2(smol):
    model, tok = smol
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "List three prime numbers and explain why each is prime."}],
        add_generation_prompt=True,
    )
    prompt = list(prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt)
    eos = eos_ids(model, tok)
    target = HFLanguageModel(model)
    ref, ref_stats = SpeculativeDecoder(target, None, GREEDY, eos_token_ids=eos).generate(prompt, 48)
    assert ref_stats.new_tokens >= 10
    drafters = {
        "same": ModelDrafter(HFLanguageModel(model), GREEDY),
        "shallow": ModelDrafter(HFLanguageModel(_shallow_copy(model, 8)), GREEDY),
        "pld": PromptLookupDrafter(),
    }
    for name, drafter in drafters.items():
        dec = SpeculativeDecoder(target, drafter, GREEDY, gamma=4, eos_token_ids=eos)
        out, stats = dec.generate(prompt, 48)
        assert out == ref, f"{name} drafter changed the greedy output"
        assert stats.target_calls <= stats.new_tokens
        if name == "same":
            assert stats.accepted_tokens == stats.draft_tokens


@pytest.mark.slow
def test_cli_generate_json_on_smollm2(capsys):
    common = ["generate", "--target", NAME, "--draft", NAME, "--max-new-tokens", "12", "--json", "--prompt",
              "The capital of France is"]
    argv = [*common, "--method", "sps", "--gamma", "3"]
    assert main([*common, "--method", "ar"]) == 0
    ar = json.loads(capsys.readouterr().out)
    # The draft's precision is measured (auto): whatever it is, the output is the target's.
    assert main(argv) == 0
    auto = json.loads(capsys.readouterr().out)
    assert auto["token_ids"] == ar["token_ids"]
    assert 0 < auto["stats"]["accepted_tokens"] <= auto["stats"]["draft_tokens"]
    # In the target's own precision the named draft is the target itself: every draft is accepted.
    assert main([*argv, "--draft-dtype", "float32"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"text", "token_ids", "stats"}
    for key in ["new_tokens", "target_calls", "draft_tokens", "accepted_tokens", "mean_accepted_per_call",
                "accepted_per_position", "tokens_per_s", "wall_s", "draft_s", "target_s"]:
        assert key in result["stats"]
    assert result["stats"]["new_tokens"] == len(result["token_ids"]) > 0
    assert result["stats"]["accepted_tokens"] == result["stats"]["draft_tokens"]  # same model drafts


@pytest.mark.slow
def test_specinfer_greedy_equivalence_on_smollm2(smol):
    from specdec.methods.specinfer import TreeDrafter

    model, tok = smol
    prompt = tok("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n")["input_ids"]
    eos = eos_ids(model, tok)
    target = HFLanguageModel(model)
    ref, _ = SpeculativeDecoder(target, None, GREEDY, eos_token_ids=eos).generate(prompt, 40)
    shallow = HFLanguageModel(_shallow_copy(model, 8))  # a poor drafter: few of its tokens are accepted
    full = HFLanguageModel(model)  # the target itself as drafter: its top-1 child is always accepted
    for expansion, drafts in [([1, 1, 3, 1, 1], [full]), ([2, 2, 1], [shallow]), ([1, 2, 1], [shallow, full])]:
        dec = SpeculativeDecoder(target, TreeDrafter(drafts, GREEDY, expansion=expansion), GREEDY, eos_token_ids=eos)
        out, stats = dec.generate(prompt, 40)
        assert out == ref, f"specinfer {expansion} with {len(drafts)} drafter(s) changed the greedy output"
        if any(d is full for d in drafts):
            assert stats.mean_accepted_per_call >= len(expansion) - 0.5
