"""Regular expressions from untrusted files, matched in time linear in the name: no backtracking.

PEFT's adapter configs hold regexes (a string ``target_modules``, the keys of ``rank_pattern`` and
``alpha_pattern``). Python's ``re`` backtracks: a pattern such as ``(a+)+$`` takes exponential time
on a name that almost matches, so a hostile file could hang ``load_adapter``. Here a pattern is
parsed into the regular subset such files use (literals, ``.``, classes ``[...]``, ``\\d \\w \\s``
and their negations, groups, ``|``, ``* + ? {m,n}`` and their lazy forms, the zero-width
``^ $ \\A \\Z \\b \\B``) and run as a Thompson NFA: every character of the name advances a set
of states, so a match costs at most (name length x pattern size) steps, whatever the pattern.
Constructs outside that subset (backreferences, lookarounds, inline flags) are refused with a
clear error, as is a pattern whose automaton would be too large, nested too deeply or with a
character class too wide. On the subset, the answer is ``re.fullmatch``'s (a test compares them
on random patterns).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

MAX_PATTERN = 10_000
"""Longest pattern accepted (characters): an alternation of a few hundred module names fits."""

MAX_CLASS = 32
"""Most items in one character class ``[...]``: each is tested per character, and re-parsed per copy."""

MAX_DEPTH = 100
"""Deepest nesting of groups accepted: a fixed bound, not the interpreter's recursion limit (which others raise)."""

MAX_STATES = 20_000
"""Largest automaton accepted (a counted repeat ``{m,n}`` copies its body)."""


STEPS_PER_CHARACTER = 64
"""What a :class:`MatchBudget` allows: automaton steps per character of every name tried, on average."""


class UnsupportedPattern(ValueError):
    """A pattern outside the bounded subset, or too large; the message says which construct."""


class MatchBudget:
    """A shared bound on the work of many matchers: all the patterns of one file, say.

    Each pattern alone is linear in the name, but a file may hold thousands of patterns of up to
    :data:`MAX_STATES` states each, so the product is what must be bounded. Every name a matcher is
    given allows :data:`STEPS_PER_CHARACTER` steps per character (a plain pattern takes 2-5); a
    matcher that runs past what all the calls so far allowed raises :class:`UnsupportedPattern`.
    Compiling spends the automaton's states from a start allowance, so very many large patterns
    are refused before they are all built. Matching a whole file then costs at most that
    allowance plus that many steps per character of every name tried.
    """

    def __init__(self, steps_per_character: int = STEPS_PER_CHARACTER, compile_steps: int = 400_000) -> None:
        self.steps_per_character = steps_per_character
        self.left = 0
        self.states_left = compile_steps  # building automata costs their states: thousands of small ones fit

    def build(self, states: int) -> None:
        self.states_left -= states
        if self.states_left < 0:
            raise UnsupportedPattern("the patterns together are too large to match safely; simplify them")

    def allow(self, name: str) -> None:
        self.left += self.steps_per_character * (len(name) + 1)

    def spend(self, steps: int) -> None:
        self.left -= steps
        if self.left < 0:
            raise UnsupportedPattern(
                f"matching needs over {self.steps_per_character} automaton steps per character of a module name "
                "(patterns built to be slow, or very many); simplify the patterns"
            )


Test = Callable[[str], bool]

_CLASS_ESCAPES: dict[str, Test] = {
    "d": str.isdecimal,
    "D": lambda c: not c.isdecimal(),
    "w": lambda c: c.isalnum() or c == "_",
    "W": lambda c: not (c.isalnum() or c == "_"),
    "s": str.isspace,
    "S": lambda c: not c.isspace(),
}
_COUNTED = re.compile(r"\{(\d*)(,(\d*))?\}")  # a counted repeat {m}, {m,}, {m,n}, {,n}
_LITERAL_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v"}


@dataclass
class _State:
    test: Test | None = None  # consumes one character that passes the test
    assertion: str | None = None  # "^", "$", "\\A", "\\Z", "\\b" or "\\B": zero-width
    out: list[int] = field(default_factory=list)  # epsilon edges (or the one edge after a test/assertion)


