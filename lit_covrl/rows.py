"""Reading prompt rows from JSON-lines / JSON / Parquet files and validating them.

Row files. `.jsonl`/`.json`: one JSON object per line (a `.json` file holding a single JSON array
is also accepted; its items are numbered 1, 2, ...). `.parquet`: one row per table row. Blank
lines are not rows: they are ignored silently but line numbers still count them. A row is
malformed if it is not valid JSON / not an object, lacks the prompt or answer field, has a null
value, a prompt that is not a string, an answer that is not a string or finite number, an empty
(whitespace-only) value, or text that is not valid Unicode (a lone surrogate such as an escaped
"\\ud83d", which cannot be encoded as UTF-8). Malformed rows are skipped with a warning
`file:line: reason` (the first few per file, then a summary) and counted; with `strict=True` the
first one raises ValueError. In either mode a ValueError names the file when it has no rows at
all, when no row has the configured field names (with the fields found), or when a `.json` file
starting with `[` is not a valid JSON array (with the JSON error's line and column).

Number answers. A whole number is written as an integer, whatever its type: 3 and 3.0 (a float64
column of Parquet / HF datasets, JSON `3.0`) both become "3", JSON `1e3` becomes "1000", never
scientific notation; a float of 2**53 or more keeps the digits written (JSON `1e23` is "1" and 23
zeros, not the float's binary value). A Parquet decimal column is a number too (`2.50` -> "2.5").
Other floats are written as Python's `repr` (`0.5` -> "0.5", `1e-07`); a float32 / float16 column's
values as the shortest decimal that reads back to the same float32 / float16 (0.3, not
0.30000001192092896, its exact value once widened to float64).

Fields. A field name may be a dotted path into nested objects (`reward_model.ground_truth`,
verl's layout); a top-level key that contains the dots itself wins. The prompt may be a string
or a conversation: a non-empty list of `{role, content}` messages with string values (TRL's
conversational format, verl's parquet files), kept as is for the chat template. Every other
top-level column of a valid row is kept in `Example.columns` (for reward keyword arguments).
"""
from __future__ import annotations

import dataclasses
import decimal
import json
import logging
import math
from collections.abc import Iterator
from typing import Any

from lit_covrl.types import Example

__all__ = ["read_rows", "jsonl_rows", "parquet_rows"]

log = logging.getLogger("lit_covrl")

MAX_ROW_WARNINGS = 5  # per file; the rest are summarized


class _Malformed:
    """A row that could not even be decoded (bad UTF-8 / JSON)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def jsonl_rows(path: str) -> Iterator[tuple[str, Any]]:
    """(location, decoded row or _Malformed) for each non-blank line of a JSON-lines file, or each
    item of a `.json` array (ValueError with the JSON error when a file starting with `[` is not one)."""
    with open(path, "rb") as f:
        data = f.read()
    if path.endswith(".json") and data.removeprefix(b"\xef\xbb\xbf").lstrip()[:1] == b"[":  # a BOM may lead
        try:
            items = json.loads(data.decode("utf-8-sig"))
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
            raise ValueError(f"{path}: not a valid JSON array ({e})") from None
        for n, item in enumerate(items, 1):
            yield f"{path}:item {n}", item
        return
    for n, raw in enumerate(data.split(b"\n"), 1):
        loc = f"{path}:{n}"
        try:
            line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
        except UnicodeDecodeError as e:
            yield loc, _Malformed(f"invalid UTF-8 ({e.reason} at byte {e.start})")
            continue
        if not line.strip():
            continue
        try:
            yield loc, json.loads(line)
        except ValueError as e:
            yield loc, _Malformed(f"invalid JSON ({e})")


def parquet_rows(path: str) -> tuple[list[tuple[str, Any]], list[str]]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    rows = narrow_floats_meant(table.to_pylist(), table.schema)
    return [(f"{path}:row {n}", row) for n, row in enumerate(rows, 1)], table.column_names


def narrow_floats_meant(rows: list[dict], schema: Any) -> list[dict]:
    """`rows` with the values of float32 / float16 columns (and of such fields of lists and
    structs) as the decimal the writer meant: the shortest text that reads back to the same
    float32 / float16 (0.3 in a float32 column is 0.30000001192092896 once widened to a Python
    float, which no string or float comparison with "0.3" accepts). `schema`: the table's pyarrow
    schema, which says each value's width (a struct may mix float32 and float64 fields)."""
    import numpy as np
    import pyarrow as pa

    narrow = {pa.float32(): np.float32, pa.float16(): np.float16}

    def is_list(t: Any) -> bool:
        return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)

    def has_narrow(t: Any) -> bool:
        if is_list(t):
            return has_narrow(t.value_type)
        if pa.types.is_struct(t):
            return any(has_narrow(t.field(i).type) for i in range(t.num_fields))
        return t in narrow

    def meant(v: Any, t: Any) -> Any:
        if v is None:
            return v
        if is_list(t):
            return [meant(x, t.value_type) for x in v]
        if pa.types.is_struct(t):
            return {k: meant(x, t.field(k).type) if t.get_field_index(k) >= 0 else x for k, x in v.items()}
        kind = narrow.get(t)
        if kind is None or not math.isfinite(v):
            return v
        # whole numbers below 2**24 (float16: 2**11) are each exactly one float: kept as they are
        return v if v.is_integer() and abs(v) < 2 ** (np.finfo(kind).nmant + 1) else float(str(kind(v)))

    columns = {f.name: f.type for f in schema if has_narrow(f.type)}
    if not columns:
        return rows
    return [{k: meant(v, columns[k]) if k in columns else v for k, v in row.items()} for row in rows]


