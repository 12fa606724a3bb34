"""The command line as `lit-covrl` rewrites it before jsonargparse parses it: pure functions of
the list of argument strings (and of the `--config` files they name).

- `check_moved_keys`: a flat key that moved into a settings group is refused with its new name, and
  Lightning's top-level `optimizer` / `lr_scheduler` with `model.optimizer` / `model.lr_scheduler`;
- `one_string_lists`: a bare value of a string-list key is one string (`--model.rollout.stop+=####`);
- `reset_switched_classes`: a switched objective or sampler class starts from its own defaults
  (and a class flag that a later `--config` file would replace is refused);
- `stack_config_callbacks`: the `trainer.callbacks` of stacked `--config` files add up;
- `warn_replaced_loss_settings`: a stacked method config that replaces another's `model.loss`
  value is said;
- `name_setting_sources`: a settings error names the stacked files that set the keys it names.
"""
from __future__ import annotations

import json
import logging
import os
import re
from contextlib import contextmanager

import yaml

from lit_covrl.settings import moved_key_hint

log = logging.getLogger("lit_covrl")


def _config_paths(args: list[str]) -> list[tuple[int, str]]:
    """(index of the last argument of each `--config PATH` / `--config=PATH`, PATH), in order
    (`-c`, Lightning's short form, too)."""
    out = []
    for i, a in enumerate(args):
        if a in ("--config", "-c") and i + 1 < len(args):
            out.append((i + 1, args[i + 1]))
        elif a.startswith(_CONFIG_EQ):
            out.append((i, a.split("=", 1)[1]))
    return out


_CONFIG_EQ = ("--config=", "-c=")


def _file_callbacks(path: str) -> list | None:
    """The `trainer.callbacks` list of a YAML config file (interpolations resolved), if any."""
    from omegaconf import OmegaConf

    if not os.path.isfile(path):
        return None  # not a file (an inline YAML string, or missing): the parser reports it
    with _yaml_errors_named(path):
        cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    callbacks = (cfg.get("trainer") or {}).get("callbacks") if isinstance(cfg, dict) else None
    if callbacks is None:
        return None
    return callbacks if isinstance(callbacks, list) else [callbacks]


def _file_model(path: str) -> dict:
    """The `model:` (or `model.init_args:`) mapping of a YAML config file ({} if none)."""
    return _model_section(_file_top(path))


def _model_section(cfg: dict) -> dict:
    """The `model:` (or `model.init_args:`) mapping of a config's top-level mapping ({} if none)."""
    model = cfg.get("model")
    if isinstance(model, dict) and isinstance(model.get("init_args"), dict):
        model = model["init_args"]
    return model if isinstance(model, dict) else {}


@contextmanager
def _yaml_errors_named(path: str):
    """A YAML syntax error of a config file as a one-line ValueError naming the file (PyYAML's own
    is a multi-line traceback)."""
    try:
        yield
    except yaml.YAMLError as err:
        raise ValueError(f"--config {path}: not valid YAML: {' '.join(str(err).split())}") from err


def _file_top(path: str) -> dict:
    """The top-level mapping of a YAML config file ({} if none, or not a file)."""
    if not os.path.isfile(path):
        return {}
    with open(path) as f, _yaml_errors_named(path):
        cfg = yaml.safe_load(f)
    return cfg if isinstance(cfg, dict) else {}


def config_file_with_key(args: list[str], key: str) -> str | None:
    """The last `--config` file of `args` that sets the dotted `key` (`model.loss.clip_hgh`), an
    `init_args:` level between its parts allowed, and a list's items searched (`trainer.callbacks.ratio`:
    a callback's init_args); None if none does."""
    for _, path in reversed(_config_paths(args)):
        if _sets(_file_top(path), key.split(".")):
            return path
    return None


def _sets(node, parts: list[str]) -> bool:
    """Whether the YAML `node` sets the key of `parts` (see `config_file_with_key`)."""
    if not parts:
        return True
    if isinstance(node, list):
        return any(_sets(item, parts) for item in node)
    if isinstance(node, dict) and parts[0] not in node and isinstance(node.get("init_args"), dict):
        node = node["init_args"]
    return isinstance(node, dict) and parts[0] in node and _sets(node[parts[0]], parts[1:])


def flag_as_given(args: list[str], key: str) -> str | None:
    """The last flag of `args` that sets the dotted `key` (`trainer.callbacks.ratio`), as typed:
    `--trainer.callbacks.init_args.ratio 0.1`, `--trainer.callbacks.ratio=0.1`; None if none does."""
    for i in reversed(range(len(args))):
        if _flag_key(args[i]) == key:
            return args[i] if "=" in args[i] or i + 1 == len(args) else f"{args[i]} {args[i + 1]}"
    return None


