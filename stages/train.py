"""DVC stage `train`: see ltpipe.training.loop.run_stage; per-epoch logs go to dvclive."""

from ltpipe.core.config import Params
from ltpipe.core.errors import main_guard
from ltpipe.core.paths import TRAIN_LOG_DIR
from ltpipe.training.loop import run_stage


@main_guard
def main() -> None:
    # Imported when the stage runs, not when the module is imported: dvclive pulls in dvc and pandas (~0.4 s).
    from dvclive import Live

    params = Params.load()
    # dvcyaml=None: the pipeline's dvc.yaml declares the plots; dvclive must not edit it mid-stage.
    with Live(dir=str(TRAIN_LOG_DIR), dvcyaml=None, save_dvc_exp=False, report=None) as live:
        def log(row):
            prefix = "stage2/" if row.get("stage") == 2 else ""  # stage-2 epochs continue the step count
            live.log_metric(f"{prefix}train/loss", row["train_loss"])
            if row["val_score"] is not None:  # no validation split: no curve
                live.log_metric(f"{prefix}val/score", row["val_score"])
            live.log_metric(f"{prefix}lr", row["lr"])
            live.next_step()

        summary = run_stage(params, logger=log)
        live.summary.update({"best_epoch": summary["best_epoch"], "best_val_score": summary["val_score"],
                             **{k: v for k, v in summary.items() if k.startswith("stage2_")},
                             **{k: summary[k] for k in ("above_chance", "chance_score", "loss_diverged", "threads",
                                                        "protocol")}})


if __name__ == "__main__":
    main()
