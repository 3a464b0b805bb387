"""A small mutation check: does the suite catch the bugs that matter? (issue 28)

Each mutation is a realistic one-line bug: a file, a snippet that must occur in it exactly once,
its replacement, and the tests that should catch it. The script copies the working tree (tracked
and untracked-but-not-ignored files, uncommitted edits included) to a temporary directory, checks
that the listed tests pass there unmutated, then applies one mutation at a time to the copy, runs
its tests and restores the file. Your tree is never edited.

    python tools/mutate.py                 # every mutation; prints the killed/survived table
    python tools/mutate.py --list          # the mutations, without running anything
    python tools/mutate.py --only switch   # those whose id contains "switch"
    python tools/mutate.py --tests-from main~5   # the mutated code against an older revision's tests/

Exit status: 0 when every mutation is killed, 1 when one survives, 2 when a snippet is missing (the
code moved: update its entry) or the unmutated tests fail. CI does not run it (docs/testing.md).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
T = "tests/test_mutants.py::"


@dataclass(frozen=True)
class Mutation:
    id: str
    file: str
    original: str
    mutated: str
    tests: tuple[str, ...]
    why: str


MUTATIONS = [
    # -- the survivors of issue 28 ---------------------------------------------------------------
    Mutation("lm_eval_ws_dropped", "hf_nvfp4/integrations/lm_eval.py",
             "context, continuation = context[:-n], context[-n:] + continuation",
             "context, continuation = context[:-n], continuation",
             (T + "test_lm_eval_moves_a_contexts_trailing_whitespace_into_the_continuation",),
             "a context's trailing whitespace dropped instead of moved into the continuation"),
    Mutation("lm_eval_ws_kept_in_context", "hf_nvfp4/integrations/lm_eval.py",
             "            if n:  # lm-eval's convention", "            if False:  # lm-eval's convention",
             (T + "test_lm_eval_moves_a_contexts_trailing_whitespace_into_the_continuation",),
             "trailing whitespace left in the context (not scored)"),
    Mutation("shadow_ema_swapped", "hf_nvfp4/integrations/shadow_run.py",
             "self.smoothing * self.ema + (1 - self.smoothing) * gap",
             "(1 - self.smoothing) * self.ema + self.smoothing * gap",
             (T + "test_shadow_gap_and_its_ema_against_hand_computed_values",),
             "EMA weights swapped in loss_gap_vs_fp8_smoothed"),
    Mutation("shadow_gap_sign", "hf_nvfp4/integrations/shadow_run.py",
             "gap = (loss - ref) / ref", "gap = (ref - loss) / ref",
             (T + "test_shadow_gap_and_its_ema_against_hand_computed_values",),
             "sign flip of the raw loss gap"),
    Mutation("switch_floor", "hf_nvfp4/integrations/switch.py",
             "int(math.floor(round(self.fraction * max_steps, 9) + 0.5))", "int(self.fraction * max_steps)",
             (T + "test_fractional_switch_step_is_rounded_to_nearest",),
             "a fractional switch step rounded down"),
    Mutation("switch_ceil", "hf_nvfp4/integrations/switch.py",
             "int(math.floor(round(self.fraction * max_steps, 9) + 0.5))", "int(math.ceil(self.fraction * max_steps))",
             (T + "test_fractional_switch_step_is_rounded_to_nearest",),
             "a fractional switch step rounded up"),
    Mutation("sr_generator_not_kept", "hf_nvfp4/nn/linear.py",
             "self._generators[key] = g", "self._generators.pop(key, None)",
             (T + "test_converted_layers_draw_distinct_sr_noise_within_one_step",),
             "every layer re-seeds its own generator from the same base: one SR seed for every layer"),
    Mutation("sr_state_per_layer", "hf_nvfp4/nn/convert.py",
             "mod._init_nvfp4(state)", "mod._init_nvfp4(NVFP4State(recipe, rank=_rank(rank)))",
             (T + "test_converted_layers_draw_distinct_sr_noise_within_one_step",),
             "convert_model gives each layer its own state (same seed) instead of the model's one"),
    Mutation("negative_zero_keeps_sign", "hf_nvfp4/formats/e2m1.py",
             "return torch.where(v < 0, -q, q)", "return torch.copysign(q, v)",
             (T + "test_negative_zero_quantizes_to_plus_zero_bit_for_bit",),
             "-0.0 keeps its sign in fake_quantize (the codes give +0)"),
    Mutation("nvfp4_bf16_share_int", "hf_nvfp4/config.py",
             "max(1, round(PAPER_BF16_SHARE * n_blocks))", "max(1, int(PAPER_BF16_SHARE * n_blocks))",
             (T + "test_bf16_block_shares_are_rounded_not_truncated",),
             "the NVFP4 recipe's BF16-block share truncated"),
    Mutation("fp8_bf16_first_share_int", "hf_nvfp4/config.py",
             "math.floor(n_blocks * PAPER_FP8_BF16_FIRST / PAPER_FP8_BLOCKS + 0.5)",
             "int(n_blocks * PAPER_FP8_BF16_FIRST / PAPER_FP8_BLOCKS)",
             (T + "test_bf16_block_shares_are_rounded_not_truncated",),
             "the FP8 baseline's first-block share truncated"),
    Mutation("fp8_bf16_last_share_int", "hf_nvfp4/config.py",
             "math.floor(n_blocks * PAPER_FP8_BF16_LAST / PAPER_FP8_BLOCKS + 0.5)",
             "int(n_blocks * PAPER_FP8_BF16_LAST / PAPER_FP8_BLOCKS)",
             (T + "test_bf16_block_shares_are_rounded_not_truncated",),
             "the FP8 baseline's last-block share truncated"),
    # -- bugs the old weak assertions let through (finite, not None, key present, rtol 0.3) ------
    Mutation("mx_scale_exponent_plus_one", "hf_nvfp4/formats/mx.py",
             "exp = ceil_log2_exponent(d)\n", "exp = ceil_log2_exponent(d) + 1\n",
             ("tests/test_linear.py::test_other_formats_and_bf16_through_same_machinery",),
             "MX block scales one power of two too large (Fprop was compared with the same code)"),
    Mutation("fp8_block_fp32_scales_by_default", "hf_nvfp4/formats/fp8.py",
             '"0") != "1"', '"0") == "1"',
             ("tests/test_linear.py::test_other_formats_and_bf16_through_same_machinery",),
             "FP8 block scales not powers of two by default (TE's default is pow2)"),
    Mutation("weight_tile_ignored", "hf_nvfp4/ops/roles.py",
             "tile = fmt.weight_tile if two_d else fmt.act_tile", "tile = fmt.act_tile",
             ("tests/test_convert.py::test_convert_hf_models[llama]",
              "tests/test_fast_paths.py::test_plan_without_cache_still_works"),
             "2D weight scaling silently off (the converted model's loss stayed finite)"),
    Mutation("rht_weight_keeps_2d_tiles", "hf_nvfp4/ops/roles.py",
             "and fmt.weight_tile is not None and not rht", "and fmt.weight_tile is not None",
             ("tests/test_science.py::test_negative_controls_and_switch_scopes_in_the_role_table",),
             "a weight under RHT quantized in 2D tiles (the negative control's rtol 0.3 passed)"),
    Mutation("rht_sign_vector", "hf_nvfp4/formats/hadamard.py",
             "RHT_SIGNS_16 = (1, 1, 1, -1, 1,", "RHT_SIGNS_16 = (1, 1, 1, 1, 1,",
             ("tests/test_edges.py::test_rht_keeps_the_padded_basis",
              "tests/test_formats.py::test_mxfp4_rht_size_and_2d_tiles_take_effect"),
             "another sign vector than TE's: still orthogonal, so the inverse-transform tolerances passed"),
    Mutation("diagnose_bf16_floor_weight_unrounded", "hf_nvfp4/science/diagnose.py",
             'out["fprop_relerr_bf16"] = _rel(_bf16(x) @ _bf16(w).t(), refs["fprop"])',
             'out["fprop_relerr_bf16"] = _rel(_bf16(x) @ w.t(), refs["fprop"])',
             ("tests/test_science.py::test_diagnose_returns_every_metric_for_every_layer_and_gemm",),
             "diagnose's BF16 floor leaves the weight unrounded (0 < floor < relerr < 1 passed)"),
    Mutation("export_rel_change_vs_master", "hf_nvfp4/integrations/export.py",
             '"rel_change": _rel(b - a, a)', '"rel_change": _rel(b - a, w)',
             ("tests/test_export.py::test_compressed_tensors_layout_is_the_training_quantization",),
             "the export report's rel_change relative to the master weights (0 < x < 1 passed)"),
    # -- issue 24's weight cache and kernels (this round) ----------------------------------------
    Mutation("cache_training_forward_hashes", "hf_nvfp4/ops/cache.py",
             "evaluating = not torch.is_grad_enabled() if training is None else not training",
             "evaluating = not torch.is_grad_enabled()",
             ("tests/test_weight_cache.py::test_a_plain_training_step_hashes_nothing_and_accumulation_hits",),
             "grad mode (off inside the autograd Function) read as an evaluation forward: every training "
             "forward hashes every weight"),
    Mutation("cache_no_grad_never_hashes", "hf_nvfp4/ops/linear.py",
             'plan.generator, training=False)', 'plan.generator, training=True)',
             ("tests/test_weight_cache.py::test_the_second_no_grad_forward_after_a_change_is_served",),
             "no_grad forwards (evaluation, generate) do not hash: the next one re-quantizes first"),
    Mutation("e2m1_magic_step", "hf_nvfp4/formats/e2m1.py",
             "step = torch.where(a < 2.0, 0.5, torch.where(a < 4.0, 1.0, 2.0))\n    magic",
             "step = torch.where(a < 2.0, 0.5, torch.where(a < 3.0, 1.0, 2.0))\n    magic",
             ("tests/test_nvfp4.py::test_fused_matches_eager_bit_for_bit", "tests/test_properties.py"),
             "the E2M1 grid step of 1 ends at 3, not 4 (3.4 rounds to 4)"),
    Mutation("pack_pairs_nibble_order", "hf_nvfp4/formats/nvfp4.py",
             "return ((v | (v >> 4)) & 0xFF).to(torch.uint8)", "return ((v | (v << 4)) & 0xFF).to(torch.uint8)",
             ("tests/test_nvfp4.py", "tests/test_formats.py"),
             "codes paired into a byte in the wrong nibble order"),

]


def _copy_tree(dst: Path) -> None:
    """The working tree as git sees it (tracked + untracked, not ignored), uncommitted edits included."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, check=True).stdout
    for rel in filter(None, out.decode().split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


def _pytest(tree: Path, tests, timeout: int) -> tuple[int, float, str]:
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    t0 = time.time()
    try:
        r = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
        return r.returncode, time.time() - t0, r.stdout[-2000:] + r.stderr[-2000:]
    except subprocess.TimeoutExpired:
        return -1, time.time() - t0, "timed out"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", help="run the mutations whose id contains this string (or one of a,b,c)")
    p.add_argument("--list", action="store_true", help="list the mutations and exit")
    p.add_argument("--timeout", type=int, default=600, help="seconds per pytest run (default 600)")
    p.add_argument("--tests-from", metavar="REV", help="use tests/ of this git revision (did older tests catch it?)")
    p.add_argument("-v", "--verbose", action="store_true", help="print pytest's output tail of each run")
    args = p.parse_args(argv)
    only = [w for w in (args.only or "").split(",") if w]
    muts = [m for m in MUTATIONS if not only or any(w in m.id for w in only)]
    if args.list or not muts:
        for m in muts:
            print(f"{m.id:38s} {m.file}: {m.why}")
        return 0 if muts else 2
    with tempfile.TemporaryDirectory(prefix="hf-nvfp4-mutate-") as tmp:
        tree = Path(tmp)
        _copy_tree(tree)
        if args.tests_from:
            shutil.rmtree(tree / "tests")
            tar = subprocess.run(["git", "archive", args.tests_from, "tests"], cwd=ROOT, capture_output=True,
                                 check=True)
            subprocess.run(["tar", "-x", "-C", str(tree)], input=tar.stdout, check=True)
        missing = [m.id for m in muts if (tree / m.file).read_text().count(m.original) != 1]
        if missing:
            print(f"snippet not found exactly once (code moved? update the entry): {missing}")
            return 2
        base_tests = sorted({t for m in muts for t in m.tests if (tree / t.split("::")[0]).is_file()})
        rc, secs, tail = _pytest(tree, base_tests, args.timeout)
        if rc not in (0, 4) if args.tests_from else rc != 0:  # an older tests/ may lack a test (rc 4)
            print(f"the unmutated tree fails its tests (rc {rc}); fix that first:\n{tail}")
            return 2
        print(f"unmutated: {len(base_tests)} test(s) pass ({secs:.0f} s)\n")
        print("| mutation | file | result | seconds |\n|---|---|---|---|")
        survived = []
        for m in muts:
            path = tree / m.file
            text = path.read_text()
            path.write_text(text.replace(m.original, m.mutated))
            try:
                rc, secs, tail = _pytest(tree, m.tests, args.timeout)
            finally:
                path.write_text(text)
            if rc in (4, 5):  # pytest: usage error (no such test) or nothing collected
                result, rc = "no such test", 0
            else:
                result = "survived" if rc == 0 else "killed" if rc == 1 else f"killed (pytest rc {rc})"
            if rc == 0:
                survived.append(m.id)
            print(f"| {m.id} | {m.file} | {result} | {secs:.0f} |", flush=True)
            if args.verbose:
                print(tail)
        print(f"\n{len(muts) - len(survived)} of {len(muts)} killed" + (f"; survived: {survived}" if survived else ""))
        return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
