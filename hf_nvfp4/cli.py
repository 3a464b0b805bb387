"""Command line: ``hf-nvfp4 train RECIPE [--resume | --overwrite]``, ``eval``, ``compare``, ``ablate``, ``export``,
``recipes``.

Every command imports what it needs inside its function: ``--help``, ``recipes`` and argument
errors load neither torch nor transformers (tests/test_package.py checks it).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _train(args) -> int:
    name = args.recipe_opt or args.recipe
    if name is None:  # before any heavy import: argument errors come back at once
        args.parser.print_usage(sys.stderr)
        print(
            "hf-nvfp4 train: give a recipe, a shipped name (list them with: hf-nvfp4 recipes) or a YAML path, "
            "e.g. hf-nvfp4 train tiny-cpu",
            file=sys.stderr,
        )
        return 2
    from .recipe import load_recipe
    from .rundir import prepare_output_dir
    from .train import run_recipe

    overrides = list(args.set or [])
    if args.max_steps is not None:
        overrides.append(f"training.max_steps={args.max_steps}")
    if args.output_dir is not None:
        overrides.append(f"output_dir={args.output_dir}")
    recipe = load_recipe(name, overrides)
    ckpt = prepare_output_dir(recipe.output_dir, resume=args.resume, overwrite=args.overwrite)
    run_recipe(recipe, resume_from_checkpoint=ckpt)
    return 0


def _recipes(args) -> int:
    from .recipe import RECIPE_DIR

    for p in sorted(RECIPE_DIR.glob("*.yaml")):
        first = next((ln[1:].strip() for ln in p.read_text().splitlines() if ln.startswith("#")), "")
        print(f"{p.stem:24s} {first}")
    return 0


def _no_matplotlib(cmd: str) -> bool:
    """True (after saying so) when matplotlib is missing: checked before any computing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(f"hf-nvfp4 {cmd}: needs matplotlib: pip install 'hf-nvfp4[plots]'", file=sys.stderr)
        return True
    return False


def _plot(args) -> int:
    if _no_matplotlib("plot-parity"):
        return 2
    from .science.plots import plot_loss_parity

    out = plot_loss_parity(args.run, args.out, tag=args.tag)
    print(f"hf-nvfp4: wrote {out}")
    return 0


def _eval(args) -> int:
    from .evaluation import evaluate_checkpoint, format_table

    out = args.out or str(Path(args.model_dir) / f"eval_{args.precision or 'as-trained'}.json")
    s = evaluate_checkpoint(
        args.model_dir,
        args.tasks,
        include_path=args.include_path,
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        batch_size=args.batch_size,
        precision=args.precision,
        out=out,
    )
    print(format_table({Path(args.model_dir).name: s["metrics"]}))
    print(f"hf-nvfp4: wrote {out}")
    return 0


def _compare(args) -> int:
    from .evaluation import compare_runs

    names = args.names.split(",") if args.names else None
    print(compare_runs(args.files, names, args.baseline))
    return 0


def _ablate(args) -> int:
    from .science.ablate import ablate

    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    variants = args.variants.split(",") if args.variants else None
    cmd = "hf-nvfp4 ablate " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["ablate"] else None
    ablate(
        args.recipe,
        seeds,
        variants,
        args.out,
        args.set,
        command=cmd,
        runs_dir=args.runs_dir,
        resume=args.resume,
        overwrite=args.overwrite,
    )
    return 0


