"""What a benchmark run is: its methods (ours, variants, hf-* peers), temperatures, lengths and
method options, checked against each method's `Options` before anything is loaded, and the
fingerprint that rows in one output directory must share."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from specdec.bench.peers import HF_BASELINE, HF_NEEDS_DRAFT, HF_PEERS, is_hf
from specdec.core.options import json_or_text
from specdec.core.sampling import SamplingConfig
from specdec.methods.registry import all_methods, get_method

# Keyword arguments of Pipeline.generate that per-method options must not shadow.
RESERVED_OPTS = frozenset({"prompt", "method", "max_new_tokens", "sampling", "seed", "chat"})
# Options the bench sets with its own flags (for the hf-* peers too): not through --opt. A variant
# may still set its own (`g6=sps gamma=6`).
OWN_FLAGS = frozenset({"gamma"})
# Options the bench reads itself besides passing them to the methods that have them: max_ngram is
# also hf-pld's max_matching_ngram_size, and `--max-ngram` always records it, so it is no error
# when none of the selected methods has it.
BENCH_OPTS = frozenset({"max_ngram"})

Variants = dict[str, tuple[str, dict[str, Any]]]


def fmt_temp(t: float) -> str:
    """A temperature as file names, tables and the log show it (0, 0.7)."""
    return f"{t:g}"


def method_names() -> list[str]:
    """Every name `--methods` accepts: the registered methods (looked up now) and the HF peers."""
    return list(all_methods()) + list(HF_PEERS)


def _plural(items: Sequence[Any]) -> str:
    return "s" if len(items) > 1 else ""


def parse_value(text: str) -> Any:
    """A command-line option value: JSON when it parses (numbers, true/false, lists), else the string."""
    return json_or_text(text)


def parse_opts(items: Iterable[str]) -> dict[str, Any]:
    """`KEY=VALUE` strings (repeatable `--opt`) as a dict; dashes in keys become underscores."""
    opts: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise ValueError(f"--opt {item!r}: expected KEY=VALUE with a Python identifier as KEY")
        opts[key] = parse_value(value)
    return opts


def parse_variants(items: Iterable[str]) -> Variants:
    """`--variant "LABEL=METHOD KEY=VALUE ..."` strings as {label: (method, options)}.

    A variant is one of our methods with its own options (e.g. several SpecInfer tree shapes in one
    run, each measured against the same AR rows); its label is used like a method name in
    `--methods`, in results.jsonl and in the summary. Every key must be an option of its method.
    """
    methods = all_methods()
    variants: Variants = {}
    for item in items:
        head, _, rest = item.strip().partition(" ")
        label, sep, method = head.partition("=")
        label, method = label.strip(), method.strip()
        if not sep or not label or not method:
            raise ValueError(f"--variant {item!r}: expected 'LABEL=METHOD KEY=VALUE ...' (e.g. 'si-221=specinfer expansion=2,2,1')")
        if method not in methods or method == "ar":
            raise ValueError(f"--variant {item!r}: {method!r} is not a speculative method; choose from: "
                             f"{', '.join(m for m in methods if m != 'ar')}")
        if label in methods or label in HF_PEERS or label == "hf" or label in variants:
            raise ValueError(f"--variant {item!r}: label {label!r} is already a method or variant name")
        opts = parse_opts(rest.split())
        clash = sorted(RESERVED_OPTS & set(opts))
        if clash:
            raise ValueError(f"--variant {item!r}: option{_plural(clash)} {', '.join(clash)} cannot be set here")
        known = methods[method].options.names()
        unknown = sorted(set(opts) - known)
        if unknown:
            offered = ", ".join(sorted(known)) or "none"
            raise ValueError(f"--variant {item!r}: method {method!r} has no option{_plural(unknown)} "
                             f"{', '.join(map(repr, unknown))} (its options: {offered})")
        variants[label] = (method, opts)
    return variants


def parse_methods(spec: str | Sequence[str], variants: Variants | None = None) -> list[str]:
    """Validated method names in run order: `ar` first (always run, it is the baseline), then the
    registered methods and variant labels as given, then `hf-ar` (added when any peer is asked
    for) and the other peers. `hf` stands for all the peers."""
    variants = variants or {}
    methods = all_methods()
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec)]
    names = [n for n in names if n]
    expanded: list[str] = []
    for n in names:
        expanded.extend(HF_PEERS if n == "hf" else [n])
    unknown = [n for n in expanded if n not in methods and n not in HF_PEERS and n not in variants]
    if unknown:
        raise ValueError(
            f"unknown method{_plural(unknown)} {', '.join(map(repr, unknown))}; "
            f"choose from: {', '.join(method_names() + list(variants))} (or 'hf' for all the hf-* peers)"
        )
    ours = ["ar"] + [n for n in dict.fromkeys(expanded) if (n in methods or n in variants) and n != "ar"]
    peers = [n for n in dict.fromkeys(expanded) if n in HF_PEERS]
    if peers and HF_BASELINE not in peers:
        peers.insert(0, HF_BASELINE)
    elif peers:
        peers.remove(HF_BASELINE)
        peers.insert(0, HF_BASELINE)
    return ours + peers


def base_method(method: str, variants: Variants | None = None) -> str:
    """The registered method a name runs: itself, or the method a variant label stands for."""
    return (variants or {}).get(method, (method, {}))[0]


def needs_draft(methods: Iterable[str], variants: Variants | None = None) -> bool:
    """Whether any of these methods, variants or peers needs the draft model loaded."""
    registered = all_methods()
    bases = [base_method(m, variants) for m in methods]
    return any((m in registered and registered[m].loads_draft_model) or m in HF_NEEDS_DRAFT for m in bases)


def parse_temperatures(spec: str | Sequence[float]) -> list[float]:
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    temps: list[float] = []
    for item in items:
        if isinstance(item, str):
            item = item.strip()
            if not item:
                continue
        try:
            t = float(item)
        except ValueError:
            raise ValueError(f"temperature {item!r} is not a number (give e.g. --temperatures 0,0.7)") from None
        if math.isnan(t) or math.isinf(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {item!r}")
        if t not in temps:
            temps.append(t)
    if not temps:
        raise ValueError("give at least one temperature (e.g. --temperatures 0,0.7)")
    return temps


@dataclass
class BenchSettings:
    methods: list[str]
    temperatures: list[float] = field(default_factory=lambda: [0.0])
    max_new_tokens: int = 128
    repeats: int = 1
    gamma: int = 4
    """The `gamma` option (chain draft length) of the methods that have it (sps, pld, maxgram), and
    the hf-assisted-tuned and hf-pld peers' draft length."""
    top_k: int = 0
    top_p: float = 1.0
    opts: dict[str, Any] = field(default_factory=dict)
    """Global method options (max_ngram, budget, expansion, …): each selected method gets the ones
    its `Options` has; a key none of them has is an error (max_ngram excepted, see BENCH_OPTS)."""
    variants: Variants = field(default_factory=dict)
    """Labelled runs of one of our methods with their own options (see `parse_variants`)."""
    run_info: dict[str, Any] = field(default_factory=dict)
    """What changes timings but not outputs (device, fast linear path, draft dtype, threads):
    rows in one directory must share it to be compared."""
    warmup_tokens: int = 4

    def __post_init__(self) -> None:
        self.methods = parse_methods(self.methods, self.variants)
        self.temperatures = parse_temperatures(self.temperatures)
        for name in ("max_new_tokens", "repeats", "gamma"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
        for t in self.temperatures:  # the same checks and messages as generation itself
            SamplingConfig(temperature=t, top_k=self.top_k, top_p=self.top_p)
        clash = sorted((RESERVED_OPTS | OWN_FLAGS) & set(self.opts))
        if clash:
            raise ValueError(f"option{_plural(clash)} {', '.join(clash)} cannot be passed as --opt"
                             + (" (use --gamma)" if "gamma" in clash else ""))
        for label, (_, own) in self.variants.items():
            clash = sorted(RESERVED_OPTS & set(own))
            if clash:
                raise ValueError(f"variant {label!r}: option{_plural(clash)} {', '.join(clash)} cannot be set here")
        self._check_options()

    def _check_options(self) -> None:
        # Every option is checked now, against the methods' Options, so a typo or a bad value
        # fails before any model is loaded rather than an hour into the run.
        ours = [m for m in self.methods if not is_hf(m)]
        names = {m: get_method(base_method(m, self.variants)).options.names() for m in ours}
        for key in self.opts:
            if key in BENCH_OPTS or any(key in n for n in names.values()):
                continue
            hint = " (offloading is the model flag --offload)" if key == "offload" else ""
            raise ValueError(f"option {key!r} is not an option of any of the methods {', '.join(ours)}{hint}")
        for m in ours:
            try:
                get_method(base_method(m, self.variants)).make_options(self.method_options(m))
            except ValueError as exc:
                raise ValueError(f"options of {m!r}: {exc}") from None

    def method_options(self, method: str) -> dict[str, Any]:
        """The options a method or variant label runs with: the global ones (`--gamma` among them)
        its method has, then the variant's own (which win). Values as given; `Pipeline.generate`
        parses them."""
        base, own = self.variants.get(method, (method, {}))
        return {**get_method(base).own_options({"gamma": self.gamma, **self.opts}), **own}

    def sampling(self, temperature: float) -> SamplingConfig:
        return SamplingConfig(temperature=temperature, top_k=self.top_k, top_p=self.top_p)


def fingerprint(settings: BenchSettings, target: str | None, dtype: str | None) -> dict[str, Any]:
    """What every row in one output directory must share for its rows to be comparable."""
    return {
        "target": target,
        "dtype": dtype,
        "max_new_tokens": settings.max_new_tokens,
        "gamma": settings.gamma,
        "top_k": settings.top_k,
        "top_p": settings.top_p,
        "opts": settings.opts,
        "run": settings.run_info,
        **({"variants": {k: [m, o] for k, (m, o) in settings.variants.items()}} if settings.variants else {}),
    }
