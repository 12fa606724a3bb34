"""One-line errors for the console scripts (`lit-covrl fit|validate|test|export`).

A configuration or input error found before any work starts is printed as one line,
`lit-covrl: error: <message>`, and the process exits with status 2. Setting the environment
variable LIT_COVRL_DEBUG=1 re-raises instead, with the full traceback.
"""
from __future__ import annotations

import contextlib
import difflib
import importlib
import inspect
import os
import re
import sys
from argparse import ArgumentError
from typing import Callable, Iterable, Iterator, NoReturn

# jsonargparse appends these lines (the accepted subtypes, the given type) to a type error.
_NOISE = ("Subtypes:", "Given value type:", "Errors:")
_UNION = "Does not validate against any of the Union subtypes"
# jsonargparse's words for a class_path naming a class its module does not have (said once per
# union member it tried, in a paragraph of alternatives)
_NO_CLASS = re.compile(r"Problem with given class_path '([\w.]+)': module '([\w.]+)' has no attribute '(\w+)'")
_KEY = re.compile(r'^Parser key "([^"]+)"')
_NOT_A_TASK = re.compile(r"Import path ([\w.]+) does not implement protocol Task")
# an argument a class does not take (`--model.objective.eps_hgh 5`, or `eps_hgh:` under the class's
# init_args in a --config file); jsonargparse then lists every union member that refused it, the
# given class first (only its complaint counts: a later member's 'not accepted' under a bad value of
# an argument the class does take is no clue). An optimizer or lr scheduler (a callable type) says it
# in its own words. A command-line flag's value is named at the end, NestedArg(key='X', val='Y'); a
# file's is not, nor a dict given to the setting's flag (first tried as a file's path). A
# --trainer.callbacks.X flag reaches only the last callback listed so far.
_NOT_A_PATH = r"(?:- Expected a path but .*? either not accessible or invalid - )?"
_CLASS_ARG = re.compile(r'^Parser key "([\w.]+)": ' + _NOT_A_PATH + _UNION
                        + r" - Problem with given class_path '([\w.]+)': Option '(\w+)' is not accepted")
_CALLABLE_ARG = re.compile(r'^Parser key "([\w.]+)": ' + _NOT_A_PATH + _UNION
                           + r" - Type .*? expects a function or a callable class: Option '(\w+)' is not accepted\. "
                           r"Got value: Namespace\(class_path='([\w.]+)'")
# a bad value of an argument the given class takes: its own complaint, the first member's
_CLASS_VALUE = re.compile(r'^Parser key "([\w.]+)": ' + _UNION + r' - Problem with given class_path \'([\w.]+)\': '
                          r'Parser key "(\w+)": (.*?)(?: - Problem with given class_path| - Expected a <class|$)')
_BUILTIN_TASK_ARG = re.compile(r'^Parser key "data.task".*Expected a dot import path string: (\w+) .*'
                               r"Given value: NestedArg\(key='(\w+)', val='([^']*)'\)")


def debugging() -> bool:
    """True when LIT_COVRL_DEBUG is set to anything but "" or "0"."""
    return os.environ.get("LIT_COVRL_DEBUG", "") not in ("", "0")


def one_line(err: BaseException) -> str:
    """The error as one line: multi-line messages joined, jsonargparse's type lists dropped, and
    the exception's class named unless it is a plain value/argument error."""
    cause = err.__cause__
    if str(err).startswith(_UNION) and isinstance(cause, (ValueError, TypeError)):
        # a class argument our code refused (`ClipCov.ratio must be in (0, 1], got 0.0`), wrapped
        # by jsonargparse in every other member of a union it also failed to match: say the first
        return one_line(cause)
    text = _joined(str(err)) or repr(err)
    if (missing := _missing_class(text)) is not None:
        return missing
    if (arg := class_argument(text)) is not None:
        return arg
    if (bad := _CLASS_VALUE.search(text)) is not None:
        field, path, key, why = bad.groups()
        return f"{field}: {path} argument {key!r}: {why}"
    if (arg := _BUILTIN_TASK_ARG.search(text)) is not None:
        name, key, value = arg.groups()
        return (f"data.task: the built-in task {name!r} takes its arguments from --data.task_kwargs "
                f"'{{{key}: {value}}}' (--data.task.init_args.{key} is for a task given by class_path)")
    if (task := _NOT_A_TASK.search(text)) is not None:
        return (f"data.task: {task.group(1)} is not a task: it needs a method sample(rng) taking the random.Random "
                "as its one argument (see lit_covrl.tasks.base.Task)")
    return text if isinstance(err, (ArgumentError, ValueError)) else f"{type(err).__name__}: {text}"


