#!/usr/bin/env python
"""torch-handle command line (fire).

    python th.py run recipes/single_translation.py [--field=value ...]
    python th.py bench [--model=gpt2 --n_layer=4 ... --against=module,hf --json]   # speed: docs/PERFORMANCE.md
    python th.py prepare --input=text.txt --out=data/x [--tokenizer=char|gpt2 --tokenizer_dir=DIR]
    python th.py generate RUN_DIR [--prompt="ROMEO:" --max_new_tokens=200 --temperature=0.8 --top_k=200]
    python th.py export RUN_DIR OUT_DIR [--format=hf]
    python th.py translate RUN_DIR [--input=file.txt --beam=5]   # or lines on stdin; translations on stdout
    python th.py eval RUN_DIR [--split=test --beam=5]            # BLEU / chrF of a translation run's checkpoint
"""
import fire

from thcore.cli import guarded


def run(recipe: str, **overrides):
    """Train with RECIPE; any config field can be overridden with --field=value."""
    from thcore.recipe import configure

    def go():
        cfg, mod = configure(recipe, overrides)
        launcher = getattr(mod, "launcher", "single")
        if launcher == "single" and cfg.engine == "eager" and not cfg.max_restarts:
            from launchers.single import main
            return main(cfg, mod.build)
        from launchers.spawn import nproc, spawn   # ddp / deepspeed: start one process per device under torchrun
        if cfg.engine == "deepspeed":   # a missing DeepSpeed or a contradicting ds_config: one line, before torchrun
            from thcore.engines.deepspeed import check
            check(cfg, nproc(cfg, overrides))
        return spawn(recipe, cfg, overrides)
    guarded(go)


def bench(**kwargs):
    """ms/step, tokens/s, MFU and peak memory of our step, against peers (--against=module,hf) in one process."""
    from thcore.bench import main
    guarded(main, **kwargs)


def prepare(input: str, out: str, tokenizer: str = "char", tokenizer_dir: str = "", val_fraction: float = 0.1):
    """Tokenize a text file into OUT/train.bin, val.bin (uint16) and meta.json for the GPT recipes."""
    import sys

    from thcore.data.lm import prepare as do_prepare

    def go():
        meta = do_prepare(input, out, tokenizer, tokenizer_dir, val_fraction)
        print(f"{out}: vocab {meta['vocab_size']} ({tokenizer}), train {meta['train_tokens']:,} tokens, "
              f"val {meta['val_tokens']:,} tokens", file=sys.stderr)
    guarded(go)


def generate(path: str, prompt: str = "", max_new_tokens: int = 200, temperature: float = 0.8, top_k: int = 200,
             num_samples: int = 1, seed: int = 1337, checkpoint: str = "", tokenizer_dir: str = "",
             device: str = "cpu"):
    """Sample from a GPT run dir (or one of its checkpoint dirs, or a Hugging Face GPT-2 dir with
    --tokenizer_dir) with a KV cache; --temperature=0 is greedy. Only the generated text goes to stdout."""
    from thcore.generate import main
    # fire turns --prompt=123 into an int: a prompt is always text
    guarded(main, path, str(prompt), int(max_new_tokens), float(temperature), int(top_k), int(num_samples),
            int(seed), str(checkpoint), str(tokenizer_dir), str(device))


def export(run_dir: str, out_dir: str, format: str = "safetensors", checkpoint: str = ""):
    """Export a run's weights (best checkpoint if recorded, else latest; or --checkpoint=PATH|best|latest):
    --format=safetensors (params under their pytree names + the run's config) or --format=hf (a directory
    transformers.GPT2LMHeadModel.from_pretrained loads)."""
    import sys

    from thcore.export import export as do_export

    def go():
        src = do_export(run_dir, out_dir, format, checkpoint)
        print(f"exported {src} to {out_dir} ({format})", file=sys.stderr)
    guarded(go)


def translate(run_dir: str, input: str = "", beam: int = 0, checkpoint: str = "", device: str = "cpu",
              batch_size: int = 0):
    """Translate the lines of --input (or stdin) with a translation run's latest checkpoint (--checkpoint=best
    or a checkpoint dir for another); --beam=1 is greedy, 0 the run's test_beam. Only translations go to stdout."""
    from thcore.translate import translate_main
    guarded(translate_main, run_dir, str(input), int(beam), str(checkpoint), str(device), int(batch_size))


def evaluate(run_dir: str, split: str = "test", beam: int = 0, checkpoint: str = "", device: str = "cpu"):
    """BLEU, chrF (sacrebleu, detokenized), loss and exact match of a translation run's checkpoint on one split
    of its data, as one JSON line on stdout; --beam=0 is the run's test_beam (test) or eval_beam (valid)."""
    from thcore.translate import eval_main
    guarded(eval_main, run_dir, str(split), int(beam), str(checkpoint), str(device))


if __name__ == "__main__":
    fire.Fire({"run": run, "bench": bench, "prepare": prepare, "generate": generate, "export": export,
               "translate": translate, "eval": evaluate})
