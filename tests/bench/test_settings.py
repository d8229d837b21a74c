"""`specdec bench` settings: method names and order, temperatures, options checked against the
methods' Options, prompt seeds."""

import pytest

from specdec.bench.peers import HF_PEERS
from specdec.bench.prompts import prompt_seed
from specdec.bench.settings import BenchSettings, parse_methods, parse_opts, parse_variants


def test_methods_are_validated_and_ordered():
    assert parse_methods("pld,sps") == ["ar", "pld", "sps"]
    assert parse_methods("hf-pld,sps,ar") == ["ar", "sps", "hf-ar", "hf-pld"]
    assert parse_methods("hf") == ["ar"] + list(HF_PEERS)
    with pytest.raises(ValueError, match="unknown method 'nope'; choose from: ar, sps, pld, .*hf-ar, hf-assisted"):
        parse_methods("ar,nope")
    with pytest.raises(ValueError, match="temperature"):
        BenchSettings(methods=["ar"], temperatures=[-1.0])
    with pytest.raises(ValueError, match="cannot be passed"):
        BenchSettings(methods=["ar"], opts={"seed": 3})
    assert parse_opts(["budget=16", "mode=fast", "w-x=[1, 2]"]) == {"budget": 16, "mode": "fast", "w_x": [1, 2]}
    assert prompt_seed("a", 0) == prompt_seed("a", 0) != prompt_seed("a", 1)


def test_options_are_checked_against_the_methods_options():
    # A global option goes to the selected methods that have it, and only to them.
    s = BenchSettings(methods=["sps", "specexec", "pld"], opts={"budget": 16, "max_ngram": 2})
    assert s.method_options("sps") == {"gamma": 4} and s.method_options("specexec") == {"budget": 16}
    assert s.method_options("pld") == {"gamma": 4, "max_ngram": 2}
    # --gamma is an option like the others: the methods that have it get it, the others never do.
    s = BenchSettings(methods=["sps", "specexec", "pld"], gamma=5, opts={"budget": 16, "max_ngram": 2})
    assert s.method_options("sps") == {"gamma": 5} and s.method_options("pld") == {"gamma": 5, "max_ngram": 2}
    assert "gamma" not in s.method_options("specexec")
    with pytest.raises(ValueError, match="use --gamma"):
        BenchSettings(methods=["sps"], opts={"gamma": 3})
    # ... and is an error when none of them has it (max_ngram, hf-pld's setting too, excepted).
    with pytest.raises(ValueError, match="'budget' is not an option of any of the methods ar, sps"):
        BenchSettings(methods=["sps"], opts={"budget": 16})
    with pytest.raises(ValueError, match="--offload"):
        BenchSettings(methods=["specexec"], opts={"offload": True})
    BenchSettings(methods=["sps"], opts={"max_ngram": 3})
    # Values are parsed by the method, before anything runs.
    with pytest.raises(ValueError, match="options of 'specexec': budget: must be a positive integer"):
        BenchSettings(methods=["specexec"], opts={"budget": 0})
    # A variant's key must be an option of its method.
    with pytest.raises(ValueError, match="method 'specinfer' has no option 'budget'"):
        parse_variants(["si=specinfer budget=3"])
    variants = parse_variants(["si=specinfer expansion=2,2,1"])
    s = BenchSettings(methods=["si", "specexec"], variants=variants, opts={"budget": 8})
    assert s.method_options("si") == {"expansion": "2,2,1"}
    # A variant may set its own gamma (it wins over --gamma).
    assert BenchSettings(methods=["g6"], variants=parse_variants(["g6=sps gamma=6"])).method_options("g6") == {
        "gamma": 6}
    with pytest.raises(ValueError, match="'budget' is not an option of any of the methods ar, si"):
        BenchSettings(methods=["si"], variants=variants, opts={"budget": 8})
