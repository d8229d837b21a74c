"""Max-Gram against hand traces, the bigram table (build, cache, prompt precedence), `--method maxgram`."""

import pytest
import torch

import specdec.drafting.bigram as maxgram
from specdec.core.sampling import SamplingConfig
from specdec.drafting.bigram import BigramTable, build_bigram_table, corpus_files, most_frequent_successor, read_corpus
from specdec.drafting.ngram import NO_SUCCESSOR, bigram_chain, longest_suffix_match, maxgram_continuation
from specdec.engine.decoder import SpeculativeDecoder
from specdec.methods.maxgram import MaxGramDrafter
from tests.conftest import TINY_VOCAB, tiny_lm


def t(*xs):
    return torch.tensor(xs)


# ---- search: longest suffix, earliest occurrence ------------------------------------------
def test_longest_suffix_wins_over_shorter_later_matches():
    # suffix [7, 1, 2] occurs at 0 (followed by 3); [2] alone occurs later at 6 (followed by 6)
    ids = t(7, 1, 2, 3, 8, 0, 2, 6, 7, 1, 2)
    assert longest_suffix_match(ids) == (3, 3)
    assert maxgram_continuation(ids, 2).tolist() == [3, 8]


def test_earliest_occurrence_is_copied():
    # suffix [1, 2] occurs at 0 (then 3, 4) and at 4 (then 9, 9): Max-Gram takes the earliest,
    # where prompt lookup would take the latest
    ids = t(1, 2, 3, 4, 1, 2, 9, 9, 5, 1, 2)
    assert longest_suffix_match(ids) == (2, 2)
    assert maxgram_continuation(ids, 2).tolist() == [3, 4]


def test_occurrence_may_overlap_the_suffix():
    # text 5 5 5: the suffix [5, 5] also occurs at 0..1, followed by the last 5; each of the two
    # searches copies one token, and with no table nothing fills the third
    assert longest_suffix_match(t(5, 5, 5)) == (2, 2)
    assert maxgram_continuation(t(5, 5, 5), 3).tolist() == [5, 5]


def test_search_repeats_over_the_extended_text():
    # [1, 2] at 0 is followed by only 3 before the end; the copy extends the text to 1 2 3 1 2 3 1 2,
    # whose suffix 1 2 3 1 2 now occurs at 0 and is followed by 3 1
    assert maxgram_continuation(t(1, 2, 3, 1, 2), 5).tolist() == [3, 1, 2, 3, 1]


def test_no_match_then_bigram_fill():
    table = [NO_SUCCESSOR] * 10
    table[4], table[7], table[2] = 7, 2, 9
    # 4 is new: nothing to copy; the chain 4 -> 7 -> 2 -> 9 fills, then 9 has no successor
    assert maxgram_continuation(t(1, 3, 4), 5, table).tolist() == [7, 2, 9]
    assert maxgram_continuation(t(1, 3, 4), 2, table).tolist() == [7, 2]
    assert maxgram_continuation(t(1, 3, 4), 5, None).tolist() == []
    assert bigram_chain(torch.tensor(table), 4, 2).tolist() == [7, 2]


def test_copy_twice_then_fill_from_the_last_copied_token():
    table = [NO_SUCCESSOR] * 10
    table[4], table[8] = 8, 8
    # search 1: [4] occurs at 0, followed by 6 4 (then the end); search 2 over 4 6 4 6 4: [4 6 4]
    # occurs at 0, followed by 6 4; two searches made, the bigram table fills from 4: 8
    assert maxgram_continuation(t(4, 6, 4), 5, table).tolist() == [6, 4, 6, 4, 8]
    assert maxgram_continuation(t(4, 6, 4), 5, None).tolist() == [6, 4, 6, 4]


def test_edge_cases():
    assert maxgram_continuation(t(4), 3).numel() == 0
    assert maxgram_continuation(t(1, 1), 0).numel() == 0
    assert longest_suffix_match(t(1, 2, 3)) == (0, -1)


# ---- the table ------------------------------------------------------------------------------
def test_most_frequent_successor_and_ties():
    pairs = torch.tensor([[1, 2], [1, 3], [1, 3], [2, 0], [2, 4], [3, 1]])
    table = most_frequent_successor(pairs, 5)
    # 1 -> 3 (twice); 2 -> 0 (tie with 4, seen first); 3 -> 1; 0 and 4 have no successor
    assert table.tolist() == [NO_SUCCESSOR, 3, 0, 1, NO_SUCCESSOR]
    assert table.dtype == torch.int32
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        most_frequent_successor(torch.tensor([[1, 5]]), 5)


def test_prompt_bigrams_take_precedence_and_resize():
    corpus = BigramTable(torch.tensor([1, 2, 0, NO_SUCCESSOR], dtype=torch.int32))
    local = corpus.with_prompt(t(0, 3, 0, 3, 1))
    assert local.next_token.tolist() == [3, 2, 0, 0]  # 0 -> 3 and 3 -> 0 from the prompt; 3 -> 0 seen first
    assert corpus.next_token.tolist() == [1, 2, 0, NO_SUCCESSOR]  # the cached table is untouched
    assert corpus.resized(6).next_token.tolist() == [1, 2, 0, NO_SUCCESSOR, NO_SUCCESSOR, NO_SUCCESSOR]
    with pytest.raises(ValueError, match="another tokenizer"):
        corpus.resized(2)
    with pytest.raises(ValueError, match="outside the bigram table"):
        corpus.with_prompt(t(0, 9))
    with pytest.raises(ValueError, match="must lie in"):
        BigramTable(torch.tensor([0, 7], dtype=torch.int32))


