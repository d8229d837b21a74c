"""Max-Gram's bigram table: the most frequent next token of every token (docs/algorithms.md §8).

Built once per tokenizer from a corpus every machine has offline — the Python standard library's
source (its docs included, `pydoc_data`), a bounded amount of it — and cached as safetensors
under `<cache>/bigram/<tokenizer fingerprint>.safetensors` (`specdec bigram build`). Per
sequence, the prompt's own bigrams take precedence over the corpus's (`BigramTable.with_prompt`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import sysconfig
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from specdec.core.store import cache_dir
from specdec.drafting.ngram import NO_SUCCESSOR

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 4_000_000
"""Default corpus size for the bigram table: enough for the common code bigrams, seconds to tokenize."""
TEXT_SUFFIXES = (".py", ".pyi", ".txt", ".rst", ".md")
"""Files taken from a corpus directory."""
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
_FORMAT = "specdec-bigram-1"


def most_frequent_successor(
    pairs: Tensor,  # [P, 2] int64 (token, next token), in corpus order
    vocab_size: int,
) -> Tensor:  # [V] int32, NO_SUCCESSOR where a token has no successor
    """For every token, the next token it is most often followed by; ties go to the pair seen first."""
    table = torch.full((vocab_size,), NO_SUCCESSOR, dtype=torch.int32)
    if pairs.numel() == 0:
        return table
    if int(pairs.max()) >= vocab_size or int(pairs.min()) < 0:
        raise ValueError(f"token ids must lie in [0, {vocab_size})")
    keys = pairs[:, 0] * vocab_size + pairs[:, 1]
    uniq, inverse, counts = torch.unique(keys, return_inverse=True, return_counts=True)
    first_seen = torch.full_like(uniq, keys.shape[0]).scatter_reduce(
        0, inverse, torch.arange(keys.shape[0]), reduce="amin"
    )
    # Order the distinct pairs by (token, most frequent first, seen first) with stable sorts from
    # the least significant key up; the first pair of each token is its successor.
    order = torch.argsort(first_seen, stable=True)
    order = order[torch.argsort(-counts[order], stable=True)]
    order = order[torch.argsort(uniq[order] // vocab_size, stable=True)]
    token = uniq[order] // vocab_size
    is_first = torch.ones_like(token, dtype=torch.bool)
    is_first[1:] = token[1:] != token[:-1]
    table[token[is_first]] = (uniq[order][is_first] % vocab_size).to(torch.int32)
    return table


class BigramTable:
    """Most frequent next token of every token (int32 [V]), with where it came from."""

    def __init__(self, next_token: Tensor, meta: dict[str, str] | None = None) -> None:  # next_token: [V]
        if next_token.dim() != 1 or next_token.dtype not in (torch.int32, torch.int64):
            raise ValueError("a bigram table is a 1-D integer tensor (next token per token)")
        if next_token.numel() and (int(next_token.max()) >= next_token.numel() or int(next_token.min()) < NO_SUCCESSOR):
            raise ValueError(f"bigram table entries must lie in [{NO_SUCCESSOR}, {next_token.numel()})")
        self.next_token = next_token.to(torch.int32).cpu()
        self.meta = dict(meta or {})

    @property
    def vocab_size(self) -> int:
        return int(self.next_token.numel())

    def resized(self, vocab_size: int) -> "BigramTable":
        """The table for a model with `vocab_size` logits (padded with NO_SUCCESSOR)."""
        if vocab_size == self.vocab_size:
            return self
        if vocab_size < self.vocab_size:
            if int(self.next_token.max()) >= vocab_size or bool((self.next_token[vocab_size:] != NO_SUCCESSOR).any()):
                raise ValueError(
                    f"the bigram table covers {self.vocab_size} tokens but the model has only {vocab_size} logits; "
                    "it was built for another tokenizer"
                )
            return BigramTable(self.next_token[:vocab_size].clone(), self.meta)
        pad = torch.full((vocab_size - self.vocab_size,), NO_SUCCESSOR, dtype=torch.int32)
        return BigramTable(torch.cat([self.next_token, pad]), self.meta)

    def with_prompt(self, prompt_ids: Tensor) -> "BigramTable":  # prompt_ids: [L]
        """This table with the prompt's own most frequent bigrams taking precedence."""
        ids = prompt_ids.cpu().long()
        if ids.numel() < 2:
            return self
        if int(ids.max()) >= self.vocab_size:
            raise ValueError(f"prompt token id {int(ids.max())} is outside the bigram table ({self.vocab_size} tokens)")
        local = most_frequent_successor(torch.stack([ids[:-1], ids[1:]], dim=1), self.vocab_size)
        return BigramTable(torch.where(local != NO_SUCCESSOR, local, self.next_token), self.meta)

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"next_token": self.next_token.contiguous()}, str(tmp), metadata={"format": _FORMAT, **self.meta})
        tmp.replace(path)  # readers never see a half-written table

    @classmethod
    def load(cls, path: str | Path) -> "BigramTable":
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != _FORMAT or "next_token" not in f.keys():
                    raise ValueError(f"{path} is not a specdec bigram table (format {meta.get('format')!r})")
                return cls(f.get_tensor("next_token"), meta)
        except (OSError, RuntimeError, SafetensorError) as exc:  # unreadable or truncated file
            raise ValueError(f"could not read the bigram table {path}: {exc}; rebuild it with `specdec bigram build`") from exc


