"""What a fresh install needs and what the configs promise: every third-party import is declared in setup.py,
and every config field reaches code that uses it."""
import ast
import os
import re
import sys
from importlib.metadata import packages_distributions

import attrs
import pytest

from helpers import ROOT

SOURCES = [os.path.join(d, f) for top in ("thcore", "launchers") for d, _, fs in os.walk(os.path.join(ROOT, top))
           for f in fs if f.endswith(".py")] + [os.path.join(ROOT, "th.py")]
LOCAL = {"thcore", "launchers", "recipes", "th", "tests", "conftest"}


def _declared() -> dict[str, str]:
    """{distribution: 'core' or the extra's name}, read from setup.py's install_requires and extras_require."""
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    kw = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in ("install_requires", "extras_require")}
    name = lambda req: re.split(r"[<>=!~\[; ]", req)[0].lower().replace("_", "-")  # noqa: E731
    out = {name(r): "core" for r in kw["install_requires"]}
    for extra, reqs in kw["extras_require"].items():
        for r in reqs:
            out.setdefault(name(r), extra)
    return out


def _imports(path: str) -> set[str]:
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    out = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            out |= {a.name.split(".")[0] for a in n.names}
        elif isinstance(n, ast.ImportFrom) and n.module and not n.level:
            out.add(n.module.split(".")[0])
    return out


def test_every_third_party_import_is_declared_in_setup_py():
    declared, dists = _declared(), packages_distributions()
    missing = []
    for path in SOURCES:
        for top in sorted(_imports(path) - LOCAL - set(sys.stdlib_module_names)):
            names = {d.lower().replace("_", "-") for d in dists.get(top, [top])}
            if not names & set(declared):
                missing.append(f"{os.path.relpath(path, ROOT)}: import {top}")
    assert not missing, "imported but not declared in setup.py: " + "; ".join(missing)


def test_the_dependency_check_sees_an_undeclared_import(tmp_path):
    """The check above must be able to fail: an import of a module no distribution declares is found."""
    f = tmp_path / "m.py"
    f.write_text("import os\nimport yaml_not_declared\nfrom thcore import config\n")
    assert _imports(str(f)) - LOCAL - set(sys.stdlib_module_names) == {"yaml_not_declared"}


def _config_classes():
    from thcore.config import Config
    from thcore.tasks.lm import LMConfig
    from thcore.tasks.translation import TranslationConfig
    return Config, TranslationConfig, LMConfig


def _reads() -> list[re.Pattern]:
    """Attribute names read anywhere outside config.py, and the names handed to getattr (an f-string such as
    f"{split}_src" stands for every name it can form)."""
    out = set()
    for path in SOURCES:
        if os.path.basename(path) == "config.py":
            continue
        for n in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Load):
                out.add(re.escape(n.attr))
            elif isinstance(n, ast.Call) and getattr(n.func, "id", "") == "getattr" and len(n.args) > 1:
                name = n.args[1]
                if isinstance(name, ast.Constant):
                    out.add(re.escape(name.value))
                elif isinstance(name, ast.JoinedStr) and \
                        sum(len(v.value) for v in name.values if isinstance(v, ast.Constant)) >= 3:   # not f"{a}_{b}"
                    out.add("".join(re.escape(v.value) if isinstance(v, ast.Constant) else r"\w+" for v in name.values))
    return [re.compile(p) for p in out]


def test_every_config_field_is_read_outside_config_py():
    reads = _reads()
    fields = {f.name for cls in _config_classes() for f in attrs.fields(cls)}
    assert sorted(f for f in fields if not any(p.fullmatch(f) for p in reads)) == []
    assert not any(p.fullmatch("a_field_nobody_reads") for p in reads)   # the check can fail


@pytest.mark.parametrize("recipe", sorted(f for f in os.listdir(os.path.join(ROOT, "recipes"))
                                           if f.endswith(".py") and not f.startswith("_")))
def test_every_field_of_every_recipe_has_help_and_a_group(recipe):
    from thcore.config import GROUPS
    from thcore.help import field_help
    import importlib
    cls = importlib.import_module(f"recipes.{recipe[:-3]}").Config
    bare = [f.name for f in attrs.fields(cls) if not field_help(cls, f.name)[0] or field_help(cls, f.name)[1] not in GROUPS]
    assert bare == []