# LightningCLI's own top-level optimizer / scheduler: the module builds its own from model.*, and
# LightningCLI would build a top-level optimizer on the module's parameters before the policy is
# loaded, and ignore a top-level scheduler given alone. Their keys stay in the parser (null), as
# every run's saved config.yaml lists them.
_TOP_LEVEL = {"optimizer": "model.optimizer", "lr_scheduler": "model.lr_scheduler"}


def check_moved_keys(args: list[str]) -> None:
    """A flat key that moved into a settings group (`model.group_size` -> `model.rollout.group_size`),
    given in a `--config` file or on the command line, is refused with the new key named (before
    parsing, whose own message would only say the key is unknown)."""
    for index, path in _config_paths(args):
        top = _file_top(path)  # read once for both checks
        for key in _model_section(top):
            if (hint := moved_key_hint(key)) is not None:
                raise ValueError(f"{path}: {hint} (see the README's \"Moved keys\")")
        for key in sorted(k for k, v in top.items() if k in _TOP_LEVEL and v is not None):
            raise ValueError(f"{path}: top-level `{key}:` is not read by lit-covrl; put it under `{_TOP_LEVEL[key]}:`")
    for a in args:
        key = a.removeprefix("--").split("=", 1)[0].split(".")[0]
        if a.startswith("--") and key in _TOP_LEVEL:
            raise ValueError(f"--{key}: lit-covrl reads the {key.replace('_', ' ')} from --{_TOP_LEVEL[key]} "
                             f"(e.g. --{_TOP_LEVEL[key]} torch.optim.{'AdamW' if key == 'optimizer' else 'lr_scheduler.StepLR'})")
    for a in args:
        if a.startswith("--model."):
            key = a[len("--model."):].split("=", 1)[0].removeprefix("init_args.").split(".")[0]
            if (hint := moved_key_hint(key)) is not None:
                raise ValueError(f"--model.{key}: {hint} (see the README's \"Moved keys\")")


# keys typed `list[str] | None` (lit_covrl.settings.RolloutSettings, PromptDataModule)
STOP = "model.rollout.stop"
STRING_LIST_KEYS = (STOP, "data.train_files", "data.val_files")
_NULLS = ("null", "Null", "NULL", "~")


def _flag_key(arg: str) -> str:
    """`--model.init_args.rollout.stop+=x` -> `model.rollout.stop+` (the key as given, without
    init_args); "" for an argument that is not a `--` flag."""
    if not arg.startswith("--"):
        return ""
    return re.sub(r"\.init_args(?=\.)", "", arg.split("=", 1)[0][2:])


def _one_string(value: str, append: bool, stop: bool) -> str:
    """A string-list flag's value as jsonargparse should read it (see `one_string_lists`)."""
    if value.startswith("["):
        if stop:  # a file list `[a.jsonl]` means what it says; a stop string may mean its brackets
            _warn_bracketed(value)
        return value
    if not append and value in _NULLS:
        return value
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        try:
            quoted = yaml.safe_load(value)
        except yaml.YAMLError:
            quoted = None
        value = quoted if isinstance(quoted, str) else value
    return json.dumps([value])


def _warn_bracketed(value: str) -> None:
    """`[/INST]` is a YAML list of one string, `/INST`: a stop string meant to keep its brackets
    would silently lose them, so say how to write it."""
    try:
        items = yaml.safe_load(value)
    except yaml.YAMLError:
        return
    if isinstance(items, list) and len(items) == 1 and items[0] == value[1:-1]:
        log.warning("%s is read as a list of one string, %r; for the string %s itself write '[\"%s\"]'",
                    value, items[0], value, value)