class _Builder:
    """A recursive-descent parser that emits NFA fragments (start, list of dangling exits) as it goes."""

    def __init__(self, pattern: str) -> None:
        self.pattern, self.pos, self.states, self.depth = pattern, 0, [], 0

    def state(self, **kwargs) -> int:
        if len(self.states) >= MAX_STATES:
            raise UnsupportedPattern(
                f"pattern {self.pattern!r} is too large to match safely (over {MAX_STATES} states)"
            )
        self.states.append(_State(**kwargs))
        return len(self.states) - 1

    def peek(self) -> str | None:
        return self.pattern[self.pos] if self.pos < len(self.pattern) else None

    def take(self) -> str:
        char = self.pattern[self.pos]
        self.pos += 1
        return char

    def refuse(self, what: str) -> UnsupportedPattern:
        return UnsupportedPattern(
            f"pattern {self.pattern!r} uses {what} (at position {self.pos}), which cannot be matched in bounded time; "
            "use plain names, or a regex of literals, ., [...], groups, | and * + ? {m,n}"
        )

    # Each parse_* returns a fragment: (entry state, exit states whose ``out`` is still to be linked).
    def parse_alternation(self) -> tuple[int, list[int]]:
        branches = [self.parse_sequence()]
        while self.peek() == "|":
            self.take()
            branches.append(self.parse_sequence())
        if len(branches) == 1:
            return branches[0]
        entry = self.state(out=[start for start, _ in branches])
        return entry, [exit_ for _, exits in branches for exit_ in exits]

    def parse_sequence(self) -> tuple[int, list[int]]:
        entry = self.state()
        exits = [entry]
        while self.peek() not in (None, "|", ")"):
            start, ends = self.parse_repeat()
            self.link(exits, start)
            exits = ends
        return entry, exits

    def link(self, exits: list[int], target: int) -> None:
        for exit_ in exits:
            self.states[exit_].out.append(target)

    def parse_repeat(self) -> tuple[int, list[int]]:
        begin = self.pos
        fragment = self.parse_atom()
        low, high = self.quantifier()
        if low == 1 and high == 1:
            return fragment
        body = self.pattern[begin : self.pos_before_quantifier]
        copies = [fragment] + [self.reparse(body) for _ in range(max(low, 1 if high is None else high) - 1)]
        entry = self.state()
        exits, optional = [entry], []
        for i, (start, ends) in enumerate(copies):
            if i >= low:  # this copy and the rest may be skipped
                optional.extend(exits)
            self.link(exits, start)
            exits = ends
        if high is None:  # the last copy repeats
            last_start, last_ends = copies[-1]
            self.link(last_ends, last_start)
        return entry, exits + optional

    def reparse(self, body: str) -> tuple[int, list[int]]:
        saved = self.pattern, self.pos
        self.pattern, self.pos = body, 0
        try:
            return self.parse_atom()
        finally:
            self.pattern, self.pos = saved

    def quantifier(self) -> tuple[int, int | None]:
        self.pos_before_quantifier = self.pos
        char = self.peek()
        if char in ("*", "+", "?"):
            self.take()
            bounds = {"*": (0, None), "+": (1, None), "?": (0, 1)}[char]
        elif char == "{" and (match := _COUNTED.match(self.pattern, self.pos)):
            low = int(match.group(1) or 0)
            high = low if match.group(2) is None else (int(match.group(3)) if match.group(3) else None)
            if match.group(1) == "" and match.group(2) is None:
                return 1, 1  # "{}" is a literal in Python's re; parse_atom takes it
            self.pos = match.end()
            if max(low, high or 0) > 100:
                raise self.refuse("a repeat count over 100")
            bounds = (low, high)
        else:
            return 1, 1
        if self.peek() == "?":  # lazy: the same set of matches
            self.take()
        elif self.peek() == "+":
            raise self.refuse("a possessive quantifier")
        if self.peek() in ("*", "+", "?") or (self.peek() == "{" and re.match(r"\{\d", self.pattern[self.pos :])):
            raise self.refuse("a repeated quantifier")
        return bounds

    def parse_atom(self) -> tuple[int, list[int]]:
        char = self.take()
        if char == "(":
            if self.peek() == "?":
                rest = self.pattern[self.pos :]
                if rest.startswith("?:"):
                    self.pos += 2
                elif re.match(r"\?P<\w+>", rest):
                    self.pos += rest.index(">") + 1
                else:
                    raise self.refuse("a lookaround, backreference or inline flag (?...)")
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise RecursionError  # refused as too deep by compile_bounded, whatever the recursion limit
            fragment = self.parse_alternation()
            self.depth -= 1
            if self.peek() != ")":
                raise self.refuse("an unbalanced parenthesis")
            self.take()
            return fragment
        if char in ("^", "$") or (char == "\\" and self.peek() in ("b", "B", "A", "Z")):
            node = self.state(assertion=char if char != "\\" else "\\" + self.take())
            return node, [node]
        if char == ".":
            test: Test = lambda c: c != "\n"  # noqa: E731
        elif char == "[":
            test = self.parse_class()
        elif char == "\\":
            test = self.escape(in_class=False)
        else:
            test = char.__eq__
        node = self.state(test=test)
        return node, [node]

    def escape(self, in_class: bool) -> Test:
        if self.peek() is None:
            raise self.refuse("a trailing backslash")
        char = self.take()
        if char in _CLASS_ESCAPES:
            return _CLASS_ESCAPES[char]
        if char in _LITERAL_ESCAPES:
            return _LITERAL_ESCAPES[char].__eq__
        if char.isalnum():
            raise self.refuse(f"the escape \\{char}")
        return char.__eq__

    def parse_class(self) -> Test:
        negate = self.peek() == "^"
        if negate:
            self.take()
        tests: list[Test] = []
        first = True
        while True:
            if self.peek() is None:
                raise self.refuse("an unterminated [...]")
            char = self.take()
            if char == "]" and not first:
                break
            if len(tests) >= MAX_CLASS:
                raise self.refuse(f"a character class of over {MAX_CLASS} items")
            first = False
            if char == "[" and self.peek() in (":", "=", "."):
                raise self.refuse("a POSIX class [[:...:]]")
            if char == "\\":
                single = self.escape(in_class=True)
                literal = self.pattern[self.pos - 1]
                if literal in _CLASS_ESCAPES:
                    tests.append(single)
                    continue
                char = _LITERAL_ESCAPES.get(literal, literal)
            if self.peek() == "-" and self.pos + 1 < len(self.pattern) and self.pattern[self.pos + 1] != "]":
                self.take()
                end = self.take()
                if end == "\\":
                    end = self.take()
                    if end in _CLASS_ESCAPES:
                        raise self.refuse("a range ending in a class escape")
                    end = _LITERAL_ESCAPES.get(end, end)
                tests.append(lambda c, lo=char, hi=end: lo <= c <= hi)
            else:
                tests.append(char.__eq__)
        if negate:
            return lambda c: not any(test(c) for test in tests)
        return lambda c: any(test(c) for test in tests)


