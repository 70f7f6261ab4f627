"""Recipes: one Python file per experiment with an attrs `Config` class, `build(cfg) -> task`, and the
`launcher` it runs with ("single", "multinode", ...)."""
import importlib.util
import os
import sys

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
    spec.loader.exec_module(mod)
    for attr in ("Config", "build"):
        if not hasattr(mod, attr):
            raise ConfigError(f"recipe {path}: defines no `{attr}`")
    return mod


def configure(path: str, overrides: dict | None = None):
    """(config with `overrides` applied, recipe module). `name` defaults to the recipe's file name."""
    mod = load(path)
    values = {"name": os.path.splitext(os.path.basename(path))[0], **(overrides or {})}
    return from_dict(mod.Config, values), mod