def _export(args) -> int:
    from .integrations.export import export_to_directory

    calibration, text = args.calibration, None
    if calibration is not None:
        text = Path(calibration).is_file() and Path(calibration).suffix not in (".yaml", ".yml")
    if calibration is not None and not text:
        from .data import calibration_batches
        from .recipe import load_recipe

        recipe = load_recipe(calibration)  # a recipe name or YAML: checked now, its data built only when needed
        calibration = lambda: calibration_batches(recipe)
    try:
        report = export_to_directory(
            args.model_dir, args.out_dir, args.format, args.scheme, calibration, None, overwrite=args.overwrite
        )
    except NotImplementedError as exc:
        print(f"hf-nvfp4: not supported yet: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0


def _diagnose(args) -> int:
    if _no_matplotlib("diagnose"):  # its report has plots
        return 2
    from .science.diagnose_report import diagnose_checkpoint, summary_lines

    cmd = "hf-nvfp4 diagnose " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["diagnose"] else None
    out = args.out or str(Path(args.model_dir) / "diagnostics")
    rep = diagnose_checkpoint(args.model_dir, out, batch_size=args.batch_size, draws=args.draws,
                              max_tokens=args.max_tokens, seed=args.seed, recipe=args.recipe, split=args.split,
                              command=cmd)
    print("\n".join(summary_lines(rep)))
    print(f"hf-nvfp4: wrote {out}/diagnostics.md, diagnostics.json, diagnostics_layers.csv and diagnostics_depth.png")
    return 0


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _mechanisms(args) -> int:
    from .science.mechanisms import EXPERIMENTS, run_experiment, write_page

    kw = {}
    for item in args.set or []:
        k, sep, v = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: write NAME=VALUE (e.g. --set batches=8)")
        kw[k.replace("-", "_")] = _value(v)
    out = args.out or str(Path(args.run_dir) / "mechanisms")
    names = EXPERIMENTS if args.experiment == "all" else [args.experiment]
    for name in names:
        _, paths = run_experiment(name, args.run_dir, out, **kw)
        print(f"hf-nvfp4: wrote {', '.join(str(p) for p in paths)}")
    page = write_page(out, args.page, args.correction)
    print(f"hf-nvfp4: wrote {page}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="hf-nvfp4", description="NVFP4 pretraining for the Hugging Face stack")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a recipe end to end with the HF Trainer")
    t.add_argument("recipe", nargs="?", help="recipe name (tiny-cpu, ...; see: hf-nvfp4 recipes) or YAML path")
    t.add_argument("--recipe", dest="recipe_opt", help="same as the positional argument (for accelerate launch)")
    t.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a recipe value")
    t.add_argument("--max-steps", type=int)
    t.add_argument("--output-dir")
    g = t.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint-N")
    g.add_argument("--overwrite", action="store_true", help="delete the run already in the output dir, start over")
    t.set_defaults(fn=_train, parser=t)
    pl = sub.add_parser("plot-parity", help="plot a run's loss against its FP8/BF16 shadow")
    pl.add_argument("run", help="run directory (with trainer_state.json) or the file")
    pl.add_argument("--out", default="loss_parity.png")
    pl.add_argument("--tag", default="fp8", choices=["fp8", "bf16"])
    pl.set_defaults(fn=_plot)
    e = sub.add_parser("eval", help="evaluate a saved checkpoint with lm-eval (bundled offline tasks or any)")
    e.add_argument("model_dir")
    e.add_argument("--tasks", default="nvfp4_stdlib_ppl,nvfp4_stdlib_mc", help="comma-separated task names")
    e.add_argument("--include-path", help="a directory of your own task YAMLs")
    e.add_argument("--limit", type=float, help="examples per task (int) or fraction")
    e.add_argument("--num-fewshot", type=int)
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--precision", choices=["nvfp4", "bf16"], help="forward numerics (default: as trained)")
    e.add_argument("--out", help="JSON file (default: MODEL_DIR/eval_<precision>.json)")
    e.set_defaults(fn=_eval)
    c = sub.add_parser("compare", help="one table of several eval JSONs (e.g. NVFP4 vs FP8 vs BF16)")
    c.add_argument("files", nargs="+")
    c.add_argument("--names", help="comma-separated column names")
    c.add_argument("--baseline", help="column to compute relative gaps against (default: the first)")
    c.set_defaults(fn=_compare)
    a = sub.add_parser("ablate", help="the paper's ablations at small scale, paired over seeds, resumable")
    a.add_argument("recipe", nargs="?", default="ablation-cpu", help="recipe for the model and data (ablation-cpu)")
    a.add_argument("--seeds", default="0,1,2", help="comma-separated; add seeds to grow a finished sweep")
    a.add_argument(
        "--variants",
        help="comma-separated subset of: bf16,fp8,fp8_nvfp4_alloc,nvfp4,base,no_rht,no_sr,no_2d,all_nvfp4,"
        "mxfp4,switch_all,switch_fwd,switch_bwd,sr_forward,rht_all (default: all)",
    )
    a.add_argument("--out", help="where runs.jsonl, ablation.md and the plots go (default runs/ablate/RECIPE/results)")
    a.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a recipe value")
    a.add_argument("--runs-dir", help="where each run's checkpoint goes (default runs/ablate/RECIPE)")
    ga = a.add_mutually_exclusive_group()
    ga.add_argument("--resume", action="store_true", help="add to the sweep already in --out (runs.jsonl)")
    ga.add_argument("--overwrite", action="store_true", help="delete the sweep already in --out, start over")
    a.set_defaults(fn=_ablate)
    d = sub.add_parser("diagnose", help="measure each part of the recipe on a checkpoint's real activations/gradients")
    d.add_argument("model_dir", help="a checkpoint directory (e.g. from hf-nvfp4 train)")
    d.add_argument("--out", help="report directory (default: MODEL_DIR/diagnostics)")
    d.add_argument("--batch-size", type=int, default=8, help="sequences in the batch (default 8)")
    d.add_argument("--max-tokens", type=int, default=4096, help="tokens per layer kept for the replay (default 4096)")
    d.add_argument("--draws", type=int, default=16, help="stochastic-rounding draws per GEMM (default 16, >= 3)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--recipe", help="recipe whose data gives the batch (default: MODEL_DIR/recipe.json)")
    d.add_argument("--split", choices=["eval", "train"], default="eval")
    d.set_defaults(fn=_diagnose)
    mc = sub.add_parser("mechanisms", help="the recipe's mechanisms over checkpoints x batches (science experiments)")
    mc.add_argument("run_dir", help="a run's output_dir with checkpoint-N folders (train with training.save_steps)")
    mc.add_argument("--experiment", required=True,
                    choices=["sr_accumulation", "rht", "consistency", "depth", "late_switch", "all"])
    mc.add_argument("--out", help="results directory (default: RUN_DIR/mechanisms)")
    mc.add_argument("--set", action="append", metavar="NAME=VALUE",
                    help="an experiment parameter, e.g. --set batches=8 --set checkpoints=82,164 (repeatable)")
    mc.add_argument("--page", help="Markdown page whose generated block to rewrite (default: OUT/mechanisms.md)")
    mc.add_argument("--correction", choices=["holm", "bh"], default="holm",
                    help="multiple-comparison correction across every test of the page (default holm)")
    mc.set_defaults(fn=_mechanisms)
    x = sub.add_parser("export", help="write an NVFP4 serving checkpoint (compressed-tensors for vLLM, or ModelOpt)")
    x.add_argument("model_dir", help="a checkpoint trained with hf-nvfp4 (a run's output_dir)")
    x.add_argument("out_dir", help="a new or empty directory")
    x.add_argument("--format", default="compressed-tensors", choices=["compressed-tensors", "modelopt"])
    x.add_argument("--scheme", default="NVFP4A16", choices=["NVFP4A16", "NVFP4"], help="NVFP4 = W4A4 (calibrated)")
    x.add_argument(
        "--calibration", metavar="RECIPE_OR_DATA", help="W4A4 only: a recipe name or YAML (its data), or a text file"
    )
    x.add_argument("--overwrite", action="store_true", help="replace an earlier export in OUT_DIR")
    x.set_defaults(fn=_export)
    r = sub.add_parser("recipes", help="list the shipped recipes")
    r.set_defaults(fn=_recipes)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("torch", "datasets", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from .recipe import RecipeError

    try:
        if getattr(args, "limit", None) is not None and args.limit >= 1:
            args.limit = int(args.limit)
        return args.fn(args)
    except RecipeError as exc:
        print(f"hf-nvfp4: recipe error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as exc:
        print(f"hf-nvfp4: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