def _is_word(name: str, index: int) -> bool:
    return 0 <= index < len(name) and (name[index].isalnum() or name[index] == "_")


def _holds(assertion: str, name: str, position: int) -> bool:
    """A zero-width assertion at ``position`` of ``name`` (``$`` at the very end, as in a full match)."""
    if assertion in ("^", "\\A"):
        return position == 0
    if assertion in ("$", "\\Z"):
        return position == len(name)
    boundary = _is_word(name, position - 1) != _is_word(name, position)
    return boundary if assertion == "\\b" else not boundary


def _consumes(state: _State, char: str) -> bool:
    return state.test is not None and state.test(char)


def compile_bounded(pattern: str, budget: MatchBudget | None = None) -> Callable[[str], bool]:
    """A function that says whether a name fully matches ``pattern``, in linear time.

    Args:
        pattern: The regex (Python's syntax, the bounded subset).
        budget: Shared by every matcher of one file, bounds their work together (:class:`MatchBudget`).

    Raises:
        re.error: ``pattern`` is not a valid Python regex.
        UnsupportedPattern: it is valid but outside the bounded subset, or too large.
    """
    if not isinstance(pattern, str):
        raise UnsupportedPattern(f"a pattern must be a string, got {pattern!r}")
    if len(pattern) > MAX_PATTERN:
        raise UnsupportedPattern(f"a pattern of {len(pattern)} characters is longer than {MAX_PATTERN}")
    re.compile(pattern)  # Python's own errors for invalid patterns (compiling never backtracks)
    builder = _Builder(pattern)
    try:
        start, exits = builder.parse_alternation()
    except RecursionError:
        raise UnsupportedPattern(f"pattern {pattern[:80]!r}... nests its groups too deeply to match safely") from None
    if builder.peek() is not None:
        raise builder.refuse("an unbalanced parenthesis")
    accept = builder.state()
    builder.link(exits, accept)
    states = builder.states
    if budget is not None:
        budget.build(len(states))

    def closure(current: set[int], position: int, name: str) -> set[int]:
        seen, stack = set(), list(current)
        while stack:
            index = stack.pop()
            if index in seen:
                continue
            state = states[index]
            if state.assertion is not None and not _holds(state.assertion, name, position):
                continue
            seen.add(index)
            if state.test is None:
                stack.extend(state.out)
        return seen

    def fullmatch(name: str) -> bool:
        if budget is not None:
            budget.allow(name)
        current = closure({start}, 0, name)
        for position, char in enumerate(name):
            if budget is not None:
                budget.spend(len(current))
            step = {nxt for i in current if _consumes(states[i], char) for nxt in states[i].out}
            current = closure(step, position + 1, name)
            if not current:
                return False
        return accept in current

    return fullmatch


__all__ = ["MAX_PATTERN", "MAX_STATES", "STEPS_PER_CHARACTER", "MatchBudget", "UnsupportedPattern", "compile_bounded"]
