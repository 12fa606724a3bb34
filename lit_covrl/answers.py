"""Reading the final answer out of a completion, for `lit_covrl.rewards.MathVerifyReward`.

- `extract_answer(completion)`: the last non-empty balanced `\\boxed{...}`; without one, the last
  math span (`$...$`, `$$...$$`, `\\(...\\)`, `\\[...\\]`), unless a plain number follows it, else
  the last number. The Unicode minus sign reads as "-". Linear in the completion's length.
- `_huge_power(answer)`: whether an answer holds a numeric power of more than 10^5 digits, which
  sympy could spend unbounded time computing in C (where no time limit can interrupt it): such
  answers are never parsed.
- `_too_complex(answer, reference)`: whether an answer is longer or more deeply nested than any
  realistic one (math_verify's time grows exponentially with the nesting, and its own time limit
  is off on the reward worker thread): such answers are never parsed either.
"""
from __future__ import annotations

import math
import re

__all__ = ["extract_answer"]

_BOXED = "\\boxed"
_BOXED_OPEN = re.compile(r"\\boxed\s*\{")
# An integer or decimal (thousands separators allowed), optionally a fraction a/b; a minus sign
# counts only when it cannot be a binary minus ("5-3" ends in 3, "is -3" in -3).
_SIGN = r"(?:(?<![\w)}\]])-)?"
_NUMBER = re.compile(_SIGN + r"(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?|\.\d+)")
# A math delimiter `$` is one not escaped as `\$` (a literal dollar sign); `$$` is display math.
_DOLLAR = re.compile(r"(?<!\\)\$")
_SINGLE_DOLLAR = re.compile(r"(?<![\\$])\$(?!\$)")
_DOUBLE_DOLLAR = re.compile(r"(?<!\\)\$\$")
_MINUS = "\u2212"  # the Unicode minus sign, read as "-"


