"""Choosing a merge's scaling coefficient on the `<Task>Val` splits (tall_masks / TSV protocol).

The criterion is the average *normalized* validation accuracy: each task's accuracy divided by its
fine-tuned expert's accuracy on the same validation split (METHODS.md §2.2, §2.11, §2.13).
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import torch


def select_coefficient(grid: Sequence[float],
                       merged_at: Callable[[float], Mapping[str, torch.Tensor]],
                       evaluate_val: Callable[[Mapping[str, torch.Tensor]], dict[str, float]],
                       individual_val: dict[str, float], log: Callable[[str], None] = print,
                       patience: int | None = None) -> tuple[float, dict]:
    """Evaluate the merge at every grid value on validation; return the best value and the curve.

    Ties go to the first (smallest) grid value, as `argmax` does in the originals. With `patience`
    (Iso-C / Iso-CTS: 3), the sweep, in grid order, stops after that many values in a row without
    a strictly higher mean *absolute* val accuracy, while the choice among the values evaluated is
    still by mean *normalized* accuracy: the two criteria differ in the original
    (iso-merging `src/eval/eval.py` and `src/utils/utils.py`), and are kept as they are there."""
    curve = {}
    best, best_score = None, -float("inf")
    best_absolute, misses = 0.0, 0
    for value in grid:
        accs = evaluate_val(merged_at(value))
        # An expert at 0 % on its own val split (only in degenerate toy setups) cannot normalize.
        score = float(np.mean([accs[t] / individual_val[t] if individual_val[t] > 0 else accs[t]
                               for t in accs]))
        curve[value] = {"val_accuracy": accs, "avg_normalized_val_accuracy": score}
        log(f"Val: coef: {value} avg normalized ACC: {score}")
        if score > best_score:
            best, best_score = value, score
        if patience is not None:
            absolute = float(np.mean(list(accs.values())))
            if absolute > best_absolute:
                best_absolute, misses = absolute, 0
            else:
                misses += 1
                if misses >= patience:
                    log(f"Early stopping at coef {value}: {patience} values without a higher "
                        f"avg absolute ACC than {best_absolute}")
                    break
    return best, curve


def select_per_task(grid: Sequence[float], tasks: Sequence[str],
                    task_model_at: Callable[[str, float], Mapping[str, torch.Tensor]],
                    evaluate_task_val: Callable[[str, Mapping[str, torch.Tensor]], float],
                    log: Callable[[str], None] = print) -> tuple[dict[str, float], dict]:
    """TALL masks: for each task, the grid value whose task-specific model is best on its own val."""
    chosen, curve = {}, {}
    for task in tasks:
        scores = {v: evaluate_task_val(task, task_model_at(task, v)) for v in grid}
        chosen[task] = max(scores, key=lambda v: (scores[v], -grid.index(v)))
        curve[task] = scores
        log(f"Val: {task} lambda: {chosen[task]} ACC: {scores[chosen[task]]}")
    return chosen, curve