def build_bigram_table(
    encode: Callable[[str], Sequence[int]],
    texts: Iterable[str],
    vocab_size: int,
) -> tuple[BigramTable, int]:
    """The table from a corpus (bigrams counted within each text, not across texts) and its token count."""
    chunks = []
    n_tokens = 0
    for text in texts:
        ids = torch.as_tensor(list(encode(text)), dtype=torch.long)
        n_tokens += ids.numel()
        if ids.numel() >= 2:
            chunks.append(torch.stack([ids[:-1], ids[1:]], dim=1))
    pairs = torch.cat(chunks) if chunks else torch.empty(0, 2, dtype=torch.long)
    return BigramTable(most_frequent_successor(pairs, vocab_size)), n_tokens


def default_corpus_root() -> Path:
    """The Python standard library's source directory (present on every machine with Python)."""
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(paths: Sequence[str | Path] | None = None) -> list[Path]:
    """Files of a corpus in a fixed order: given files as they are, directories walked in sorted
    order for text and source files (skipping site-packages, caches and test suites)."""
    roots = [Path(p).expanduser() for p in paths] if paths else [default_corpus_root()]
    files: list[Path] = []
    for root in roots:
        if root.is_file():
            files.append(root)
        elif root.is_dir():
            files.extend(
                f for f in sorted(root.rglob("*"))
                if f.suffix in TEXT_SUFFIXES and f.is_file() and not _SKIP_DIRS & set(f.relative_to(root).parts[:-1])
            )
        else:
            raise ValueError(f"corpus path {root} does not exist")
    if not files:
        raise ValueError(f"no corpus files ({', '.join(TEXT_SUFFIXES)}) under {', '.join(map(str, roots))}")
    return files


def read_corpus(files: Sequence[Path], max_bytes: int) -> tuple[list[str], int]:
    """The files' texts (UTF-8, undecodable bytes replaced), at most `max_bytes` in all."""
    if max_bytes <= 0:
        raise ValueError(f"max bytes must be positive, got {max_bytes}")
    texts: list[str] = []
    total = 0
    for f in files:
        if total >= max_bytes:
            break
        data = f.read_bytes()[: max_bytes - total]
        total += len(data)
        texts.append(data.decode("utf-8", errors="replace"))
    return texts, total


# ---- tokenizer fingerprint and cache --------------------------------------------------------
_FINGERPRINTS: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()
_LOADED: dict[tuple[str, int], BigramTable] = {}


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash of everything that decides how the tokenizer splits text into ids."""
    try:
        return _FINGERPRINTS[tokenizer]
    except (KeyError, TypeError):
        pass
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # fast tokenizers: the full serialized model (vocab, merges, normalizer…)
        blob = backend.to_str()
    else:
        blob = json.dumps(sorted(tokenizer.get_vocab().items()))
    digest = hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]
    try:
        _FINGERPRINTS[tokenizer] = digest
    except TypeError:
        pass
    return digest


def table_path(tokenizer: Any) -> Path:
    return cache_dir() / "bigram" / f"{tokenizer_fingerprint(tokenizer)}.safetensors"


def _encoder(tokenizer: Any) -> Callable[[str], Sequence[int]]:
    def encode(text: str) -> Sequence[int]:
        # verbose=False: corpus files are longer than the model's context, which is fine here.
        return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    return encode


def tokenizer_vocab_size(tokenizer: Any) -> int:
    """Ids the tokenizer can produce: one past the largest id of its vocabulary (added tokens included)."""
    vocab = tokenizer.get_vocab()
    return max(len(tokenizer), (max(vocab.values()) + 1) if vocab else 0)


def build_for_tokenizer(
    tokenizer: Any,
    corpus: Sequence[str | Path] | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    out: str | Path | None = None,
) -> tuple[BigramTable, Path]:
    """Build the tokenizer's table from a corpus (default: the standard library) and save it."""
    t0 = time.perf_counter()
    files = corpus_files(corpus)
    texts, n_bytes = read_corpus(files, max_bytes)
    table, n_tokens = build_bigram_table(_encoder(tokenizer), texts, tokenizer_vocab_size(tokenizer))
    table.meta.update({
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "corpus": ", ".join(str(p) for p in corpus) if corpus else f"python stdlib {default_corpus_root()}",
        "files": str(len(texts)),
        "bytes": str(n_bytes),
        "tokens": str(n_tokens),
        "covered_tokens": str(int((table.next_token != NO_SUCCESSOR).sum())),
        "build_s": f"{time.perf_counter() - t0:.1f}",
    })
    path = Path(out) if out is not None else table_path(tokenizer)
    table.save(path)
    for key in [k for k in _LOADED if k[0] == tokenizer_fingerprint(tokenizer)]:
        del _LOADED[key]  # this process now reads the new table
    return table, path


def table_for_tokenizer(tokenizer: Any, vocab_size: int) -> BigramTable:
    """The cached table for this tokenizer, sized for a model with `vocab_size` logits.

    Loaded once per process; built from the default corpus (and saved) the first time a
    tokenizer is seen, which takes a while for a large vocabulary (see README).
    """
    key = (tokenizer_fingerprint(tokenizer), vocab_size)
    if key in _LOADED:
        return _LOADED[key]
    path = table_path(tokenizer)
    if path.exists():
        table = BigramTable.load(path)
    else:
        log.warning("building the Max-Gram bigram table for this tokenizer (one time; `specdec bigram build`) …")
        try:
            table, path = build_for_tokenizer(tokenizer)
        except OSError as exc:  # a read-only cache costs a rebuild next time, nothing else
            log.warning("could not save the bigram table: %s", exc)
            texts, _ = read_corpus(corpus_files(None), DEFAULT_MAX_BYTES)
            table, _ = build_bigram_table(_encoder(tokenizer), texts, tokenizer_vocab_size(tokenizer))
    table = table.resized(vocab_size)
    _LOADED[key] = table
    return table