_MISSING = object()


def get_field(row: dict, path: str) -> Any:
    """row[path] if that key exists, else the dotted path walked through nested dicts; _MISSING
    when absent."""
    if path in row:
        return row[path]
    value: Any = row
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def _check_messages(key: str, messages: list) -> str | None:
    """The reason a conversation is malformed, or None."""
    if not messages:
        return f"empty conversation in field {key!r}"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f"field {key!r} message {i} is not a {{role, content}} object with string values"
    if not any(m["content"].strip() for m in messages):
        return f"empty field {key!r} (every message is empty)"
    if messages[-1]["role"] == "assistant":  # the template then opens another assistant turn after it
        return (f"field {key!r} ends with an 'assistant' message (a supervised fine-tuning row? the policy would "
                "see the answer in its prompt): end prompts with the user's turn")
    for i, m in enumerate(messages):
        reason = _check_unicode(key, m["role"] + m["content"], f" message {i}")
        if reason:
            return reason
    return None


def _check_unicode(key: str, text: str, where: str = "") -> str | None:
    """The reason `text` cannot be encoded as UTF-8 (a lone surrogate), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"field {key!r}{where} is not valid Unicode (lone surrogate {text[e.start]!r} at character {e.start})"
    return None


def number_text(value: int | float | decimal.Decimal) -> str:
    """A finite number answer as text: whole numbers as integers ("3", not "3.0" or "1e+21"),
    other floats as their repr, other decimals with their digits less trailing zeros ("2.5", not
    "2.50"). A whole float of 2**53 or more is written with the digits of its repr (1e23 -> "1"
    and 23 zeros), not its binary value ("99999999999999991611392")."""
    if isinstance(value, decimal.Decimal):  # a Parquet decimal column: exact, any precision
        return str(int(value)) if value == value.to_integral_value() else format(value, "f").rstrip("0")
    if isinstance(value, float) and value.is_integer():
        if abs(value) >= 2**53:  # not every integer is a float here: the repr's digits are the number meant
            return format(decimal.Decimal(repr(value)), "f").removesuffix(".0")  # "9007199254740992.0"
        value = int(value)
    return str(value) if isinstance(value, int) else repr(value)


def _check_row(row: Any, prompt_field: str, answer_field: str) -> Example | str:
    """The row as an Example, or the reason it is malformed."""
    if isinstance(row, _Malformed):
        return row.reason
    if not isinstance(row, dict):
        return f"not a JSON object (got {type(row).__name__})"
    values = []
    for key, numbers_ok in ((prompt_field, False), (answer_field, True)):
        v = get_field(row, key)
        if v is _MISSING:
            return f"missing field {key!r}"
        if key == prompt_field and isinstance(v, list):
            reason = _check_messages(key, v)
            if reason:
                return reason
            values.append([dict(m) for m in v])
            continue
        if v is None:
            return f"null field {key!r}"
        if isinstance(v, (int, float, decimal.Decimal)) and not isinstance(v, bool) and numbers_ok:
            if not math.isfinite(v):
                return f"field {key!r} is not a finite number ({v})"
            v = number_text(v)
        if not isinstance(v, str):
            expected = "a string or a number" if numbers_ok else "a string"
            if not numbers_ok:
                expected += " or a list of {role, content} messages"
            return f"field {key!r} is {type(v).__name__}, expected {expected}"
        if not v.strip():
            return f"empty field {key!r}"
        reason = _check_unicode(key, v)
        if reason:
            return reason
        values.append(v)
    columns = {k: v for k, v in row.items() if k not in (prompt_field, answer_field)}
    return Example(prompt=values[0], answer=values[1], columns=columns)


def read_rows(
    label: str,
    rows: list[tuple[str, Any]],
    prompt_field: str,
    answer_field: str,
    *,
    strict: bool = False,
    columns: list[str] | None = None,
) -> tuple[list[Example], list[str]]:
    """Validate decoded rows [(location, row)] of one source: (valid examples, skipped rows as
    "location: reason" lines).

    `columns` (the schema, when the format has one) is reported when the fields do not match.
    """
    if not rows:
        raise ValueError(f"{label}: no rows")
    dict_rows = [r for _, r in rows if isinstance(r, dict)]
    if dict_rows or columns:
        found = set(columns or ())
        for r in dict_rows:
            found.update(r)
        missing = [k for k in (prompt_field, answer_field)
                   if not any(get_field(r, k) is not _MISSING for r in dict_rows)]
        if missing:
            raise ValueError(
                f"{label}: no row has the field(s) {missing} (prompt_field={prompt_field!r}, "
                f"answer_field={answer_field!r}); fields found: {sorted(map(str, found))}"
            )
    examples: list[Example] = []
    skipped: list[str] = []
    for loc, row in rows:
        checked = _check_row(row, prompt_field, answer_field)
        if isinstance(checked, Example):
            examples.append(dataclasses.replace(checked, source=loc))
            continue
        if strict:
            raise ValueError(f"{loc}: {checked} (strict=True)")
        skipped.append(f"{loc}: {checked}")
        if len(skipped) <= MAX_ROW_WARNINGS:
            log.warning("skipping malformed row %s: %s", loc, checked)
    if len(skipped) > MAX_ROW_WARNINGS:
        log.warning(
            "%s: skipped %d malformed rows in all (%d not shown)",
            label,
            len(skipped),
            len(skipped) - MAX_ROW_WARNINGS,
        )
    return examples, skipped
