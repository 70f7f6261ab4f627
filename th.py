#!/usr/bin/env python
"""torch-handle command line: `python th.py COMMAND --help` (or `th COMMAND --help`) for each command.

    python th.py run recipes/single_translation.py [--field=value ...]
    python th.py bench [--model=gpt2 --n_layer=4 ... --against=module,hf --json]   # speed: docs/PERFORMANCE.md
    python th.py prepare --input=text.txt --out=data/x [--tokenizer=char|gpt2 --tokenizer_dir=DIR]   # or --task=translation
    python th.py generate RUN_DIR [--prompt="ROMEO:" --max_new_tokens=200 --temperature=0.8 --top_k=200]
    python th.py export RUN_DIR OUT_DIR [--format=hf]
    python th.py translate RUN_DIR [--input=file.txt --beam=5]   # or lines on stdin; translations on stdout
    python th.py eval RUN_DIR [--split=test --beam=5]            # BLEU / chrF of a translation run's checkpoint
"""
import os
import sys

import fire

from thcore.cli import guarded

ROOT = os.path.dirname(os.path.abspath(__file__))


def run(recipe: str, **overrides):
    """Train with RECIPE (a recipe file); every field of its Config can be overridden with --field=value
    (`th.py run RECIPE --help` lists them, grouped, with the recipe's defaults).

    recipe: a recipe file, e.g. recipes/single_translation.py (one of those listed below, or your own)
    """
    from thcore.launch import run as launch
    guarded(launch, recipe, overrides)


def bench(**kwargs):
    """Speed of our training step: ms/step, tokens/s, MFU and peak memory, against peers (--against=module,hf)."""
    from thcore.bench import main
    guarded(main, **kwargs)


def prepare(input: str = "", out: str = "", task: str = "lm", tokenizer: str = "", tokenizer_dir: str = "",
            val_fraction: float = 0.1, text_field: str = "text", data_dir: str = "", src_lang: str = "en",
            tgt_lang: str = "de", vocab_size: int = 8000, joint_vocab: bool = False, min_freq: int = 1,
            tokenizer_sample: int = 1_000_000, progress: bool = True):
    """Tokenize a corpus once, streaming in bounded memory: OUT/train.bin, val.bin and meta.json for the GPT
    recipes, or (--task=translation) token memmaps of every split for a run's --prepared=OUT.

    input: lm: a text file, a directory or a glob of files (.gz read too; .jsonl / .ndjson as JSON Lines)
    out: the output directory (token files, meta.json written last, tokenizer files)
    task: lm | translation
    tokenizer: lm: char (default) | gpt2 (GPT-2's BPE from --tokenizer_dir); translation: word (default) | bpe | unigram
    tokenizer_dir: a directory with GPT-2's vocab.json and merges.txt (tokenizer=gpt2)
    val_fraction: lm: the share kept for validation (the end of a single text, else documents evenly spread)
    text_field: lm: the field of a JSON Lines record that holds its text
    data_dir: translation: the directory of {train,valid,test}.{src_lang,tgt_lang}
    src_lang: translation: the source file suffix
    tgt_lang: translation: the target file suffix
    vocab_size: translation: bpe / unigram vocabulary size, per tokenizer
    joint_vocab: translation: one vocabulary trained on both sides
    min_freq: translation: word tokenizer: words seen fewer times become <unk>
    tokenizer_sample: translation: the tokenizer trains on at most this many pairs, evenly spread (0 = all)
    progress: a progress bar on stderr (MB/s, tokens)
    """
    from thcore.config import ConfigError

    def go():
        if not out:
            raise ConfigError("out: required (the directory to write)")
        if task == "lm":
            from thcore.data.lm import prepare as do_prepare
            if not input:
                raise ConfigError("input: required (a text file, a directory or a glob)")
            kind = tokenizer or "char"
            meta = do_prepare(str(input), str(out), kind, str(tokenizer_dir), float(val_fraction), str(text_field),
                              bool(progress))
            print(f"{out}: vocab {meta['vocab_size']} ({kind}, {meta['dtype']}), train {meta['train_tokens']:,} "
                  f"tokens, val {meta['val_tokens']:,} tokens", file=sys.stderr)
        elif task == "translation":
            from thcore.data.translation import prepare as do_prepare
            if not data_dir or not os.path.isdir(data_dir):
                raise ConfigError(f"data_dir={data_dir!r}: required with --task=translation (a directory of "
                                  "{train,valid,test}.{src_lang,tgt_lang})")
            kind = tokenizer or "word"
            if kind not in ("word", "bpe", "unigram"):
                raise ConfigError(f"tokenizer={kind!r}: must be one of 'word', 'bpe', 'unigram'")
            files = {split: tuple(os.path.join(data_dir, f"{split}.{lang}") for lang in (src_lang, tgt_lang))
                     for split in ("train", "valid", "test")}
            files = {k: v for k, v in files.items() if k == "train" or os.path.isfile(v[0]) or os.path.isfile(v[1])}
            meta = do_prepare(str(out), files, kind, int(vocab_size), bool(joint_vocab), int(min_freq),
                              int(tokenizer_sample), show_progress=bool(progress),
                              log=lambda msg: print(msg, file=sys.stderr))
            print(f"{out}: {kind} vocab src {meta['vocab']['src']} tgt {meta['vocab']['tgt']} ({meta['dtype']}) | "
                  + " | ".join(f"{k} {v['pairs']:,} pairs" for k, v in meta["splits"].items()), file=sys.stderr)
        else:
            raise ConfigError(f"task={task!r}: must be 'lm' or 'translation'")
    guarded(go)


