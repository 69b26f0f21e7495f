"""What a run keeps on disk, read and written safely: typed YAML configs (`load_dataclass`, every bad value
named with its file and fix), atomic file writes, and the check that saved weights fit a module
(`state_mismatch`). No model code: every other module may import this one."""
from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml


# ----------------------------------------------------------------------------------------------
# Files written atomically (checkpoints and run folders are loop.py's).

def make_folder(path: str | os.PathLike, what: str) -> Path:
    """Create the folder `path` (and its parents) for `what` (say "output_dir"), or say in one message why not."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # the path, or a folder above it, is a file
        blocker = next(p for p in [path, *path.parents] if p.exists() and not p.is_dir())
        raise FileExistsError(f"{what} {path} cannot be a folder: {blocker} is a file; choose another "
                              f"{what}") from None
    except PermissionError as err:
        raise PermissionError(f"{what} {path} cannot be created: no permission to write {err.filename}; choose a "
                              f"folder you can write to as {what}") from None
    return path


# the errors of a refused write: permissions, an immutable flag (chattr +i), a read-only mount
READ_ONLY_ERRORS = (errno.EACCES, errno.EPERM, errno.EROFS)


def check_writable(folder: Path, what: str, fix: str):
    """Refuse, in one message naming `folder` and `fix`, a folder nothing can be written in (its permissions, a
    read-only mount, an immutable flag), before a command starts writing there and stops half-way."""
    probe = folder / f".write-check.tmp{os.getpid()}"  # a leftover's name is one a run folder sweeps
    try:
        probe.touch()
        probe.unlink()
    except OSError as err:
        if err.errno not in READ_ONLY_ERRORS:
            raise
        raise PermissionError(f"{folder} ({what}) is read-only ({err.strerror}): nothing in it was written or "
                              f"changed. {fix}") from None


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call write(tmp_path) then rename tmp_path to path (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:  # on disk before the rename, so a power loss cannot leave an empty file
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ----------------------------------------------------------------------------------------------
# Configs as data: a YAML file per setting, read into a dataclass; command-line and notebook
# overrides name nested fields with a dot ("model.n_shared", "source.k", "encoders.vision").

class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last one silently), and
    reading plain scalars as YAML 1.2 does where PyYAML's YAML 1.1 reads what nobody meant: `seed: 010` is 10 (1.1:
    octal 8), `epochs: 1:30` the string '1:30' (1.1: 90, base 60), `log_name: no` the string 'no' (1.1: false),
    `log_name: 2024-01-01` the string as typed (1.1: a date; 1.2 has no timestamps); `_coerce` still takes
    yes/no/on/off for a true-or-false key, where both versions agree."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: its keys may be given again here
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice: keep one",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _yaml12_int(loader, node) -> int:
    text = loader.construct_scalar(node)
    return int(text, 0) if text.startswith(("0o", "0x")) else int(text)  # int("010") is 10


_BOOL, _INT, _FLOAT, _TIMESTAMP = (f"tag:yaml.org,2002:{kind}" for kind in ("bool", "int", "float", "timestamp"))
UniqueKeyLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag not in (_BOOL, _INT, _FLOAT, _TIMESTAMP)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _tag, _pattern, _first in (
        (_BOOL, r"true|True|TRUE|false|False|FALSE", "tTfF"),
        (_INT, r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+", "-+0123456789"),
        (_FLOAT, r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?|[-+]?\.(inf|Inf|INF)|\.(nan|NaN|NAN)",
         "-+.0123456789")):
    UniqueKeyLoader.add_implicit_resolver(_tag, re.compile(rf"^(?:{_pattern})$"), list(_first))
UniqueKeyLoader.add_constructor(_INT, _yaml12_int)


def load_dataclass(cls, path: str | os.PathLike, overrides: dict):
    """`cls` built from a YAML file with `overrides` applied: "section.field" keys reach into any nested
    section, a nested dataclass ("model.n_shared") or a mapping ("encoders.vision"). Every value is checked
    against its field's type and coerced where YAML is ambiguous (PyYAML reads `1e-3` as a string), and every
    error names the key, the value, where it came from (the file or an override) and what to write instead."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} {'is a folder, not a YAML file' if path.is_dir() else 'not found'}; "
                                "see configs/ for the shipped ones")
    try:
        values = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader) or {}
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err}); save it as UTF-8") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ValueError(f"{path} is not valid YAML{where}: {getattr(err, 'problem', None) or err}; fix that line "
                         "(YAML is `key: value`, nested keys indented by two spaces)") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold `key: value` lines, got a {type(values).__name__}")
    origin = {key: f"in {path}" for key in _dotted(values, cls)}
    for key, value in overrides.items():
        _set_dotted(values, cls, key, value)
        origin[key] = "given as an override"
    try:
        return _build(cls, values, "", origin)
    except ConfigError:
        raise
    except ValueError as err:  # a dataclass's own check: say which config it came from
        raise ValueError(f"{err} [config {path}{f', overrides {overrides}' if overrides else ''}]") from None