def _joined(text: str) -> str:
    """A multi-line message as one line, jsonargparse's type lists dropped."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return " ".join(ln for ln in lines if not ln.startswith(_NOISE))


def class_argument(text: str, file_of: Callable[[str], str | None] | None = None,
                   flag_of: Callable[[str], str | None] | None = None) -> str | None:
    """jsonargparse's error for an argument that the class given for a setting does not take, in
    words, with the closest one it does: `model.objective: lit_covrl.objectives.GSPO has no argument
    'clip_lo' (did you mean 'clip_low'?)`; None for other errors. Set in a --config file, the line
    starts with the file (`file_of(key)`, key as `model.objective.clip_lo`: the file that sets it, if
    known); a --trainer.callbacks flag is echoed as given (`flag_of(key)`, if known)."""
    text = _joined(text)
    if (arg := _CLASS_ARG.search(text)) is not None:
        field, path, key = arg.groups()
    elif (arg := _CALLABLE_ARG.search(text)) is not None:
        field, key, path = arg.groups()
    else:
        return None
    module, _, name = path.rpartition(".")
    try:
        params = [p for p in inspect.signature(getattr(importlib.import_module(module), name)).parameters
                  if p not in ("self", "args", "kwargs")]
    except Exception:  # noqa: BLE001 - only a hint: the message stands without it
        params = []
    close = difflib.get_close_matches(key, params, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    value = re.search(rf"NestedArg\(key='{key}', val='([^']*)'\)", text)
    if value is None:  # not a flag: a --config file, or a dict given to the setting's flag
        where = file_of(f"{field}.{key}") if file_of is not None else None
        return f"{where + ': ' if where else ''}{field}: {path} has no argument {key!r}{hint}"
    if field != "trainer.callbacks":
        return f"{field}: {path} has no argument {key!r}{hint}"
    given = flag_of(f"{field}.{key}") if flag_of is not None else None  # as typed, init_args and all
    flag = given or f"--trainer.callbacks.{key}={value.group(1)}"
    return (f"trainer.callbacks: {flag} sets an argument of the last callback listed so far, {path}, which has no "
            f"argument {key!r}{hint}; to set an earlier callback's argument, edit a copy of the YAML, or list the "
            "callbacks on the command line, each --trainer.callbacks+=Class followed by its own "
            "--trainer.callbacks.X=... flags")


# jsonargparse's words for a setting it does not have: a command-line flag, or a key of a --config
# file (or of a dict given to a group flag)
_UNRECOGNIZED = re.compile(r"^unrecognized arguments: (.*)$")
_NOT_ACCEPTED = re.compile(r"^Subcommand '\w+' does not accept option '([\w.]+)'$")


def unknown_settings(text: str, keys: Iterable[str], file_of: Callable[[str], str | None] | None = None,
                     args: list[str] | None = None) -> str | None:
    """jsonargparse's error for settings it does not have, in words, with the closest settings of
    `keys` (the parser's dotted keys): `--model.loss.clip_hgh: no such setting (did you mean
    --model.loss.clip_high?)` for each unrecognized flag (`--trainer.callbackz+=X`: `did you mean
    --trainer.callbacks+=?`), `'stray': not a setting nor a setting's value` for a word that is
    neither (`args`, the arguments as given, tell a flag's value with spaces from such words),
    `PATH: model.loss.clip_hgh: no such setting (...)` for a config key (`file_of(key)`: the
    --config file that sets it, if known). None for other errors."""
    keys = {k for k in keys if not k.endswith(".help")}
    if (flags := _UNRECOGNIZED.match(text)) is not None:
        words, parts = flags.group(1).split(), []
        while words:
            word = words.pop(0)
            if not word.startswith("--"):
                parts.append(f"{word!r}: not a setting nor a setting's value")
                continue
            if "=" not in word and words and not words[0].startswith("--"):  # its value, as a separate argument
                value = args[args.index(word) + 1] if args and word in args[:-1] else words[0]
                del words[:len(value.split())]
            flag, append = re.subn(r"\+$", "", word.split("=", 1)[0])
            close = [f"--{k}{'+=' if append else ''}" for k in _closest_given(flag[2:], keys)]
            parts.append(f"{flag}: no such setting" + (f" (did you mean {_either(close)}?)" if close else ""))
        return "; ".join(parts)
    if (option := _NOT_ACCEPTED.match(text)) is not None:
        key = option.group(1)
        close = _closest_given(key, keys)
        path = file_of(key) if file_of is not None else None
        where = f"{path}: " if path else ""
        return f"{where}{key}: no such setting" + (f" (did you mean {_either(close)}?)" if close else "")
    return None


def _closest_given(key: str, keys: set[str]) -> list[str]:
    """`closest_keys` of `key` as given, init_args dropped (`model.loss.init_args.clip_high` ->
    `model.loss.clip_high`, the setting itself), other than the key itself."""
    return [k for k in closest_keys(re.sub(r"\.init_args(?=\.)", "", key), keys) if k != key]


def _either(options: list[str]) -> str:
    """`a`, `a or b`, `a, b or c`."""
    return " or ".join([", ".join(options[:-1]), options[-1]] if len(options) > 1 else options)


def closest_keys(key: str, keys: set[str], most: int = 3) -> list[str]:
    """The settings of `keys` closest to the dotted `key` (at most `most` of them, equally close),
    only settings, not the groups holding them: found part by part (`model.updat.mini_batch_size`
    -> `model.update.mini_batch_size`; see `_closest` for each part), or else by the last part: the
    settings of that name under the parts before it that were found, else anywhere
    (`model.system_prompt` -> `data.system_prompt`), else the closest names under those parts
    (`model.temp` -> `model.eval.temperature`, `model.rollout.temperature`); [] when nothing is close."""
    settings = {k for k in keys if not any(other.startswith(f"{k}.") for other in keys)}
    *groups, last = key.split(".")
    found, under = [""], ""
    for i, part in enumerate(groups + [last]):
        found = [f"{prefix}{name}." for prefix in found
                 for name in _closest(part, {k[len(prefix):].split(".", 1)[0] for k in keys if k.startswith(prefix)})]
        if len(found) == 1 and i < len(groups):
            under = found[0]
    found = sorted(k.rstrip(".") for k in found if k.rstrip(".") in settings)
    if not found:  # the last part as named, under the parts found (else anywhere), or close to it under them
        named = sorted(k for k in settings if k.rsplit(".", 1)[-1] == last)
        names = _closest(last, {k.rsplit(".", 1)[-1] for k in settings if k.startswith(under)})
        found = ([k for k in named if k.startswith(under)] or named
                 or sorted(k for k in settings if k.startswith(under) and k.rsplit(".", 1)[-1] in names))
    return found[:most]


def _closest(word: str, names: set[str]) -> list[str]:
    """`word` itself if one of `names`, else the names closest to it, all that are equally close
    (difflib's ratio at least 0.6, 0.75 for a word of four letters or fewer: `temp` is no `system`),
    else the one name that begins with a word of four letters or more (an abbreviation, `unlik`)."""
    if word in names:
        return [word]
    ratio = {name: difflib.SequenceMatcher(None, word, name).ratio() for name in names}
    best = max(ratio.values(), default=0.0)
    if best >= (0.75 if len(word) <= 4 else 0.6):
        return sorted(name for name, r in ratio.items() if r == best)
    starting = [name for name in names if name.startswith(word)]
    return starting if len(word) >= 4 and len(starting) == 1 else []


def _missing_class(text: str) -> str | None:
    """`<key>: no class 'm.Name' (...); did you mean m.Nme?` for a misspelt class_path, else None."""
    if (found := _NO_CLASS.search(text)) is None:
        return None
    path, module, attr = found.groups()
    try:
        names = [n for n in dir(importlib.import_module(module)) if not n.startswith("_")]
    except Exception:  # noqa: BLE001 - only a hint: the message stands without it
        names = []
    close = difflib.get_close_matches(attr, names, n=1)
    key = _KEY.match(text)
    return (f"{key.group(1) + ': ' if key else ''}no class {path!r} (module {module!r} has no attribute {attr!r})"
            + (f"; did you mean {module}.{close[0]}?" if close else ""))


def exit_with(err: BaseException) -> NoReturn:
    """Print `err` as one `lit-covrl: error:` line on stderr and exit with status 2."""
    print(f"lit-covrl: error: {one_line(err)} (LIT_COVRL_DEBUG=1 shows the traceback)", file=sys.stderr)
    raise SystemExit(2) from None


@contextlib.contextmanager
def naming_the_setting(field: str, value: str) -> Iterator[None]:
    """A model or tokenizer that cannot be found or read: the error names the setting (Hugging
    Face's own message says only "Repo id must be in the form ..." or "not a valid model")."""
    try:
        yield
    except OSError as err:
        raise OSError(f"{field}={value!r} could not be loaded: {' '.join(str(err).split())}") from err
    except ValueError as err:  # transformers' words name an argument no setting had (review byo25 F8)
        if "trust_remote_code" not in str(err) or "model.trust_remote_code" in str(err):
            raise
        raise ValueError(f"{field}={value!r} has its own modeling code (auto_map in its config.json), which runs only "
                         "with model.trust_remote_code: true: set it if you trust that code (it runs with your "
                         "rights)") from err


class InitFailures:
    """A jsonargparse class instantiator (for every class; the CLI registers it after Lightning's
    own) that keeps the exception of each constructor that raised. jsonargparse keeps only its text,
    in a union's list of member errors, and `model.reward`'s first member's type mismatch
    ("Expected a <class 'list'>") was all the one-line error said (review byo25 F7)."""

    def __init__(self) -> None:
        self.failed: list[tuple[type, BaseException]] = []

    def __call__(self, class_type: type, *args, **kwargs):
        try:
            return class_type(*args, **kwargs)
        except Exception as err:
            self.failed.append((class_type, err))
            raise

    def reward_error(self, err: BaseException, reward) -> str | None:
        """`model.reward[i]: <class_path>.__init__ raised <type>: <text>` for the last reward class (of the
        parsed `model.reward`, one spec or a list) whose constructor raised, when `err` carries its text."""
        specs = reward if isinstance(reward, list) else [reward]
        text = " ".join(str(err).split())
        for cls, cause in reversed(self.failed):
            if " ".join(str(cause).split()) not in text:
                continue
            for i, spec in enumerate(specs):
                path = spec.get("class_path") if hasattr(spec, "get") else None
                if path and _names(path, cls):
                    key = f"model.reward[{i}]" if isinstance(reward, list) else "model.reward"
                    return f"{key}: {path}.__init__ raised {type(cause).__name__}: {_joined(str(cause))}"
        return None


def _names(path: str, cls: type) -> bool:
    """True if the dotted `path` imports `cls`."""
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name, None) is cls
    except Exception:  # noqa: BLE001 - not importable: not that class
        return False
