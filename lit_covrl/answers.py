"""Reading the final answer out of a completion, for `lit_covrl.rewards.MathVerifyReward`.

- `extract_answer(completion)`: the last non-empty balanced `\\boxed{...}`; without one, the last
  math span (`$...$`, `$$...$$`, `\\(...\\)`, `\\[...\\]`), unless a plain number follows it, else
  the last number. The Unicode minus sign reads as "-". Linear in the completion's length.
- `_huge_power(answer)`: whether an answer holds a numeric power that sympy could spend unbounded
  time computing in C (where no time limit can interrupt it): such answers are never parsed.
- `_too_complex(answer, reference)`: whether an answer is longer or more deeply nested than any
  realistic one (math_verify's time grows exponentially with the nesting, and its own time limit
  is off on the reward worker thread): such answers are never parsed either.
"""
from __future__ import annotations

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
_MAX_EXPONENT_DIGITS = 4
_EXPONENT_ATOM = re.compile(r"\s*(?:[-+]?\s*\d+|\\[A-Za-z]+|\S)")
# LaTeX commands that format numbers: their names are not symbols (a part with only these is numeric)
_NUMERIC_COMMANDS = frozenset({"frac", "dfrac", "tfrac", "left", "right", "cdot", "times", "div", "sqrt",
                               "bigl", "bigr", "Bigl", "Bigr", "big", "Big"})


def _skip_spaces(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


def _huge_power(text: str) -> bool:
    """True if `text` has a numeric power that math_verify (sympy) might take unboundedly long to
    evaluate exactly.

    `**` counts as `^`. An exponent is the `{...}` / `(...)` group after a `^`, else the number,
    command or character after it; a base is the group that closes just before the `^`, else the
    letters and digits before it. A part is numeric if it has no letter outside the formatting
    commands `_NUMERIC_COMMANDS` (`\\frac`, `\\left`, ...). Refused: a numeric exponent with more than
    `_MAX_EXPONENT_DIGITS` (4) integer digits in all (`10^{12345}`, `10^{10{,}000{,}000}`); a numeric
    exponent that is itself a power (`10^{10^{7}}`, `2^(10^7)`); a tower (`10^10^7`, `2^{3}^{4}`) or a
    power of a power (`(10^{99})^{99}`) of numeric parts. Symbolic powers pass (`e^{x^2}`,
    `(x^2+1)^2`, `2^{2^n}`), as do `x^2+y^2`, `2^{2024}`, `e^{0.12345}`: sympy keeps them symbolic or
    small. Linear in the text (prefix counts, one bracket-matching pass).
    """
    t = text.replace("**", "^")
    n = len(t)
    if "^" not in t:
        return False
    match = _matching_brackets(t)
    symbolic, int_digits, carets = _prefix_counts(t)

    def count(prefix: list[int], lo: int, hi: int) -> int:  # over t[lo:hi]
        return prefix[hi] - prefix[lo]

    for i, ch in enumerate(t):
        if ch != "^":
            continue
        j = _skip_spaces(t, i + 1)
        if j >= n:
            continue
        if t[j] in "{(" and j in match:
            e_lo, e_hi = j, match[j] + 1
        else:
            atom = _EXPONENT_ATOM.match(t, i + 1)
            if atom is None:
                continue
            e_lo, e_hi = i + 1, atom.end()
        exp_numeric = count(symbolic, e_lo, e_hi) == 0
        if exp_numeric and (count(int_digits, e_lo, e_hi) > _MAX_EXPONENT_DIGITS or count(carets, e_lo, e_hi)):
            return True
        k = i - 1
        while k >= 0 and t[k].isspace():
            k -= 1
        if k < 0:
            continue
        if k in match:  # the base is a group: (a^b)^c or a^{b}^c
            b_lo = match[k]
        else:
            b_lo = k
            while b_lo > 0 and (t[b_lo - 1].isalnum() or t[b_lo - 1] == "."):
                b_lo -= 1
        base_numeric = count(symbolic, b_lo, k + 1) == 0
        before = b_lo - 1
        while before >= 0 and t[before].isspace():
            before -= 1
        tower = before >= 0 and t[before] == "^"  # a^b^c, a^{b}^c
        if exp_numeric and base_numeric and (tower or count(carets, b_lo, k + 1)):
            return True
    return False


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


def _prefix_counts(t: str) -> tuple[list[int], list[int], list[int]]:
    """Prefix sums over `t` of: letters outside `_NUMERIC_COMMANDS` names, digits of integer parts
    (not after a decimal point), and `^`."""
    symbolic, digits, carets = [0], [0], [0]
    i, n, fraction = 0, len(t), False
    while i < n:
        ch = t[i]
        if ch == "\\" and i + 1 < n and t[i + 1].isalpha():
            j = i + 1
            while j < n and t[j].isalpha():
                j += 1
            sym = 0 if t[i + 1:j] in _NUMERIC_COMMANDS else 1
            for k in range(i, j):  # the command's characters: one mark for the whole name
                symbolic.append(symbolic[-1] + (sym if k == i else 0))
                digits.append(digits[-1])
                carets.append(carets[-1])
            i, fraction = j, False
            continue
        fraction = fraction and ch.isdigit() or (ch == "." and i + 1 < n and t[i + 1].isdigit())
        symbolic.append(symbolic[-1] + (ch.isalpha()))
        digits.append(digits[-1] + (ch.isdigit() and not fraction))
        carets.append(carets[-1] + (ch == "^"))
        i += 1
    return symbolic, digits, carets


# Answers math_verify may take seconds to minutes on (see `_too_complex`).
_MAX_ANSWER_CHARS = 300
_MAX_BRACKET_DEPTH = 6
_MAX_FUNCTION_DEPTH = 3
# Functions whose nested applications make math_verify's verify exponentially slow
_FUNCTIONS = frozenset(
    {"sin", "cos", "tan", "cot", "sec", "csc", "arcsin", "arccos", "arctan", "arccot", "arcsec", "arccsc",
     "sinh", "cosh", "tanh", "coth", "sech", "csch", "arsinh", "arcosh", "artanh", "arcsinh", "arccosh",
     "arctanh", "log", "ln", "lg", "exp"})
_SCRIPT = re.compile(r"\s*[\^_]\s*(?:\\[A-Za-z]+|\S)")


def _too_complex(text: str, reference: str = "") -> bool:
    """True if `text` is longer than `_MAX_ANSWER_CHARS` (300) characters, nests brackets deeper
    than `_MAX_BRACKET_DEPTH` (6) or function applications deeper than `_MAX_FUNCTION_DEPTH` (3)
    (see `_nesting`), each limit raised to the `reference` answer's own value: an answer written
    like the reference always passes.

    math_verify's time grows exponentially with the nesting: `\\sin(` 10 times (69 characters)
    took minutes, 20 nested braces more than 2 minutes, a tuple of 1000 numbers 8 s. Within these
    limits an answer takes at most a few seconds; realistic answers (`\\frac{\\sqrt{3}}{2}`,
    `\\sin(\\arctan(2))`, `\\left(\\frac{1}{2}, \\frac{\\sqrt{3}}{2}\\right)`) are far inside them.
    """
    n = max(_MAX_ANSWER_CHARS, len(reference))
    if len(text) > n:
        return True
    brackets, functions = _nesting(text)
    if brackets <= _MAX_BRACKET_DEPTH and functions <= _MAX_FUNCTION_DEPTH:
        return False
    ref_brackets, ref_functions = _nesting(reference)
    return brackets > max(_MAX_BRACKET_DEPTH, ref_brackets) or functions > max(_MAX_FUNCTION_DEPTH, ref_functions)


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
