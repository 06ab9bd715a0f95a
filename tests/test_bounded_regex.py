"""lightning_lora.core.bounded_regex: PEFT's regexes from untrusted files, matched without backtracking."""

from __future__ import annotations

import re
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_lora.core.bounded_regex import MatchBudget, UnsupportedPattern, compile_bounded

ATOMS = st.sampled_from(["a", "b", ".", r"\.", r"\d", r"\w", "[ab]", "[^a]", "[a-c]", "x", "0", "^", "$"])
QUANTIFIERS = st.sampled_from(["", "", "*", "+", "?", "*?", "{2}", "{1,2}", "{0,}", "{,2}"])


def patterns():
    atom = st.tuples(ATOMS, QUANTIFIERS).map("".join)
    return st.recursive(
        st.lists(atom, min_size=0, max_size=4).map("".join),
        lambda inner: st.tuples(st.lists(inner, min_size=1, max_size=3), QUANTIFIERS, st.booleans()).map(
            lambda t: ("(?:" if t[2] else "(") + "|".join(t[0]) + ")" + t[1]
        ),
        max_leaves=6,
    )


@settings(max_examples=600, deadline=None)
@given(pattern=patterns(), name=st.text(alphabet="ab.x0_", max_size=8))
def test_on_its_subset_it_answers_as_re_fullmatch(pattern, name):
    try:
        expected = bool(re.fullmatch(pattern, name))
    except re.error:
        with pytest.raises(re.error):
            compile_bounded(pattern)
        return
    assert compile_bounded(pattern)(name) == expected, (pattern, name)


@pytest.mark.parametrize(
    "pattern, names",
    [
        (r".*\.(q_proj|v_proj)", ["model.layers.0.q_proj", "model.k_proj", "q_proj"]),
        (r"model\.layers\.\d+\.self_attn\.(q|v)_proj", ["model.layers.12.self_attn.q_proj", "model.layers.x.q_proj"]),
        (r"(?:.*\.)?(^net\.fc1)", ["net.fc1", "a.net.fc1"]),  # how a rank_pattern key is matched
        (r"(?P<layer>fc\d)|head", ["fc1", "head", "fc"]),
        (r"[]a-]+", ["]a-", "b"]),
    ],
)
def test_the_patterns_adapter_files_use(pattern, names):
    for name in names:
        assert compile_bounded(pattern)(name) == bool(re.fullmatch(pattern, name)), name


@pytest.mark.parametrize("pattern", [r"(a+)+$", r"(a|a)*b", r"(.*a){12}", r"(\w+\.?)+x", r"(a*)*(a*)*b"])
def test_catastrophic_backtracking_patterns_take_linear_time(pattern):
    name = "a" * 3000 + "!"
    began = time.perf_counter()
    assert compile_bounded(pattern)(name) is False
    assert time.perf_counter() - began < 5  # re.fullmatch would not finish this in years


@pytest.mark.parametrize(
    "pattern, said",
    [
        (r"(a)\1", r"\1"),
        (r"(?=a)a", "lookaround"),
        (r"(?i)fc1", "inline flag"),
        (r"a++", "possessive"),
        (r"a{101}", "over 100"),
        ("(" * 10 + "a{1,100}" + "){1,100}" * 10, "too large"),
        ("a" * 10_001, "longer than"),
    ],
)
def test_what_it_cannot_bound_is_refused_naming_the_construct(pattern, said):
    with pytest.raises(UnsupportedPattern, match=re.escape(said)):
        compile_bounded(pattern)


def test_an_invalid_regex_gets_pythons_own_error():
    with pytest.raises(re.error):
        compile_bounded("(a")


def test_a_shared_budget_lets_plain_patterns_through_many_names():
    budget = MatchBudget()
    names = [f"transformer.h.{i}.{part}" for i in range(48) for part in ("attn.c_attn", "attn.c_proj", "mlp.c_fc")]
    matchers = [compile_bounded(rf"(?:.*\.)?(?:transformer\.h\.{i}\.attn\.c_attn)", budget) for i in range(48)]
    matchers.append(compile_bounded(r".*\.(c_attn|c_proj|c_fc)", budget))
    assert sum(m(n) for m in matchers for n in names) == 48 + len(names)


def test_a_shared_budget_stops_a_slow_pattern_and_very_many_large_ones():
    slow = compile_bounded(r"(?:(?:.?){60}){60}!", MatchBudget())
    with pytest.raises(UnsupportedPattern, match="over 64 automaton steps per character"):
        slow("transformer.h.0.attn.c_attn")
    assert compile_bounded(r"(?:(?:.?){60}){60}!")("a" * 20) is False  # alone, it is only slow
    budget = MatchBudget()
    with pytest.raises(UnsupportedPattern, match="the patterns together are too large"):
        for _ in range(300):  # each accepted alone (under MAX_STATES), together refused before all are built
            compile_bounded(r"(?:a{1,99}b){40}", budget)


@pytest.mark.parametrize(
    "pattern, names",
    [
        (r"(?:\bmodel\.layers\.[\d]{1,}\.(?:self_attn|mlp)\.(?:q_proj|up_proj))|(?:\blinear[123])",  # Unsloth's form
         ["model.layers.3.self_attn.q_proj", "xmodel.layers.3.mlp.up_proj", "linear2", "alinear2"]),
        (r".*\bproj", ["model.q_proj", "model.proj"]),
        (r".*\Bproj", ["model.q_proj", "model.proj"]),
        (r"\Afc\d\Z", ["fc1", "fc12"]),
    ],
)  # fmt: skip
def test_zero_width_assertions_answer_as_re_does(pattern, names):
    for name in names:
        assert compile_bounded(pattern)(name) == bool(re.fullmatch(pattern, name)), name


def test_hostile_shapes_are_refused_at_once_and_long_plain_alternations_accepted():
    with pytest.raises(UnsupportedPattern, match="nests its groups too deeply"):
        compile_bounded("(" * 400 + "linear1" + ")" * 400)
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(50_000)  # as some libraries do (the refusal must not rest on the interpreter's limit)
    try:
        with pytest.raises(UnsupportedPattern, match="nests its groups too deeply"):
            compile_bounded("(" * 400 + "linear1" + ")" * 400)
    finally:
        sys.setrecursionlimit(limit)
    assert compile_bounded("(" * 90 + "linear1" + ")" * 90)("linear1")
    wide = "[" + "".join(chr(0x4E00 + i) for i in range(900)) + "]"
    began = time.perf_counter()
    with pytest.raises(UnsupportedPattern, match="a character class of over 32 items"):
        compile_bounded(f"(?:(?:{wide}){{100}}){{60}}")
    assert time.perf_counter() - began < 1
    names = [f"module_{i}" for i in range(119)]
    assert compile_bounded("|".join(names))("module_118")  # 1,300 characters: a legitimate list, as a regex