def _section(cls, name: str):
    """The nested dataclass or mapping type of field `name` of `cls` (None: a plain value or no such field)."""
    hint = typing.get_type_hints(cls).get(name) if dataclasses.is_dataclass(cls) else None
    if dataclasses.is_dataclass(hint) or (typing.get_origin(hint) or hint) is dict:
        return hint
    return None


def _dotted(values: dict, cls, prefix: str = "") -> list[str]:
    """Every key of `values` as the dotted name an override would give it ("model.n_shared", "encoders.vision")."""
    keys = []
    for key, value in values.items():
        keys.append(prefix + key)
        if isinstance(value, dict) and _section(cls, key) is not None:
            keys += _dotted(value, _section(cls, key), f"{prefix}{key}.")
    return keys


def _set_dotted(values: dict, cls, key: str, value, where: str = ""):
    """values[a][b]... = value for key "a.b...", each section copied from the YAML or, where the YAML does not
    give it, from the field's default (so `encoders.vision=X` keeps the default touch and text encoders).
    `cls`: the dataclass `values` is read into, or dict for the inside of a mapping."""
    name, dot, rest = key.partition(".")
    section = dict if cls is dict else _section(cls, name)
    if not dot or section is None:  # a plain field, or an unknown key that _build names
        values[key] = value
        return
    current = values.get(name)
    if current is None and cls is not dict:
        default = {f.name: f for f in dataclasses.fields(cls)}[name]
        current = {} if dataclasses.is_dataclass(section) else (
            default.default_factory() if default.default_factory is not dataclasses.MISSING else {})
    if not isinstance(current, dict):
        raise ConfigError(f"{where}{name} is {current!r}, not a mapping, so {where}{key} cannot be set inside it; "
                          f"set {where}{name} whole, e.g. --set '{where}{name}={{name: {current}, weights: FILE}}'")
    values[name] = dict(current)
    _set_dotted(values[name], section if dataclasses.is_dataclass(section) else dict, rest, value, f"{where}{name}.")


class ConfigError(ValueError):
    """A config value of the wrong kind or an unknown key; the message already says where it came from."""


def _build(cls, values: dict, prefix: str, origin: dict):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        where = sorted({origin.get(prefix + k, "") for k in unknown})
        raise ConfigError(f"unknown {prefix[:-1] or 'config'} keys {unknown} {', '.join(where)}; "
                          f"known: {sorted(known)}")
    typed = {}
    for key, value in values.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            typed[key] = _build(hint, value or {}, f"{key}.", origin) if isinstance(value, dict) else value
        else:
            typed[key] = _coerce(value, hint, prefix + key, origin.get(prefix + key, ""))
    return cls(**typed)


YAML11_BOOLS = {"yes": True, "on": True, "no": False, "off": False}  # YAML 1.1's words for true and false


def _coerce(value, hint, key: str, where: str):
    """`value` as the type `hint` asks for, or a ValueError that says what to write."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is not type(None):
                try:
                    return _coerce(value, option, key, where)
                except ConfigError as err:
                    errors.append(err)
        raise errors[0]
    if typing.get_origin(hint) is tuple and isinstance(value, (list, tuple)):
        return tuple(_coerce(v, typing.get_args(hint)[0], key, where) for v in value)
    kind = typing.get_origin(hint) or hint
    if kind is bool and isinstance(value, bool):
        return value
    if kind is bool and isinstance(value, str) and value.lower() in YAML11_BOOLS:
        return YAML11_BOOLS[value.lower()]
    if kind in (int, float) and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            number = float(value)  # "1e-3" (a string to PyYAML) is a number; "abc" is not
        except ValueError:
            number = None
        if number is not None and (kind is float or number.is_integer()):
            return kind(number)
    if kind in (str, dict, list) and isinstance(value, kind):
        return value
    expected = {bool: "true or false", int: "an integer", float: "a number", str: "a string", tuple: "a list",
                dict: "a mapping", list: "a list"}.get(kind, str(hint))
    raise ConfigError(f"{key} must be {expected}, got {value!r} {where}; e.g. {key}: "
                     f"{ {bool: 'true', int: '64', float: '0.001', str: 'name', tuple: '[a, b]'}.get(kind, '...') }")


# ----------------------------------------------------------------------------------------------
# The command-line grammar of both phases (train.py, llm_integration.py): flags named after config keys (the
# seeds' names among them), and `--set KEY=VALUE` for any key, dotted into any nested section

class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every flag's default after its help."""