def one_string_lists(args: list[str]) -> list[str]:
    """A value of a string-list key (STRING_LIST_KEYS: `model.rollout.stop`, `data.train_files`,
    `data.val_files`) given on the command line is one string unless it is a list literal:
    `--model.rollout.stop+=####` (or `+ ####`) appends "####", `--model.rollout.stop=####` (or
    ` ####`) sets ["####"]. jsonargparse reads such values as YAML, where `####` or `# Answer:`
    is a comment (null: the whole list was cleared, silently) and `~` is null. The rule:
    a value starting with `[` is a YAML list (`[END]` is ["END"]; `'["[END]"]'` is the string);
    after `=` or a space, `null` (or `~`) clears the list; a value in matching quotes is a YAML
    quoted string (`'"\n\n"'` is two newlines, `"####"` is ####); anything else is taken
    verbatim, `#`, `:` and spaces included."""
    out, i = [], 0
    while i < len(args):
        arg, key = args[i], _flag_key(args[i])
        name, append = key.removesuffix("+"), key.endswith("+")
        if name in STRING_LIST_KEYS and "=" in arg:
            out.append(f"{arg.split('=', 1)[0]}={_one_string(arg.split('=', 1)[1], append, name == STOP)}")
        elif name in STRING_LIST_KEYS and i + 1 < len(args) and not args[i + 1].startswith("-"):
            out += [arg, _one_string(args[i + 1], append, name == STOP)]
            i += 1
        else:
            out.append(arg)
        i += 1
    return out


# single-class keys of the model whose init_args belong to the class (the optimizer is not one:
# its `lr` carries over to another optimizer class, as in Lightning's CLI)
CLASS_KEYS = ("model.objective", "model.sampler")


def _class_of(value) -> str | None:
    """The class a value of a CLASS_KEYS key names: its class (path), "" for null, None for no
    class (init_args only). A flag's value may be a dict in YAML or JSON."""
    if isinstance(value, str) and value.startswith("{"):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            return None
    if value is None or value in _NULLS:
        return ""
    if isinstance(value, dict):
        value = value.get("class_path")
    return value if isinstance(value, str) else None


def _class_sources(args: list[str]) -> list[tuple[int, str, str, str]]:
    """(index of the argument to insert a reset before, key, class or "" for null, the config
    file naming it or "" for a flag) for each `--config` file or flag that names a class of a
    CLASS_KEYS key, in order."""
    out = []
    for index, path in _config_paths(args):
        start = index if args[index].startswith(_CONFIG_EQ) else index - 1  # `--config PATH`: at `--config`
        model = _file_model(path)
        fields = [(key, key.removeprefix("model.")) for key in CLASS_KEYS]
        out += [(start, key, _class_of(model[field]), path) for key, field in fields if field in model]
    for i, arg in enumerate(args):
        key = _flag_key(arg).removesuffix(".class_path")
        if key in CLASS_KEYS and ("=" in arg or i + 1 < len(args)):
            out.append((i, key, _class_of(arg.split("=", 1)[1] if "=" in arg else args[i + 1]), ""))
    return sorted(source for source in out if source[2] is not None)


def reset_switched_classes(args: list[str]) -> list[str]:
    """A `--config` file or flag that switches `model.objective` or `model.sampler` to another
    class (`--config gspo.yaml --model.objective CISPO`) starts that class from its own
    defaults: `--KEY=null` is put before it. jsonargparse would otherwise carry the earlier
    class's init_args over (CISPO with GSPO's clip range of 3e-4/4e-4). Two config files that
    name different objectives do not stack (one loss is trained): a warning names both. A flag
    naming a class given before a `--config` file that names another would be replaced by that
    file's (`--model.objective CISPO --config gspo.yaml` trains GSPO): it is refused, naming both,
    as `stack_config_callbacks` refuses a callbacks flag there."""
    current: dict[str, tuple[str, str, int]] = {}
    resets = []
    for index, key, cls, path in _class_sources(args):
        before, before_path, before_index = current.get(key, (None, "", -1))
        name, before_name = cls.rpartition(".")[2], (before or "").rpartition(".")[2]
        if path and before is not None and not before_path and before_name != name:
            raise ValueError(f"{args[before_index].split('=', 1)[0]} {before_name or 'null'}: given before "
                             f"--config {path}, whose {key} {name or 'null'} replaces it; put it after the last --config")
        if before and cls and before_name != name:
            resets.append((index, key))
            if key == "model.objective" and path:  # after another file (a flag before a file is refused above)
                log.warning("--config %s sets %s %s over --config %s's %s: objectives do not stack, only %s is "
                            "trained", path, key, name, before_path, before_name, name)
        current[key] = (cls, path, index)
    for index, key in sorted(resets, reverse=True):
        args = [*args[:index], f"--{key}=null", *args[index:]]
    return args


