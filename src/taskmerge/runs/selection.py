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


def search_coefficients(evaluate_val: Callable[[list[float]], dict[str, float]], init: Sequence[float],
                        lower: float, upper: float, budget: int, seed: int,
                        log: Callable[[str], None] = print) -> tuple[list[float], list[dict]]:
    """pcb_ES.py's λ search: maximise the mean *absolute* val accuracy (its `compute_acc`) over one
    λ_t per task in [lower, upper], starting at `init`, with `budget` evaluations (init included).

    The original asks nevergrad's NGOpt, unseeded. Here: a seeded (1+1) evolution strategy with
    the one-fifth success rule (Kern et al. 2004's constants), numpy only. Why this one: validation
    accuracy is a step function of λ (flat between the λ where one image flips), so gradients and
    finite differences (L-BFGS-B) see zero, and Powell's / Nelder-Mead's line and simplex steps
    stall on the plateaus and overrun an exact evaluation budget; a (1+1)-ES moves across plateaus
    (ties are accepted), spends exactly one evaluation per step, stays in the box by clipping, and is
    one of the optimisers NGOpt itself selects for small continuous budgets. Returns the best λ
    (the first evaluated among equals) and every evaluation in order."""
    rng = np.random.default_rng(seed)
    x = np.clip(np.asarray(init, dtype=np.float64), lower, upper)
    sigma = 0.2 * (upper - lower)  # a fifth of the box: the first steps reach its edges
    seen: dict[tuple, dict[str, float]] = {}
    history: list[dict] = []

    def score(point: np.ndarray) -> float:
        key = tuple(float(v) for v in point)
        if key not in seen:  # the merge is deterministic: a revisited point costs no evaluation
            seen[key] = evaluate_val(list(key))
        accs = seen[key]
        mean = float(np.mean(list(accs.values())))
        history.append({"lams": list(key), "val_accuracy": accs, "avg_val_accuracy": mean})
        log(f"lams: {[round(v, 3) for v in key]} acc: {round(100 * mean, 2)} "
            f"acc_lst: {[round(100 * a, 2) for a in accs.values()]}")
        return mean

    best = score(x)
    for _ in range(budget - 1):
        candidate = np.clip(x + sigma * rng.standard_normal(x.shape), lower, upper)
        value = score(candidate)
        if value > best:
            sigma *= np.exp(1 / 3)
        else:
            sigma *= np.exp(-1 / 12)  # stationary at a 1/5 success rate
        if value >= best:  # ties move along a plateau
            x, best = candidate, value
    first_best = next(h for h in history if h["avg_val_accuracy"] == best)
    return first_best["lams"], history