def _char_encode(text: str) -> list[int]:
    return [ord(c) - ord("a") for c in text if "a" <= c <= "z"]


def test_build_from_a_synthetic_corpus(tmp_path):
    (tmp_path / "a.py").write_text("abab")  # a->b twice, b->a once
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("bc")  # b->c once: b->a was seen first
    (tmp_path / "site-packages").mkdir()
    (tmp_path / "site-packages" / "c.py").write_text("zz")  # skipped
    (tmp_path / "d.bin").write_text("yy")  # not a text file
    files = corpus_files([tmp_path])
    assert [f.name for f in files] == ["a.py", "b.txt"]
    texts, n_bytes = read_corpus(files, 100)
    table, n_tokens = build_bigram_table(_char_encode, texts, 26)
    assert (n_bytes, n_tokens) == (6, 6)
    assert table.next_token[:3].tolist() == [1, 0, NO_SUCCESSOR]
    assert int((table.next_token != NO_SUCCESSOR).sum()) == 2  # no bigram across files (a.py's last b, b.txt's b)
    # the byte bound cuts the corpus
    assert read_corpus(files, 3) == (["aba"], 3)
    with pytest.raises(ValueError, match="does not exist"):
        corpus_files([tmp_path / "nope"])
    with pytest.raises(ValueError, match="max bytes"):
        read_corpus(files, 0)


def test_save_load_and_refuse_foreign_files(tmp_path):
    table = BigramTable(torch.tensor([2, NO_SUCCESSOR, 0], dtype=torch.int32), {"corpus": "x"})
    path = tmp_path / "t.safetensors"
    table.save(path)
    back = BigramTable.load(path)
    assert back.next_token.tolist() == [2, NO_SUCCESSOR, 0] and back.meta["corpus"] == "x"
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a specdec bigram table"):
        BigramTable.load(tmp_path / "other.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="rebuild it"):
        BigramTable.load(tmp_path / "bad.safetensors")


@pytest.fixture
def word_tokenizer():
    """A word-level tokenizer over w0 … w95 (+ [UNK] = 96): TINY_VOCAB ids, like the tiny models."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(TINY_VOCAB - 1)}
    vocab["[UNK]"] = TINY_VOCAB - 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="w0")


def test_table_is_built_once_per_tokenizer_and_cached(tmp_path, monkeypatch, word_tokenizer):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "m.py").write_text("w1 w2 w1 w2 w1 w3")
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(maxgram, "default_corpus_root", lambda: corpus)
    monkeypatch.setattr(maxgram, "_LOADED", {})
    table = maxgram.table_for_tokenizer(word_tokenizer, TINY_VOCAB + 3)
    assert table.vocab_size == TINY_VOCAB + 3
    assert table.next_token[1].item() == 2 and table.next_token[2].item() == 1
    path = maxgram.table_path(word_tokenizer)
    assert path.parent == tmp_path / "cache" / "bigram" and path.exists()
    # a second pipeline in the same process reuses it; a new process loads the file, never rebuilds
    (corpus / "m.py").write_text("w1 w5")
    assert maxgram.table_for_tokenizer(word_tokenizer, TINY_VOCAB + 3) is table
    monkeypatch.setattr(maxgram, "_LOADED", {})
    assert maxgram.table_for_tokenizer(word_tokenizer, TINY_VOCAB).next_token[1].item() == 2


def test_cli_bigram_build(tmp_path, monkeypatch, word_tokenizer, capsys):
    from specdec.cli import main

    word_tokenizer.save_pretrained(tmp_path / "tok")
    (tmp_path / "c.txt").write_text("w4 w5 w4 w5 w6")
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path / "cache"))
    assert main(["bigram", "build", "--tokenizer", str(tmp_path / "tok"), "--corpus", str(tmp_path / "c.txt")]) == 0
    out = capsys.readouterr()
    path = out.out.strip()
    assert path.startswith(str(tmp_path / "cache" / "bigram")) and "have a successor" in out.err
    table = BigramTable.load(path)
    assert table.next_token[4].item() == 5 and table.next_token[5].item() == 4
    assert main(["bigram", "build", "--tokenizer", str(tmp_path / "tok"), "--corpus", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


# ---- the method -------------------------------------------------------------------------------
def test_maxgram_method_gives_ar_output():
    target = tiny_lm("llama", seed=0)
    g = torch.Generator().manual_seed(3)
    base = torch.randint(0, TINY_VOCAB, (10,), generator=g).tolist()
    prompt = base + base
    ref, _ = SpeculativeDecoder(target, None, SamplingConfig()).generate(prompt, 40)
    table = BigramTable(torch.randint(0, TINY_VOCAB, (TINY_VOCAB,), generator=g, dtype=torch.int32))
    # the target's own greedy continuation in the table: Max-Gram then guesses right sometimes
    for a, b in zip(prompt[-1:] + ref[:-1], ref):
        table.next_token[a] = b
    dec = SpeculativeDecoder(target, MaxGramDrafter(table), SamplingConfig(), gamma=4)
    out, stats = dec.generate(prompt, 40)
    assert out == ref
    assert stats.accepted_tokens > 0 and stats.target_calls < 40
    assert stats.swi == pytest.approx(stats.new_tokens / stats.target_calls)  # Max-Gram is free
    assert stats.draft_forward_calls == []