def generate(path: str, prompt: str = "", max_new_tokens: int = 200, temperature: float = 0.8, top_k: int = 200,
             num_samples: int = 1, seed: int = 1337, checkpoint: str = "", tokenizer_dir: str = "",
             device: str = "auto"):
    """Sample text from a GPT with a KV cache; only the generated text goes to stdout.

    path: a GPT run directory, one of its checkpoint directories, or a Hugging Face GPT-2 directory
    prompt: the text to continue ('' = start from the end-of-text token)
    max_new_tokens: tokens to generate per sample
    temperature: softmax temperature; 0 = greedy
    top_k: sample among the k most likely tokens (0 = all)
    num_samples: independent samples, separated by a blank line
    seed: seed of the sampling
    checkpoint: '' or latest | best | a checkpoint directory
    tokenizer_dir: GPT-2's vocab.json / merges.txt, for a Hugging Face directory
    device: auto (a GPU if there is one) | cpu | cuda
    """
    from thcore.func import pick_device
    from thcore.generate import main
    # fire turns --prompt=123 into an int: a prompt is always text
    guarded(lambda: main(path, str(prompt), int(max_new_tokens), float(temperature), int(top_k), int(num_samples),
                         int(seed), str(checkpoint), str(tokenizer_dir), str(pick_device(str(device)))))


def export(run_dir: str, out_dir: str, format: str = "safetensors", checkpoint: str = ""):
    """Export a run's weights (the best checkpoint if one is recorded, else the latest).

    run_dir: the run directory
    out_dir: where to write the export
    format: safetensors (params under their pytree names + the run's config) | hf (transformers' layout)
    checkpoint: '' | latest | best | a checkpoint directory
    """
    from thcore.export import export as do_export

    def go():
        src = do_export(run_dir, out_dir, format, checkpoint)
        print(f"exported {src} to {out_dir} ({format})", file=sys.stderr)
    guarded(go)


def translate(run_dir: str, input: str = "", beam: int = 0, checkpoint: str = "", device: str = "auto",
              batch_size: int = 0):
    """Translate lines with a translation run's checkpoint; only the translations go to stdout, one per line.

    run_dir: the translation run directory
    input: a text file, one sentence per line ('' = read stdin)
    beam: beam size; 1 = greedy, 0 = the run's test_beam
    checkpoint: '' or latest | best | a checkpoint directory
    device: auto (a GPU if there is one) | cpu | cuda
    batch_size: sentences per decoding batch (0 = the run's eval_batch_size)
    """
    from thcore.translate import translate_main
    guarded(translate_main, run_dir, str(input), int(beam), str(checkpoint), str(device), int(batch_size))


def evaluate(run_dir: str, split: str = "test", beam: int = 0, checkpoint: str = "", device: str = "auto"):
    """Score a translation run's checkpoint on one split of its data: one JSON line (bleu, chrf, loss, ...).

    run_dir: the translation run directory
    split: train | valid | test
    beam: beam size; 1 = greedy, 0 = the run's test_beam (test) or eval_beam (valid)
    checkpoint: '' or latest | best | a checkpoint directory
    device: auto (a GPU if there is one) | cpu | cuda
    """
    from thcore.translate import eval_main
    guarded(eval_main, run_dir, str(split), int(beam), str(checkpoint), str(device))


COMMANDS = {"run": run, "bench": bench, "prepare": prepare, "generate": generate, "export": export,
            "translate": translate, "eval": evaluate}


def _help(prog: str, args: list[str]) -> str:
    from thcore import help as h
    words = [a for a in args if a not in h.HELP_FLAGS and a != "--"]
    if not words or words[0] not in COMMANDS:
        return h.top_help(prog, COMMANDS)
    command, rest = words[0], [w for w in words[1:] if not w.startswith("-")]
    if command == "run" and rest:
        from thcore.recipe import load
        mod = load(rest[0])
        return h.config_help(mod.Config, f"usage: {prog} run {rest[0]} [--field=value ...]\n\n"
                             f"Fields of {rest[0]} (--name=default  type  meaning):")
    if command == "run":
        return h.command_help(f"{prog} run", run) + "\n\nrecipes:\n" + h.recipes_list(ROOT)
    if command == "bench":
        from thcore.bench import BenchConfig
        return h.config_help(BenchConfig, f"usage: {prog} bench [--flag=value ...]\n\n"
                             f"{h._doc_lines(bench)[0]} (--flag=default  type  meaning):")
    return h.command_help(f"{prog} {command}", COMMANDS[command])


def main(argv=None, prog=None):
    """`th.py` and the `th` command: --help for every level, unknown flags as one line, fire for the rest."""
    from thcore import help as h
    argv = sys.argv[1:] if argv is None else list(argv)
    prog = prog or ("th" if os.path.basename(sys.argv[0]) == "th" else "python th.py")
    if not argv or any(a in h.HELP_FLAGS for a in argv):
        text = guarded(_help, prog, argv)
        try:
            print(text)
            sys.stdout.flush()
        except BrokenPipeError:   # `th.py run --help | head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return
    if argv[0] in COMMANDS and argv[0] not in ("run", "bench"):   # run: config fields; bench: BenchConfig
        guarded(h.check_flags, argv[0], COMMANDS[argv[0]], argv[1:])
    elif argv[0] not in COMMANDS:
        import difflib
        close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
        print(f"error: unknown command {argv[0]!r}{f' (did you mean {close[0]!r}?)' if close else ''}; commands: "
              f"{', '.join(COMMANDS)}", file=sys.stderr)
        sys.exit(2)
    fire.Fire(COMMANDS, command=argv, name=prog)


if __name__ == "__main__":
    main()
