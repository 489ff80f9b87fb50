"""When a stage ends: after its epochs, or earlier once its validation metric stops improving
(schedule.stages.<name>.until_plateau). Pure functions of the stage's metrics rows, so a resumed run, whose
rows come back from the checkpoint, decides exactly as the uninterrupted one did."""

from __future__ import annotations

from typing import Optional, Sequence

from cbam_train.config.schema import PlateauConfig

METRICS = {"val_acc": "max", "val_loss": "min"}  # what "better" means for each metric


def improved(value: float, best: Optional[float], plateau: PlateauConfig) -> bool:
    """Whether `value` beats the best so far by more than min_delta (the first value always does)."""
    if best is None:
        return True
    if METRICS[plateau.metric] == "max":
        return value > best + plateau.min_delta
    return value < best - plateau.min_delta


def best_so_far(rows: Sequence[dict], plateau: PlateauConfig) -> tuple:
    """(best value, its epoch, epochs since it) over a stage's rows, improvements judged as `improved` does."""
    best, best_epoch, since = None, None, 0
    for row in rows:
        if improved(row[plateau.metric], best, plateau):
            best, best_epoch, since = row[plateau.metric], row["epoch"], 0
        else:
            since += 1
    return best, best_epoch, since


def stage_end(rows: Sequence[dict], epochs: int, plateau: Optional[PlateauConfig]) -> Optional[str]:
    """Why a stage ends after its latest row: "plateau", "epochs" (its maximum reached), or None (it goes on)."""
    if plateau is not None and rows and best_so_far(rows, plateau)[2] >= plateau.patience:
        return "plateau"
    return "epochs" if len(rows) >= epochs else None


def describe(rows: Sequence[dict], plateau: PlateauConfig) -> str:
    """The console's reason for a plateau: 'val_acc did not improve by more than 0 for 3 epochs (best
    0.6120 at epoch 6)'."""
    best, best_epoch, since = best_so_far(rows, plateau)
    return (f"{plateau.metric} did not improve by more than {plateau.min_delta:g} for {since} epoch(s) "
            f"(best {best:.4f} at epoch {best_epoch})")
