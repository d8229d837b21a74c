"""What a method's options declare for a server to check before building anything: the most
tokens one step drafts (equal to what the built drafter holds), and which options may name a file."""

from __future__ import annotations

import time

import pytest

from specdec.core.options import MethodOptions
from specdec.core.sampling import SamplingConfig
from specdec.methods.base import MethodContext
from specdec.methods.csd import fill_growth
from specdec.methods.registry import all_methods, get_method
from tests.conftest import tiny_lm

PATHS = ("/etc/passwd", "/tmp/profile.json", "../x.json", "C:\\profiles\\p.json")


def test_every_method_declares_its_drafted_tokens():
    for name, method in all_methods().items():
        assert method.options.draft_tokens_per_step is not MethodOptions.draft_tokens_per_step, name


@pytest.fixture(scope="module")
def models():
    return tiny_lm("llama", 0), (tiny_lm("llama", 1), tiny_lm("llama", 2))


@pytest.mark.parametrize("method,values,num_drafts", [
    ("sps", {}, 1), ("sps", {"gamma": 9}, 1),
    ("pld", {}, 0), ("pld", {"gamma": 7, "max_ngram": 5}, 0),
    ("maxgram", {"gamma": 6, "maxgram_fill": "none"}, 0),
    ("specinfer", {}, 1), ("specinfer", {"expansion": "2,3,2"}, 1), ("specinfer", {"expansion": "2,2"}, 2),
    ("specexec", {}, 1), ("specexec", {"budget": 50, "max_beams": 3}, 1),
    ("sequoia", {}, 1), ("sequoia", {"budget": 23, "max_depth": 4}, 1),
])
def test_drafted_tokens_equal_the_built_drafters_size(models, method, values, num_drafts):
    target, drafts = models
    m = get_method(method)
    opts = m.make_options(values)
    drafter = m.build(MethodContext(target, drafts[:num_drafts], SamplingConfig()), opts)
    assert opts.draft_tokens_per_step(num_drafts) == drafter.max_nodes


@pytest.mark.parametrize("values,num_drafts", [
    ({"maxgram_fill": "none"}, 1), ({"maxgram_fill": "none"}, 2), ({"no_maxgram": True}, 1),
    ({"k_matrix": "5,3;0,9", "maxgram_fill": "none"}, 1),
])
def test_a_cascade_declares_everything_its_levels_draft(models, values, num_drafts):
    target, drafts = models
    m = get_method("csd")
    opts = m.make_options(values)
    drafter = m.build(MethodContext(target, drafts[:num_drafts], SamplingConfig()), opts)
    drafted = opts.draft_tokens_per_step(num_drafts)
    # Not only the chain the target verifies: the working text the lower levels grow for reviews.
    assert drafted == fill_growth(drafter.k_matrix) >= drafter.max_nodes


def test_a_k_matrix_of_the_wrong_size_is_refused_before_its_size_is_computed():
    opts = get_method("csd").make_options({"k_matrix": ";".join(",".join(["9"] * 40) for _ in range(40))})
    with pytest.raises(ValueError, match="k-matrix must be 2x2"):
        opts.draft_tokens_per_step(1)


def test_plain_decoding_drafts_nothing_and_a_tuned_tree_is_known_only_from_its_profile():
    assert get_method("ar").make_options({}).draft_tokens_per_step(1) == 0
    assert get_method("auto").make_options({}).draft_tokens_per_step(1) is None
    assert get_method("sequoia").make_options({"tree": "auto"}).draft_tokens_per_step(1) is None


def test_options_that_take_a_path_say_so():
    """Any option whose parser accepts a path is declared `file_path`, with symbols the parser takes."""
    marked = set()
    for name, method in all_methods().items():
        for spec in method.options.specs():
            takes_paths = False
            for path in PATHS:
                try:
                    spec.parse(path) if spec.parse is not None else path
                    takes_paths = spec.parse is not None
                except (TypeError, ValueError):
                    pass
            if takes_paths:
                assert spec.file_path, f"{name}.{spec.name} takes a path but is not declared file_path"
            if spec.file_path:
                marked.add((name, spec.name))
                assert spec.symbols and all(spec.parse(s) == s for s in spec.symbols)
                assert not any(spec.may_name_a_file(s) for s in spec.symbols)
                assert all(spec.may_name_a_file(p) for p in PATHS)
    assert marked == {("sequoia", "tree"), ("auto", "tree")}


def test_a_sequoia_depth_beyond_its_budget_costs_nothing(models):
    target, drafts = models
    m = get_method("sequoia")
    t0 = time.monotonic()
    drafter = m.build(MethodContext(target, drafts[:1], SamplingConfig()), m.make_options({"budget": 8, "max_depth": 10**6}))
    assert time.monotonic() - t0 < 10.0  # unclamped: a DP over a million levels
    assert drafter.max_nodes == 8 and drafter.max_depth <= 8
