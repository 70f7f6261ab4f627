"""The command line a new user meets first: --help at every level (nothing is created or started), one-line
errors for unknown commands and flags, and the `th` console script."""
import os
import subprocess
import sys

import pytest

from helpers import ROOT, th

HELP_FORMS = (["--help"], ["-h"], ["--", "--help"])


def cli(*args, cwd):
    """`th.py ARGS` in this process (th.main): (exit status, stdout, stderr). The subprocess tests below cover
    the real entry points."""
    import contextlib
    import io
    import th as th_module
    out, err, old = io.StringIO(), io.StringIO(), os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            th_module.main([str(a) for a in args], prog="python th.py")
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        os.chdir(old)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("form", HELP_FORMS)
def test_recipe_help_lists_every_field_grouped_and_starts_nothing(tmp_path, form):
    out_dir = tmp_path / "run"
    recipe = os.path.join(ROOT, "recipes", "single_translation.py")
    if form[0] == "--":   # fire's own separator: through the real command line
        p = th("run", recipe, f"--out_dir={out_dir}", *form, cwd=tmp_path)
        code, text, err = p.returncode, p.stdout, p.stderr
    else:
        code, text, err = cli("run", recipe, f"--out_dir={out_dir}", *form, cwd=tmp_path)
    assert code == 0
    # the recipe's default (128, not the base class's 512) and the meaning declared next to the field
    assert "--d_model=128" in text and "model width" in text
    assert "--lr=0.001" in text and "peak learning rate" in text
    for group in ("model:", "data:", "optimisation:", "precision/speed:", "engine/distribution:",
                  "checkpoints/faults:", "logging/eval:", "research probes:"):
        assert f"\n{group}\n" in text
    assert text.index("--d_model=") < text.index("\ndata:") < text.index("--max_tokens=")   # d_model is a model field
    assert not out_dir.exists() and not (tmp_path / "runs").exists()
    assert err == ""


def test_top_and_run_help_list_the_commands_and_recipes(tmp_path):
    top = th("--help", cwd=tmp_path).stdout
    for command in ("run", "bench", "prepare", "generate", "export", "translate", "eval"):
        assert f"\n  {command} " in top
    assert cli(cwd=tmp_path) == (0, top, "")   # no command at all: the same overview, exit 0
    code, run, _ = cli("run", "--help", cwd=tmp_path)
    assert code == 0
    assert "recipes/single_translation.py" in run and "recipes/gpt2_xl_zero2.py" in run
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("command,flag,meaning", [("translate", "--beam=0", "beam size"),
                                                  ("eval", "--split='test'", "train | valid | test"),
                                                  ("generate", "--temperature=0.8", "softmax temperature"),
                                                  ("prepare", "--tokenizer=", "GPT-2"),
                                                  ("export", "--format='safetensors'", "transformers")])
def test_subcommand_help(tmp_path, command, flag, meaning):
    code, out, _ = cli(command, "--help", cwd=tmp_path)
    assert code == 0 and flag in out and meaning in out
    assert os.listdir(tmp_path) == []


def test_bench_help_lists_its_flags_with_defaults_and_meaning(tmp_path):
    code, out, _ = cli("bench", "--help", cwd=tmp_path)
    assert code == 0 and "--n_layer=" in out and "--against=" in out and "--steps=" in out
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("args,expect", [
    (["bench", "--stesp=3"], "did you mean"),
    (["translate", "runs/x", "--bem=3"], "unknown flag --bem (did you mean --beam?)"),
    (["eval", "runs/x", "--splt=test"], "unknown flag --splt (did you mean --split?)"),
    (["generate", "runs/x", "--temprature=0"], "unknown flag --temprature (did you mean --temperature?)"),
    (["export", "a", "b", "--formt=hf"], "unknown flag --formt (did you mean --format?)"),
    (["prepare", "--inptu=x", "--out=y"], "unknown flag --inptu (did you mean --input?)"),
    (["trian"], "unknown command 'trian'"),
    (["run", "recipes/single_translation.py", "--d_modle=3"], "did you mean 'd_model'"),
])
def test_unknown_flags_are_one_line(tmp_path, args, expect):
    code, out, err = cli(*args, cwd=ROOT)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], err
    assert "Traceback" not in out + err


def test_an_unknown_flag_from_the_shell_is_one_line_too():
    p = th("translate", "runs/x", "--bem=3", check=False)
    assert p.returncode == 2 and p.stderr == "error: th.py translate: unknown flag --bem (did you mean --beam?); " \
                                             "see th.py translate --help\n"


def test_th_console_script_is_python_th_py(tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "th")
    if not os.path.exists(exe):
        pytest.skip("the package is not installed in this environment (pip install -e .)")
    p = subprocess.run([exe, "translate", "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert p.returncode == 0 and p.stdout.startswith("usage: th translate RUN_DIR")
    assert p.stdout.split("\n", 1)[1] == th("translate", "--help", cwd=tmp_path).stdout.split("\n", 1)[1]