def _last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` with balanced braces whose content is not blank, or None
    (unbalanced and empty ones are skipped). One pass with a stack of open braces."""
    boxed_braces = {m.end() - 1 for m in _BOXED_OPEN.finditer(text)}
    stack: list[int] = []
    best = -1  # opening brace of the last non-empty balanced \boxed{...}
    best_end = -1
    for i, ch in enumerate(text):
        if ch == "{":
            stack.append(i)
        elif ch == "}" and stack:
            start = stack.pop()
            if start in boxed_braces and start > best and text[start + 1 : i].strip():
                best, best_end = start, i
    return text[best + 1 : best_end] if best >= 0 else None


def _pair_spans(starts: list[int], width: int) -> list[tuple[int, int]]:
    """(content start, content end) of delimiters paired in order: 1st with 2nd, 3rd with 4th, ..."""
    return [(a + width, b) for a, b in zip(starts[::2], starts[1::2])]


def _last_math_span(text: str) -> tuple[str, int] | None:
    """(content, end) of the math span (`$...$`, `$$...$$`, `\\(...\\)`, `\\[...\\]`) that ends last,
    or None; blank spans do not count. Dollars pair up in order (1st-2nd, 3rd-4th, ...); the last
    `\\)` or `\\]` pairs with the last opener before it. Linear in the text's length."""
    spans = _pair_spans([m.start() for m in _SINGLE_DOLLAR.finditer(text)], 1)
    spans += _pair_spans([m.start() for m in _DOUBLE_DOLLAR.finditer(text)], 2)
    for opener, closer in (("\\(", "\\)"), ("\\[", "\\]")):
        end = text.rfind(closer)
        start = text.rfind(opener, 0, max(end, 0))
        if end >= 0 and start >= 0:
            spans.append((start + len(opener), end))
    spans = [(a, b) for a, b in spans if text[a:b].strip()]
    if not spans:
        return None
    a, b = max(spans, key=lambda s: s[1])
    return text[a:b].strip(), b


def extract_answer(completion: str) -> str | None:
    """The final answer of a completion: the last balanced, non-empty `\\boxed{...}`; else the last
    of: the last math span (`$...$`, `$$...$$`, `\\(...\\)`, `\\[...\\]`; an escaped `\\$` is a
    dollar sign) and the last number after it. Numbers inside LaTeX are not read on their own
    (`$\\frac{3}{4}$` is `\\frac{3}{4}`, not 4); a Unicode minus (U+2212) counts as "-"."""
    boxed = _last_boxed(completion)
    if boxed is not None:
        return boxed.strip()
    text = completion.replace(_MINUS, "-")
    span = _last_math_span(text)
    after = span[1] if span else 0
    numbers = _NUMBER.findall(text, after)
    if numbers:
        return numbers[-1].replace(" ", "")
    return span[0] if span else None


# Powers sympy may evaluate for unbounded time, in C code holding the GIL (see the module docstring).
_MAX_POWER_DIGITS = 10**5
# a numeric exponent that is itself a power (`2^{2^{11}}`, a tower `2^2^11`) at most 2^10: math_verify
# compared `2^{2^{11}}` with `2^{2048}` in 7 s and `2^{10^{4}}` with `2^{10000}` in over a minute (the
# flat `2^{10000}` is fast)
_MAX_NESTED_EXPONENT_LOG10 = math.log10(1024) + 1e-9
_EXPONENT_ATOM = re.compile(r"\s*(?:[-+]?\s*\d+|\\[A-Za-z]+|\S)")
# A number: thousands separators `,`, `{,}`, `\,`, `\!` allowed
_NUMBER_ATOM = re.compile(r"\d+(?:(?:,|\{,\}|\\[,!])\d{3})*(?:\.\d+)?|\.\d+")
# LaTeX commands that format numbers: their names are not symbols (a part with only these is numeric)
_NUMERIC_COMMANDS = frozenset({"frac", "dfrac", "tfrac", "left", "right", "cdot", "times", "div", "sqrt",
                               "bigl", "bigr", "Bigl", "Bigr", "big", "Big"})
_LOG2 = math.log10(2)
_PLAIN_NUMBER = re.compile(r"\s*[{(]?\s*[-+]?\s*(" + _NUMBER_ATOM.pattern + r")\s*[})]?\s*")


def _skip_spaces(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


def _huge_power(text: str, reference: str = "") -> bool:
    """True if `text` has a numeric power whose exact value could have more than
    `_MAX_POWER_DIGITS` (10^5) digits: math_verify (sympy) might take unboundedly long to compute it.

    `**` counts as `^`. An exponent is the `{...}` / `(...)` group after a `^`, else the number,
    command or character after it, and a tower `a^b^c` (`a^{b}^{c}`) is `a^(b^c)`; a base is the
    group that closes just before the `^`, else the letters, digits and `!` before it. Sizes are
    upper bounds of log10 (`_log10_bound`), with inner powers evaluated from the top while they stay
    within the limit: a power of numeric parts has about |exponent| x log10|base| digits. Refused:
    `10^{10^{7}}`, `10^10^7`, `2^{10}^{7}`, `10^{123456}`, `(10^{999})^{999}`, `\\sqrt{2}^{10^{9}}`,
    `2^{100!}`, a huge numeric power inside a symbolic one (`x^{10^{10^7}}`), and a numeric exponent
    above 2^10 that is itself a power, of a number other than 0 or +-1 (`2^{2^{11}}`, `2^{10^{4}}`:
    small enough, but math_verify took 7 s and over a minute to compare them with `2^{2048}` and
    `2^{10000}`; an upper bound, so `2^{2^{10}-1}` counts as above; not refused when the `reference`
    has such an exponent too: written like the reference, it compares at once). Passed: `2^{3^2}`,
    `(2^3)^2`, `2^{10000}`, `10^{-10000}`, `(-1)^{10001}` (a base of 0 or +-1 stays small),
    `x^{2^{3}}`, and symbolic powers, which sympy keeps symbolic (`e^{x^2}`, `2^{2^n}`, `e^{10^7}`).
    """
    huge, nested = _powers(text)
    return huge or (nested and not _powers(reference)[1])


def _powers(text: str) -> tuple[bool, bool]:
    """(`text` has a power of more than `_MAX_POWER_DIGITS` digits, `text` has a numeric exponent
    bounded above about 2^10 that is itself a power); see `_huge_power`."""
    t = text.replace("**", "^")
    if "^" not in t:
        return False, False
    match = _matching_brackets(t)
    limit = math.log10(_MAX_POWER_DIGITS)
    nested = False
    for i, ch in enumerate(t):
        if ch != "^" or (e_hi := _exponent_end(t, i, match, len(t))) is None:
            continue
        exponent = _exponent_bound(t, i + 1, e_hi, match)
        if exponent is None:  # symbolic
            continue
        if exponent > _MAX_POWER_DIGITS:  # the exponent itself is too large to compute
            return True, nested
        base = _log10_bound(t, _base_start(t, i, match), i, match)
        if base and math.log10(base) + exponent > limit:
            return True, nested
        nested = nested or bool(base and exponent > _MAX_NESTED_EXPONENT_LOG10 and "^" in t[i + 1:e_hi])
    return False, nested


def _exponent_end(t: str, i: int, match: dict[int, int], hi: int) -> int | None:
    """End of the exponent of the `^` at t[i], towers included (`a^b^c`: `b^c`), within t[:hi]; None
    if there is none."""
    end = None
    while i < hi and t[i] == "^":
        j = _skip_spaces(t, i + 1)
        if j < hi and t[j] in "{(" and j in match and match[j] < hi:
            end = match[j] + 1
        elif (atom := _EXPONENT_ATOM.match(t, i + 1, hi)) is not None:
            end = atom.end()
        else:
            return end
        i = _skip_spaces(t, end)
    return end


def _base_start(t: str, i: int, match: dict[int, int]) -> int:
    """Start of the base of the `^` at t[i]: the group that closes just before it, else the letters,
    digits and `!` (`10!^{...}`) before it."""
    k = i - 1
    while k >= 0 and (t[k].isspace() or t[k] == "!"):
        k -= 1
    if k < 0:
        return i
    if k in match and t[k] in ")}]":
        return match[k]
    while k > 0 and (t[k - 1].isalnum() or t[k - 1] == "."):
        k -= 1
    return k


def _log10_bound(t: str, lo: int, hi: int, match: dict[int, int], depth: int = 0) -> float | None:
    """An upper bound of log10 of both |x| and |1/x| (so of the digits of x as a fraction) for the
    value x of t[lo:hi], or None if it has a symbol (a letter outside `_NUMERIC_COMMANDS` names);
    inf past `_MAX_POWER_DIGITS` digits. The bounds of the parts (numbers, groups, powers,
    factorials) add up, plus log10(2) per binary `+` / `-`: that bounds any combination of them."""
    if depth > 50:
        return math.inf
    parts: list[float] = []
    spread = 0.0
    i = lo
    while i < hi:
        ch = t[i]
        if ch == "^":
            end = _exponent_end(t, i, match, hi)
            if end is None:
                i += 1
                continue
            exponent = _exponent_bound(t, i + 1, end, match, depth + 1)
            if exponent is None:
                return None
            parts.append(_power_bound(parts.pop() if parts else 0.0, exponent))
            i = end
        elif ch == "!":  # n! < n^n
            if parts:
                parts[-1] = _power_bound(parts[-1], parts[-1])
            i += 1
        elif (number := _NUMBER_ATOM.match(t, i, hi)) is not None:
            digits = re.sub(r"\D", "", number.group())
            exact = "." not in number.group() and len(digits) <= 300
            parts.append(math.log10(max(1, int(digits))) if exact else float(len(digits)))
            i = number.end()
        elif ch in "({[" and i in match and match[i] < hi:
            inner = _log10_bound(t, i + 1, match[i], match, depth + 1)
            if inner is None:
                return None
            parts.append(inner)
            i = match[i] + 1
        elif ch == "\\" and i + 1 < hi and t[i + 1].isalpha():
            j = i + 1
            while j < hi and t[j].isalpha():
                j += 1
            if t[i + 1:j] not in _NUMERIC_COMMANDS:
                return None
            i = j
        elif ch.isalpha():
            return None
        else:
            if ch in "+-" and parts:
                spread += _LOG2
            i += 1
    return sum(parts) + spread


def _exponent_bound(t: str, lo: int, hi: int, match: dict[int, int], depth: int = 0) -> float | None:
    """`_log10_bound` of an exponent, which needs only log10 |x|: exact for a plain number
    (`{0.12345}`, `(-3)`), where that bound counts a decimal's digits."""
    plain = _PLAIN_NUMBER.fullmatch(t, lo, hi)
    if plain is not None:
        return math.log10(max(1.0, abs(float(re.sub(r"[^\d.]", "", plain.group(1))))))
    return _log10_bound(t, lo, hi, match, depth)


def _power_bound(base: float, exponent: float) -> float:
    """The log10 bound of b^e from those of b and e: |e| x log10|b| <= 10^exponent x base; inf past
    `_MAX_POWER_DIGITS` digits. A base whose bound is 0 (0, 1, -1) stays 0."""
    if base == 0:
        return 0.0
    if math.log10(base) + exponent > math.log10(_MAX_POWER_DIGITS):
        return math.inf
    return 10**exponent * base


def _matching_brackets(t: str) -> dict[int, int]:
    """Both ends of every matched (), {}, [] pair: opener -> closer and closer -> opener."""
    pairs, stack = {}, []
    for i, ch in enumerate(t):
        if ch in "({[":
            stack.append(i)
        elif ch in ")}]" and stack and t[stack[-1]] + ch in ("()", "{}", "[]"):
            o = stack.pop()
            pairs[o], pairs[i] = i, o
    return pairs


# Answers math_verify may take seconds to minutes on (see `_too_complex`).
_MAX_ANSWER_CHARS = 300
_MAX_BRACKET_DEPTH = 6
_MAX_FUNCTION_DEPTH = 4
# e^{e^{e^{e^{...}}}}: four exponentials of e directly nested (with `e` at the top, math_verify ran
# for minutes comparing it with a number; with `x` or `1` there, or three levels, it took 0.3 s)
_E_TOWER = re.compile(r"(?:e\^\{?){4}")
# Functions whose nested applications make math_verify's verify exponentially slow
_FUNCTIONS = frozenset(
    {"sin", "cos", "tan", "cot", "sec", "csc", "arcsin", "arccos", "arctan", "arccot", "arcsec", "arccsc",
     "sinh", "cosh", "tanh", "coth", "sech", "csch", "arsinh", "arcosh", "artanh", "arcsinh", "arccosh",
     "arctanh", "log", "ln", "lg", "exp"})
_SCRIPT = re.compile(r"\s*[\^_]\s*(?:\\[A-Za-z]+|\S)")


def _too_complex(text: str, reference: str = "") -> bool:
    """True if `text` is longer than `_MAX_ANSWER_CHARS` (300) characters (whitespace aside), nests
    brackets deeper than `_MAX_BRACKET_DEPTH` (6) or function applications deeper than
    `_MAX_FUNCTION_DEPTH` (4) (see `_nesting`), or holds four directly nested exponentials of e
    (`_E_TOWER`), each limit raised to the `reference` answer's own value: an answer written like
    the reference always passes.

    math_verify's time grows exponentially with the nesting: `\\sin(` 10 times (69 characters)
    took minutes, 6 nested functions 10-20 s, 5 about 3 s, 4 half a second (a product of four,
    `\\sin x \\cos x \\cos 2x \\cos 4x`, is 4 deep); `e^{e^{e^{e^{e}}}}` against a number minutes;
    20 nested braces more than 2 minutes, a tuple of 1000 numbers 8 s. Within these
    limits an answer takes at most a few seconds; realistic answers (`\\frac{\\sqrt{3}}{2}`,
    `\\sin(\\arctan(2))`, `\\left(\\frac{1}{2}, \\frac{\\sqrt{3}}{2}\\right)`) are far inside them.
    """
    if _visible_length(text) > max(_MAX_ANSWER_CHARS, _visible_length(reference)):
        return True
    if _E_TOWER.search(_compact(text)) and not _E_TOWER.search(_compact(reference)):
        return True
    brackets, functions = _nesting(text)
    if brackets <= _MAX_BRACKET_DEPTH and functions <= _MAX_FUNCTION_DEPTH:
        return False
    ref_brackets, ref_functions = _nesting(reference)
    return brackets > max(_MAX_BRACKET_DEPTH, ref_brackets) or functions > max(_MAX_FUNCTION_DEPTH, ref_functions)


def _compact(text: str) -> str:
    return "".join(text.split())


def _visible_length(text: str) -> int:
    """Characters but whitespace (`(1, 2)` and `(1,2)` are the same answer)."""
    return len(_compact(text))


def _nesting(t: str) -> tuple[int, int]:
    """(deepest nesting of matched (), {}, [] pairs, deepest nesting of function applications).

    A function is a command of `_FUNCTIONS` (`\\sin`, `\\log`, ...) or `e^{...}`. One whose argument
    is a bracket group (`\\sin(x)`, `\\log_2 \\left(x\\right)`, `\\sin^{2}(x)`, `e^{x}`) applies inside
    that group; one without (`\\sin \\cos x`) until the next `+ - = , ;` of its group that is not a
    sign (`\\sin -\\sin x` nests two). So `\\sin(\\cos(x))`, `\\sin \\cos x` and `\\sin x \\cos x` nest 2
    deep (math_verify reads `\\sin x \\cdot \\cos x` as sin(x cos(x))), `\\sin x + \\cos x` and
    `\\sin(x)\\cos(x)` 1. Linear in the text.
    """
    match = _matching_brackets(t)
    calls: set[int] = set()  # opening brackets of a function's argument
    frames = [[-1, 0, 0]]  # per open group: [its closer, 1 if a function's argument, functions applied loosely]
    brackets = functions = now = 0  # `now`: the functions applied at i (the sum over frames)
    operand = arg_start = -1  # where the last operand ends, where the last function's argument starts
    i, n = 0, len(t)
    while i < n:
        ch = t[i]
        if ch == "\\" and i + 1 < n and t[i + 1].isalpha():
            j = i + 1
            while j < n and t[j].isalpha():
                j += 1
            if t[i + 1:j] not in _FUNCTIONS:
                operand, i = j - 1, j
                continue
            k = j  # its argument starts after its sub/superscripts (`\\log_{2}`, `\\sin^2`)
            while (m := _SCRIPT.match(t, k)) is not None:
                k = match[m.end() - 1] + 1 if t[m.end() - 1] == "{" and m.end() - 1 in match else m.end()
            k = _skip_spaces(t, k)
            if t.startswith("\\left", k):
                k = _skip_spaces(t, k + len("\\left"))
            if k < n and t[k] in "({[" and k in match:
                calls.add(k)
            else:
                frames[-1][2] += 1
                now += 1
            arg_start, i = k, j
        elif ch in "({[" and i in match:
            frames.append([match[i], int(i in calls), 0])
            now += frames[-1][1]
            i += 1
        elif ch in ")}]" and frames[-1][0] == i:
            _, call, loose = frames.pop()
            now -= call + loose
            operand, i = i, i + 1
        else:
            if ch in "+-=,;" and operand >= arg_start:  # not a sign right after a function
                now -= frames[-1][2]
                frames[-1][2] = 0
            elif ch == "e" and (k := _skip_spaces(t, i + 1)) < n and t[k] == "^":  # e^{...}
                k = _skip_spaces(t, k + 1)
                if k < n and t[k] == "{" and k in match:
                    calls.add(k)
            if ch.isalnum():
                operand = i
            i += 1
        brackets = max(brackets, len(frames) - 1)
        functions = max(functions, now)
    return brackets, functions