@dataclass(frozen=True)
class Flag:
    key: str  # the config key it sets
    kind: type
    help: str
    choices: tuple = ()  # shown in --help; the config itself refuses other values, naming them


def add_config_flags(parser: argparse.ArgumentParser, flags: dict[str, Flag], defaults, config_file: str):
    """A flag per entry of `flags`, its help ending in the key it sets, its default in `defaults` (the config
    `config_file` gives) and its choices; then `--set`. Unset flags are absent from the parsed args."""
    for name, flag in flags.items():
        default = defaults
        for part in flag.key.split("."):
            default = getattr(default, part)
        choices = f"; one of {', '.join(map(str, flag.choices))}" if flag.choices else ""
        text = f"{flag.help} (config key {flag.key}; default {default!r} from {config_file}{choices})"
        parser.add_argument(f"--{name}", type=flag.kind, default=argparse.SUPPRESS, metavar=flag.kind.__name__.upper(),
                            help=text.replace("%", "%%"))
    sections = [f.name for f in dataclasses.fields(defaults) if _section(type(defaults), f.name) is not None]
    parser.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                        help=f"any config key, the value in YAML syntax; nested keys with a dot into "
                             f"{', '.join(sections)} (e.g. {sections[0]}.{_first_key(defaults, sections[0])}=...); "
                             "may be repeated")


def _first_key(defaults, section: str) -> str:
    value = getattr(defaults, section)
    return next(iter(value)) if isinstance(value, dict) else dataclasses.fields(value)[0].name


def shipped_or_given(path: Path, root: Path = Path(__file__).resolve().parent) -> Path:
    """A --config path as given, or under the project folder when only there (configs/fluxtalk.yaml from anywhere)."""
    return root / path if not path.is_file() and (root / path).is_file() else path


def config_overrides(args: argparse.Namespace, flags: dict[str, Flag]) -> dict:
    """{config key: value} from the flags given and every --set KEY=VALUE; a key given twice is refused."""
    overrides, given = {}, {}
    for name, flag in flags.items():
        if hasattr(args, name):
            if flag.key in overrides:
                raise SystemExit(f"--{given[flag.key]} and --{name} both set {flag.key} ({overrides[flag.key]!r} and "
                                 f"{getattr(args, name)!r}): keep one")
            overrides[flag.key], given[flag.key] = getattr(args, name), name
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}; e.g. --set model.n_shared=4")
        if key in overrides:
            raise SystemExit(f"--set {key} is given twice ({overrides[key]!r} and {value!r}) or also by its own "
                             "flag: keep one")
        try:
            overrides[key] = yaml.load(value, Loader=UniqueKeyLoader)  # as the config files are read
        except yaml.YAMLError as err:  # a tag such as !!python/object, or unbalanced brackets
            raise SystemExit(f"--set {item!r}: the value is not plain YAML ({str(err).splitlines()[0]}); give a "
                             "number, a string, a list [a, b] or a mapping {k: v}") from None
    return overrides


# ----------------------------------------------------------------------------------------------
# Saved weights against a module

def state_mismatch(own: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> str | None:
    """What keeps `given` from loading exactly into a module whose state is `own` (None: it fits). Unexpected
    tensors count as much as missing ones: a bigger model's weights must not load partly into a smaller one."""
    wrong = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in given.items()
             if k in own and own[k].shape != v.shape]
    missing, unexpected = sorted(set(own) - set(given)), sorted(set(given) - set(own))
    if not (wrong or missing or unexpected):
        return None
    return (f"{len(wrong)} shape mismatches {wrong[:3]}, {len(missing)} missing tensors {missing[:3]}, "
            f"{len(unexpected)} unexpected tensors {unexpected[:3]}")
