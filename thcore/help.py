"""`--help` of th.py and its subcommands, and their one-line errors for unknown flags.

A recipe's help lists every field of its Config, grouped by concern, with the recipe's default and the one-line
`help` declared next to the field (config.field); a subcommand's help reads the command function's signature
and the `name: meaning` lines of its docstring.
"""
import difflib
import inspect
import os

import attrs

from .config import GROUPS, ConfigError

HELP_FLAGS = ("-h", "--help")


def field_help(cls, name: str) -> tuple[str, str]:
    """(help, group) of field `name`, from the nearest class in the hierarchy that declares them (a recipe
    that re-declares a field to change its default keeps the base class's help)."""
    for klass in cls.__mro__:
        if attrs.has(klass):
            f = attrs.fields_dict(klass).get(name)
            if f is not None and f.metadata.get("help"):
                return f.metadata["help"], f.metadata.get("group", "")
    return "", ""


def _type_name(t) -> str:
    return getattr(t, "__name__", str(t))


def _default(f):
    if isinstance(f.default, attrs.Factory):
        return f.default.factory()
    return f.default


def config_help(cls, title: str) -> str:
    """Every field of `cls`, grouped by GROUPS: `--name=DEFAULT  type  meaning`."""
    rows = {g: [] for g in (*GROUPS, "other")}
    for f in attrs.fields(cls):
        text, group = field_help(cls, f.name)
        rows[group if group in rows else "other"].append((f"--{f.name}={_default(f)!r}", _type_name(f.type), text))
    width = max(len(r[0]) for g in rows.values() for r in g)
    out = [title]
    for group, items in rows.items():
        if items:
            out.append(f"\n{group}:")
            out += [f"  {flag:<{width}}  {typ:<5}  {text}" for flag, typ, text in items]
    return "\n".join(out)


def _doc_lines(fn) -> tuple[str, dict]:
    """(summary, {parameter: meaning}) from a docstring whose parameter lines read `name: meaning`."""
    summary, params = [], {}
    for line in inspect.getdoc(fn).splitlines():
        name, sep, text = line.strip().partition(": ")
        if sep and name.isidentifier() and name in inspect.signature(fn).parameters:
            params[name] = text
        elif not params:
            summary.append(line)
    return "\n".join(summary).strip(), params


def command_help(prog: str, fn) -> str:
    summary, meanings = _doc_lines(fn)
    sig = inspect.signature(fn)
    positional = [p.name.upper() for p in sig.parameters.values() if p.default is inspect.Parameter.empty
                  and p.kind is not p.VAR_KEYWORD]
    out = [f"usage: {prog} {' '.join(positional)} [--flag=value ...]".replace("  ", " "), "", summary, ""]
    rows = []
    for p in sig.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            continue
        flag = p.name.upper() if p.default is inspect.Parameter.empty else f"--{p.name}={p.default!r}"
        rows.append((flag, meanings.get(p.name, "")))
    width = max((len(r[0]) for r in rows), default=0)
    out += [f"  {flag:<{width}}  {text}" for flag, text in rows]
    return "\n".join(out)


def top_help(prog: str, commands: dict) -> str:
    width = max(map(len, commands))
    lines = [f"usage: {prog} COMMAND [ARGS] [--flag=value ...]    ({prog} COMMAND --help for one command)", ""]
    lines += [f"  {name:<{width}}  {_doc_lines(fn)[0].splitlines()[0]}" for name, fn in commands.items()]
    return "\n".join(lines)


def recipes_list(root: str) -> str:
    d = os.path.join(root, "recipes")
    names = sorted(f for f in os.listdir(d) if f.endswith(".py") and not f.startswith("_")) if os.path.isdir(d) else []
    out = []
    for name in names:
        with open(os.path.join(d, name), encoding="utf-8") as f:
            first = f.read(2000).split('"""')
        out.append((f"recipes/{name}", first[1].strip().splitlines()[0] if len(first) > 2 else ""))
    width = max((len(r[0]) for r in out), default=0)
    return "\n".join(f"  {path:<{width}}  {text}" for path, text in out)


def _flag_names(args: list[str]) -> list[str]:
    """The names of `--name=value` / `--name value` flags (fire also takes dashes for underscores)."""
    names = []
    for a in args:
        if a.startswith("--") and len(a) > 2:
            names.append(a[2:].split("=", 1)[0].replace("-", "_"))
    return names


def check_flags(command: str, fn, args: list[str], valid=None):
    """One ConfigError line for the first flag `fn` does not take (naming the closest one), or for extra
    positional arguments."""
    sig = inspect.signature(fn)
    valid = list(valid) if valid is not None else [n for n, p in sig.parameters.items() if p.kind is not p.VAR_KEYWORD]
    for name in _flag_names(args):
        if name not in valid:
            close = difflib.get_close_matches(name, valid, n=1)
            hint = f" (did you mean --{close[0]}?)" if close else ""
            raise ConfigError(f"th.py {command}: unknown flag --{name}{hint}; see th.py {command} --help")
    positional = [a for i, a in enumerate(args) if not a.startswith("--")
                  and not (i and args[i - 1].startswith("--") and "=" not in args[i - 1])]
    n_pos = len([p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.POSITIONAL_ONLY)])
    if len(positional) > n_pos:
        raise ConfigError(f"th.py {command}: unexpected argument {positional[n_pos]!r}; see th.py {command} --help")
