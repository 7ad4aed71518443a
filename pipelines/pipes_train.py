"""The training process launched by the ``opsdl_model`` asset through Dagster Pipes.

It runs :func:`opsdl_core.train.job.run` (which knows nothing of Dagster) and streams its log lines
and per-step metrics back to the Dagster run.  The config file path comes in the Pipes extras;
a retried Dagster step starts this process again on the same ``run_dir`` and the trainer
resumes from its last checkpoint."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from dagster_pipes import open_dagster_pipes  # noqa: E402

from opsdl_core.config import RunConfig  # noqa: E402
from opsdl_core.train.job import run  # noqa: E402


def main() -> None:
    if int(os.environ.get("RANK", "0")) != 0:  # under `accelerate launch`: one rank talks to Dagster
        cfg = RunConfig.from_yaml(os.environ["OPSDL_CONFIG_PATH"])
        run(cfg, evaluate=False, log=lambda s: None)
        return
    with open_dagster_pipes() as pipes:
        cfg = RunConfig.from_yaml(pipes.get_extra("config_path"))
        pipes.log.info(f"[opsdl] training in {cfg.train.run_dir} (config {cfg.hash()}, retry {pipes.retry_number})")

        def on_step(m: dict) -> None:
            pipes.report_custom_message({"kind": "step", "metrics": m})

        results = run(cfg, evaluate=False, log=pipes.log.info, on_step=on_step)
        pipes.report_custom_message({"kind": "results", "results": results})


if __name__ == "__main__":
    main()
