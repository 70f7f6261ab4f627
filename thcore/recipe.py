"""Recipes: one Python file per experiment with an attrs `Config` class and `build(cfg) -> task`. How a recipe
runs (here or under torchrun) follows from its config: thcore/launch.py."""
import importlib.util
import os
import sys
import traceback

from .config import ConfigError, from_dict


def load(path: str):
    """Import a recipe file as a module (each path once per process)."""
    if not os.path.isfile(path):
        raise ConfigError(f"recipe: file not found: {path}")
    name = f"threcipe_{os.path.splitext(os.path.basename(path))[0]}"
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == os.path.abspath(path):
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, os.path.abspath(path))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except ConfigError:   # a recipe that loads another recipe: that one's line already names its file
        del sys.modules[name]
        raise
    except Exception as e:   # a syntax error, an import error, any failure of the file's own code
        del sys.modules[name]
        raise ConfigError(_failure(path, e)) from None
    for attr in ("Config", "build"):
        if not hasattr(mod, attr):
            raise ConfigError(f"recipe {path}: defines no `{attr}`")
    return mod


def _failure(path: str, e: Exception) -> str:
    """One line for a recipe file that cannot be imported, naming the file and line."""
    if isinstance(e, SyntaxError):
        return f"recipe {e.filename or path}:{e.lineno}: {e.msg}"
    where = path
    for frame in reversed(traceback.extract_tb(e.__traceback__)):   # the innermost line of a recipe file
        if os.path.abspath(frame.filename) == os.path.abspath(path):
            where = f"{path}:{frame.lineno}"
            break
    return f"recipe {where}: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


def configure(path: str, overrides: dict | None = None):
    """(config with `overrides` applied, recipe module). `name` defaults to the recipe's file name."""
    mod = load(path)
    values = {"name": os.path.splitext(os.path.basename(path))[0], **(overrides or {})}
    return from_dict(mod.Config, values), mod
