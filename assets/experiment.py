"""The headline experiment as an asset: OPSDL against Long-SFT and DPO on the same prompts, per
context length, over seeds (``opsdl_core.experiment``)."""


from pathlib import Path
from typing import Any, Optional

import dagster as dg
from pydantic import Field

from opsdl_core.config import ConfigError
from opsdl_core.experiment.plan import load_experiment, plan_runs
from opsdl_core.experiment.report import transfer_markdown
from opsdl_core.experiment.run import run_experiment

from .plots import png_markdown
from .resources import CODE_VERSION, CPU_POOL, HEAVY, OWNERS, OpsdlResource

GROUP = "experiment"
ROOT = Path(__file__).resolve().parents[1]


class ExperimentConfig(dg.Config):
    config_path: str = Field(default="configs/experiment.yaml", description="Experiment YAML (sections "
                             "'experiment' and 'run'), relative to the project root or absolute; "
                             "configs/ablation.yaml and configs/controls.yaml compare OPSDL settings.")
    methods: Optional[list[str]] = Field(default=None, description="Methods to train (opsdl, sft, dpo, or names "
                                         "of the file's experiment.variants); default: the file's.")
    seeds: Optional[list[int]] = Field(default=None, description="Training seeds; default: the file's.")
    lengths: Optional[list[int]] = Field(default=None, description="Evaluation context lengths (tokens).")
    steps: Optional[int] = Field(default=None, description="Optimizer steps per training run.")
    eval_every: Optional[int] = Field(default=None, description="Evaluate intermediate checkpoints every k steps "
                                      "(the sample-efficiency curve); 0: final models only.")
    heldout_families: Optional[list[str]] = Field(default=None, description="Curriculum experiments "
                                                  "(configs/transfer.yaml): task families never trained on.")
    protocol: Optional[str] = Field(default=None, description="Curriculum experiments: 'split' (one training "
                                    "without every held-out family) or 'leave_one_out' (one per family).")
    overrides: list[str] = Field(default=[], description="Any other field, as 'experiment.eval_n=20' or "
                                 "'run.optim.lr=2e-4'.")

    def set_lines(self) -> list[str]:
        pairs = [("experiment.methods", self.methods), ("experiment.seeds", self.seeds),
                 ("experiment.lengths", self.lengths), ("run.train.steps", self.steps),
                 ("experiment.eval_every", self.eval_every), ("experiment.heldout_families", self.heldout_families),
                 ("experiment.protocol", self.protocol)]
        return [f"{k}={v}" for k, v in pairs if v is not None] + list(self.overrides)


@dg.asset(group_name=GROUP, kinds={"pytorch", "duckdb"}, code_version=CODE_VERSION, op_tags=HEAVY, pool=CPU_POOL, owners=OWNERS,
          description="Trains the base model with OPSDL, Long-SFT and DPO (LongPO form) on the same prompts for "
                      "each seed (each training its own process), evaluates the base, every final model and the "
                      "intermediate checkpoints per context length, and writes the comparison: a method x length "
                      "table with the spread over seeds, short-context retention and training time, accuracy "
                      "against length, and accuracy against prompts seen. Every score is in DuckDB "
                      "(v_method_scores) with its method, seed, checkpoint hash and data digest.")
def method_comparison(context: dg.AssetExecutionContext, config: ExperimentConfig,
                      opsdl: OpsdlResource) -> dict[str, Any]:
    path = Path(config.config_path)
    path = path if path.is_absolute() else ROOT / path
    try:
        exp = load_experiment(path, [*config.set_lines(), f"run.model.name={opsdl.model}"])
    except (ConfigError, FileNotFoundError) as e:
        raise dg.Failure(f"method_comparison config: {e}") from None
    exp.settings.out_dir = str(opsdl.artifacts("experiments", exp.settings.name))
    if opsdl.model_cache_dir:
        exp.run.model.cache_dir = opsdl.model_cache_dir
    context.log.info(f"{len(plan_runs(exp))} training runs: methods {exp.settings.methods} x seeds "
                     f"{exp.settings.seeds}, {exp.run.train.steps} steps each -> {exp.settings.out_dir}")
    try:
        summary = run_experiment(exp, log=context.log.info, store=opsdl.store())
    except RuntimeError as e:  # a training process failed: its log tail is in the message
        raise dg.Failure(str(e)) from None
    out = Path(exp.settings.out_dir)
    context.add_output_metadata({
        "comparison": dg.MetadataValue.md((out / "comparison.md").read_text()),
        "accuracy_vs_length": dg.MetadataValue.md(png_markdown(out / "accuracy_vs_length.png", "accuracy vs length")),
        "sample_efficiency": dg.MetadataValue.md(png_markdown(out / "sample_efficiency.png", "sample efficiency")),
        "training_runs": len(summary["trained"]),
        **({"transfer": dg.MetadataValue.md("\n".join(transfer_markdown(summary)))} if summary.get("transfer") else {}),
        "wall_seconds": summary["wall_seconds"],
        "out_dir": dg.MetadataValue.path(str(out)),
        "sql": dg.MetadataValue.md("```sql\nSELECT method, seed, step, task, context, context_length, value, "
                                   "checkpoint_id\nFROM v_method_scores WHERE experiment = "
                                   f"'{exp.settings.name}'\n```"),
    })
    return {"out_dir": str(out), "experiment": exp.settings.name, "summary": str(out / "comparison.json")}
