"""`kl-nontarget powerlaw`: forgetting against the number of trained parameters and of steps, and its power-law fit.

    kl-nontarget powerlaw --model_name_or_path MODEL --dataset_name data.jsonl [--lora_ranks 1,4,16]
        [--target_presets attention,all-linear] [--measure_steps 4,8,16,32] [--kl_weights 0,0.3] [the sft options]

Per kl_weight (0 = plain LoRA) and adapter (every rank x every target preset), one run to the largest of
`--measure_steps`, measuring Lf on the retention set at each of them; then the fit Lf = A * N^a * S^b + E per weight
(`kl_nontarget.lab.power_law`), with bootstrap uncertainties. Output in `output_dir`: results.json (points and fits),
powerlaw.png and the printed fits. With neither a model nor a dataset it runs the toy demo's `shifted` task.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from kl_nontarget.cli.experiment import (
    RetentionArguments,
    command_main,
    load_base,
    one_process,
    parse_list,
    parse_presets,
    parse_ranks,
    parse_weights,
    retention_loader,
    tokenized_rows,
)
from kl_nontarget.cli.sft import SFTRun
from kl_nontarget.cli.sft_data import InputError

PROG = "kl-nontarget powerlaw"


@dataclass
class PowerLawArguments(RetentionArguments):
    """The power law's own options (the rest are `kl-nontarget sft`'s)."""

    lora_ranks: str = field(default="2,8,32", metadata={
        "help": "Comma-separated LoRA ranks: the parameter counts N of the fit (alpha scaled to keep lora_alpha / "
                "lora_r)."})
    target_presets: str | None = field(default=None, metadata={
        "help": "Comma-separated target presets (attention, mlp_up_gate, all-linear) for more parameter counts. "
                "Default: --lora_target_modules."})
    measure_steps: str | None = field(default=None, metadata={
        "help": "Comma-separated step counts at which Lf is measured (S of the fit); the runs last the largest. "
                "Default: max_steps / 8, / 4, / 2 and max_steps."})
    kl_weights: str = field(default="0,0.3", metadata={
        "help": "Comma-separated kl_weights, a fit each; 0 is plain LoRA."})

    def steps(self, max_steps: int) -> tuple[int, ...]:
        if self.measure_steps is None:
            return tuple(sorted({max(1, max_steps // k) for k in (8, 4, 2, 1)}))
        return tuple(sorted(set(parse_list(self.measure_steps, "measure_steps", int, lambda s: s >= 1,
                                           "integers >= 1"))))

    def presets(self) -> tuple[str, ...] | None:
        """The target modules to compare, or None; InputError for an unknown preset."""
        return parse_presets(self.target_presets)

    def check(self, max_steps: int) -> None:
        from kl_nontarget.lab.power_law import MIN_POINTS

        parse_weights(self.kl_weights)
        ranks, steps = parse_ranks(self.lora_ranks), self.steps(max_steps)
        adapters = len(ranks) * len(self.presets() or (None,))
        if adapters < 2 or len(steps) < 2 or adapters * len(steps) < MIN_POINTS:
            raise InputError(f"too few points to fit: {adapters} parameter count(s) x {len(steps)} step count(s); "
                             f"the fit needs at least 2 of each and {MIN_POINTS} points (--lora_ranks, "
                             "--target_presets, --measure_steps)")
        self.check_retention()


def _task(run: SFTRun, log):
    from kl_nontarget.cli.sft import demo_task, has_data
    from kl_nontarget.cli.sft_data import load_datasets, resolve_model_path

    if run.model.model_name_or_path is None and not has_data(run):
        path, train, _evaluation = demo_task(run, PROG, log)
        return path, train
    if run.model.model_name_or_path is None or not has_data(run):
        raise InputError("pass both --model_name_or_path and --dataset_name (or neither, for the embedded demo task)")
    train, _ = load_datasets(run.script, run.mixture, text_field=run.training.dataset_text_field, want_eval=False)
    return resolve_model_path(run.model.model_name_or_path, log=log), train


def run_power_law(run: SFTRun, args: PowerLawArguments, log=print, progress=True) -> dict:
    """Collect the points, fit, plot; returns the results dict written to output_dir/results.json."""
    from kl_nontarget.lab.power_law import collect_points, fit_power_law, format_fits, plot_power_law
    from kl_nontarget.sweep.grid import base_record, versions
    from kl_nontarget.sweep.variants import AdapterSpec

    training = run.training
    max_steps = training.max_steps if training.max_steps and training.max_steps > 0 else 32
    args.check(max_steps)
    one_process(run, PROG)
    start = time.time()
    r0, alpha = run.model.lora_r, run.model.lora_alpha
    try:
        adapters = [AdapterSpec("lora", r, max(1, round(alpha * r / r0)), t)
                    for t in (args.presets() or (run.model.lora_target_modules or "all-linear",))
                    for r in parse_ranks(args.lora_ranks)]
    except ValueError as err:
        raise InputError(str(err)) from None
    model_path, train = _task(run, log)
    model, tokenizer = load_base(run, model_path)
    train_rows, _ = tokenized_rows(model, tokenizer, training, train, None)
    heldout, retention = retention_loader(model, tokenizer, args, seed=training.seed)
    base, _ = base_record(model, tokenizer, heldout, model_path)
    steps = args.steps(max_steps)
    points, rows = collect_points(model, tokenizer.pad_token_id, train_rows, adapters, parse_weights(args.kl_weights),
                                  steps, heldout, lr=training.learning_rate,
                                  batch_size=training.per_device_train_batch_size, seeds=args.seeds, log=log,
                                  progress=progress)
    fits = {}
    for name, method_points in points.items():
        try:
            fits[name] = fit_power_law(method_points, seed=training.seed)
        except ValueError as err:
            raise InputError(f"{name}: {err}") from None
    out = Path(training.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {"points": rows, "fits": {name: fit.to_dict() for name, fit in fits.items()}, "base": base,
               "config": {"adapters": [a.name for a in adapters], "measure_steps": list(steps),
                          "kl_weights": list(parse_weights(args.kl_weights)), "lr": training.learning_rate,
                          "batch_size": training.per_device_train_batch_size, "model": str(model_path),
                          "retention": retention,
                          "form": "Lf = A * N^a * S^b + E (least squares in log(Lf - E) for fixed E, E by golden "
                                  "section on the squared error of Lf, bootstrap standard deviations)"},
               "versions": versions(), "seconds": time.time() - start}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot_power_law(points, fits, out / "powerlaw.png")
    log(format_fits(fits, base["entropy"]))
    log(f"\nwrote {out / 'results.json'} and {out / 'powerlaw.png'} in {results['seconds']:.0f} s")
    return results


def main(argv: list[str] | None = None) -> int:
    """`kl-nontarget powerlaw ...`: 0 on success, 2 for bad input (one message on stderr)."""
    return command_main(PROG, PowerLawArguments, run_power_law, argv)