def stack_config_callbacks(args: list[str]) -> list[str]:
    """Make stacked method configs add up: `--config base.yaml --config clip_cov.yaml --config
    entropy_bonus.yaml` trains with every regularizer named in any of them. A YAML list in a later
    file would otherwise replace the earlier one (jsonargparse merges dicts, not lists). When two
    or more files set `trainer.callbacks`, their lists are concatenated in file order and passed
    once, right after the last `--config` that sets them, so later command-line arguments
    (`--trainer.callbacks+=...`, `--trainer.callbacks.ratio=...`) still apply on top. Such an
    argument given before a `--config` file that sets `trainer.callbacks` would be replaced by
    that file's list: it is refused, with the place to put it."""
    paths = _config_paths(args)
    setting = [(index, path, cbs) for index, path in paths if (cbs := _file_callbacks(path)) is not None]
    if setting:
        index, path, _ = setting[-1]
        early = next((a for a in args[:index] if _flag_key(a).startswith("trainer.callbacks")), None)
        if early is not None:
            raise ValueError(f"{early.split('=', 1)[0]}: given before --config {path}, whose trainer.callbacks "
                             "replace it; put it after the last --config")
    if len(setting) < 2:
        return args
    _check_added_twice([(path, cbs) for _, path, cbs in setting])
    merged = [cb for _, _, cbs in setting for cb in cbs]
    last = index  # not the last --config of all: a flag between it and a later file would be replaced
    # YAML, not JSON: JSON has no .inf / .nan (ClipCov's `ub: .inf`)
    flow = yaml.safe_dump(merged, default_flow_style=True, sort_keys=False, width=float("inf")).strip()
    return [*args[: last + 1], f"--trainer.callbacks={flow}", *args[last + 1 :]]


def _check_added_twice(files: list[tuple[str, list]]) -> None:
    """Two stacked files that add a callback of one class under one name (configs/cpu/archer.yaml
    and prorl.yaml each add a ReferenceKL): refused naming both files. `check_stack` refuses the
    two names later too, but named neither file, and its remedy (a second name) trains two KL
    penalties where the stack meant one."""
    seen: dict[tuple[str, object], str] = {}
    for path, callbacks in files:
        for cb in callbacks:
            spec = cb if isinstance(cb, dict) else {"class_path": cb}
            key = (str(spec.get("class_path")), (spec.get("init_args") or {}).get("name"))
            if key in seen and seen[key] != path:
                cls, name = key[0].rpartition(".")[2], f" named {key[1]!r}" if key[1] else ""
                raise ValueError(
                    f"--config {seen[key]} and --config {path} both add a {cls}{name}: stacked, the run would have "
                    f"two; keep the one you mean in a copy of one file (or give the other init_args.name to train both)")
            seen.setdefault(key, path)


def warn_replaced_loss_settings(args: list[str]) -> None:
    """Stacked method configs (the `--config` files after the first, the base) merge key by key, the
    later file's value winning: where two of them set one `model.loss` key to different values, one
    control's setting is replaced (configs/cpu/kl_cov.yaml's unclipped surrogate, `clip_high: null`,
    by steer.yaml's clip-higher 0.28; trajectory_gtpo.yaml's `advantage: drgrpo` by passk.yaml's
    passk). A warning names both files, the key and the value trained; a command-line flag is
    explicit and passes without a word."""
    seen: dict[str, tuple[str, object]] = {}
    for _, path in _config_paths(args)[1:]:
        loss = _model_section(_file_top(path)).get("loss")
        for key, value in (loss.items() if isinstance(loss, dict) else ()):
            if key in seen and seen[key][1] != value:
                log.warning("--config %s sets model.loss.%s=%r over --config %s's %r: the later file's value is trained "
                            "(stacked configs do not merge a setting; give the one you mean after the last --config)",
                            path, key, value, seen[key][0], seen[key][1])
            seen[key] = (path, value)


_MODEL_KEY = re.compile(r"\b(model(?:\.\w+)+)=")


def name_setting_sources(message: str, args: list[str]) -> str | None:
    """A start-up error's `message` with the `--config` file that set each model key it names
    (`model.loss.pass_k=4`), where two or more files set them: the refusal of two stacked configs
    (passk.yaml's pass_k beside trajectory_gtpo.yaml's advantage drgrpo; archer.yaml's dual_clip
    beside cispo.yaml's objective) then names both. None where fewer files did (one file, or
    flags: the user knows where to look)."""
    sources = {}
    for key in dict.fromkeys(_MODEL_KEY.findall(message)):
        if flag_as_given(args, key) is None and (path := config_file_with_key(args, key)) is not None:
            sources[key] = path
    if len(set(sources.values())) < 2:
        return None
    return f"{message} ({'; '.join(f'{key} from --config {path}' for key, path in sources.items())})"
