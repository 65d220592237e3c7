"""CART: low-rank centred task arithmetic around the average (METHODS_RECORDS.md)."""
from __future__ import annotations

from dataclasses import dataclass

from taskmerge import merging
from taskmerge.runs.data_free import Merge, Run, attention_layout
from taskmerge.runs.registry import Method, declare
from taskmerge.runs.reporting import num
from taskmerge.runs.script_configs import merge_config, surgery_config
from taskmerge.runs.settings import setting


@dataclass
class CARTMerge:
    cart_preset: int | None = setting(choices=tuple(merging.CART_PRESETS))
    cart_lambda: float | None = setting(finite=True)
    cart_rank_ratio: float | None = setting(ge=0.0, le=1.0)


def cart_settings(s: CARTMerge, num_tasks: int) -> tuple[str, dict]:
    """(where the preset came from, {preset, lam, rank_ratio}): the repository's config for
    `cart_preset` tasks (None: the one nearest the run's number of tasks), each value replaced by the
    setting that is not None."""
    presets = merging.CART_PRESETS
    size = s.cart_preset
    why = f"cart_preset={size}"
    if size is None:
        size = min(presets, key=lambda n: (abs(n - num_tasks), n))
        why = f"the repository's config nearest to {num_tasks} tasks" if size != num_tasks else               f"the repository's {num_tasks}-task config"
    settings = {"preset": size, **presets[size]}
    if s.cart_lambda is not None:
        settings["lam"] = s.cart_lambda
    if s.cart_rank_ratio is not None:
        settings["rank_ratio"] = s.cart_rank_ratio
    return why, settings


def merge_cart(run: Run, s: CARTMerge) -> Merge:
    why, c = cart_settings(s, len(run.setup.tasks))
    run.log.info(f"CART settings: {c} ({why})")
    run.log.info(attention_layout(run))
    pretrained, experts = run.experts()
    merged = merging.cart_merging(pretrained, experts, c["lam"], c["rank_ratio"], validate_inputs=False)
    return Merge(f"cart_{c['lam']}_rho{c['rank_ratio']}", merged, extra={"cart": c})


def label(report: dict) -> str:
    cart = report["cart"]
    return f"cart_merging (λ {num(cart.get('lam'))}, ρ {num(cart.get('rank_ratio'))})"


METHOD = declare(Method("cart_merging", CARTMerge, merge_cart, label, script="main_CARTMerging.py",
                        bases={"cart_merging": {}}, coefficient_keys=("cart",)))
CARTMergingConfig = merge_config(METHOD)
CARTMergingSurgeryConfig = surgery_config(METHOD)
