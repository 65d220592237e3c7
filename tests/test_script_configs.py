"""Every script's variables form its typed config, and every setting is refused, naming itself, when
it is missing, unknown, or out of its type, range or choices (runs/settings.py)."""
import dataclasses
import math

import pytest
from script_variables import (SCRIPTS, base_defaults, runs_on_any_base, script_config, script_config_class,
                              script_variables)

from taskmerge.runs import registry
from taskmerge.runs.adaptive import base_settings
from taskmerge.runs.methods.task_arithmetic import TaskArithmeticMerge
from taskmerge.runs.settings import check, from_values, setting
from taskmerge.storage.errors import ConfigError

SURGERY_SCRIPTS = [s for s in SCRIPTS if "surgery" in s.lower()]


def test_there_is_a_config_for_every_script():
    assert len(SCRIPTS) == 24 and len(SURGERY_SCRIPTS) == 6


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_sets_exactly_its_config_and_its_defaults_pass_the_checks(script):
    cls = script_config_class(script)
    variables = script_variables(script)
    if runs_on_any_base(script):  # its base's settings come from the base's own script
        variables = {**base_defaults(script, variables["method_name"]), **variables}
    assert set(variables) == {f.name for f in dataclasses.fields(cls)}
    config = from_values(cls, variables, script)
    assert dataclasses.asdict(config) == {k: (float(v) if isinstance(v, int) and not isinstance(v, bool)
                                              and isinstance(getattr(config, k), float) else v)
                                          for k, v in variables.items()}


def test_a_missing_setting_is_refused_with_its_name():
    values = script_variables("main_TaskArithmetic.py")
    del values["val_grid"]
    with pytest.raises(ConfigError, match="main_TaskArithmetic.py does not set val_grid"):
        from_values(script_config_class("main_TaskArithmetic.py"), values, "main_TaskArithmetic.py")


def test_an_unknown_setting_is_refused_with_its_name():
    values = {**script_variables("main_TaskArithmetic.py"), "scaling_coeff": 0.5}
    with pytest.raises(ConfigError, match="main_TaskArithmetic.py sets scaling_coeff, which Task"):
        from_values(script_config_class("main_TaskArithmetic.py"), values, "main_TaskArithmetic.py")


REFUSED = [
    # choices
    ("main_TaskArithmetic_with_surgery.py", {"surgery": "V2"}, "surgery='V2'", "'v1', 'v2'"),
    ("main_TaskArithmetic_with_surgery.py", {"surgery": "v3"}, "surgery='v3'", "'v1', 'v2'"),
    ("main_TaskArithmetic_with_surgery.py", {"method_name": "task_arithmetics"}, "method_name=",
     "'task_arithmetic'"),
    ("main_Surgery.py", {"method_name": "task_arithmetics"}, "method_name=", "consensus"),
    ("main_AdaMerging.py", {"method_name": "ties_merging"}, "method_name='ties_merging'", "lw_adamerging"),
    ("main_TiesMerging.py", {"preset": "EnnengYang"}, "preset='EnnengYang'", "'ennengyang', 'tall_masks'"),
    ("main_TiesMerging.py", {"merge": "dis-median"}, "merge='dis-median'", "'dis-max'"),
    ("main_TaskArithmetic.py", {"val_grid": "tall"}, "val_grid='tall'", "'tsv_alpha'"),
    ("main_TSVMerging.py", {"method": "TSV"}, "method='TSV'", "'TSVC'"),
    ("main_TallMasks.py", {"method": "tall_masks"}, "method='tall_masks'", "'consensus'"),
    ("main_EMRMerging.py", {"rescaler": "mean"}, "rescaler='mean'", "'paper'"),
    ("main_IsoMerging.py", {"qkv": "split"}, "qkv='split'", "'auto', 'fused', 'separate'"),
    ("main_TSVMerging.py", {"method": "TSVC", "qkv": "separate"}, "qkv='separate'", "no TSV-C"),
    ("main_PCBMerging.py", {"pcb_search_lower": 1.3, "pcb_search_upper": 0.8}, "pcb_search_lower=1.3",
     "lower must be below upper"),
    ("main_PCBMerging.py", {"pcb_search_init": 1.5}, "pcb_search_init=1.5", "outside [0.8, 1.3]"),
    ("main_PCBMerging.py", {"pcb_search_budget": 0}, "pcb_search_budget=0", ">= 1"),
    ("main_Surgery.py", {"method_name": "pcb_merging", "pcb_search_init": 2.0},
     "pcb_search_init=2.0", "outside"),
    ("main_WeightAveraging_with_surgery.py", {"zero_grad_mode": "None"}, "zero_grad_mode='None'", "'none'"),
    ("eval_single_task.py", {"split": "bogus"}, "split='bogus'", "'test', 'val'"),
    ("convert_checkpoints.py", {"family": "safetensors"}, "family='safetensors'", "'tall_masks'"),
    ("main_AdaMerging.py", {"coefficients": "learned"}, "coefficients='learned'", ".json"),
    ("main_AdaMerging.py", {"coefficients": "/nonexistent/coefs.json"}, "no such file", "'learn'"),
    # ranges
    ("main_TaskArithmetic_with_surgery.py", {"rank": 0}, "rank=0", ">= 1"),
    ("main_AdaMerging.py", {"adamerging_steps": -5}, "adamerging_steps=-5", ">= 1"),
    ("main_AdaMerging.py", {"adamerging_eval_every": 0}, "adamerging_eval_every=0", ">= 1"),
    ("main_AdaMerging_with_surgery.py", {"eval_iterations": 0}, "eval_iterations=0", ">= 1"),
    ("main_AdaMerging_with_surgery.py", {"iterations": 0}, "iterations=0", ">= 1"),
    ("main_AdaMerging.py", {"checkpoint_every": 0}, "checkpoint_every=0", ">= 1"),
    ("main_TaskArithmetic.py", {"batch_size": 0}, "batch_size=0", ">= 1"),
    ("main_AdaMerging.py", {"adamerging_lr": 0.0}, "adamerging_lr=0.0", "> 0.0"),
    ("main_AdaMerging.py", {"prior": 1.5}, "prior=1.5", "<= 1.0"),
    ("main_AdaMerging.py", {"seed": -1}, "seed=-1", ">= 0"),
    ("main_TiesMerging.py", {"k": 0.0}, "k=0.0", "> 0.0"),
    ("main_TiesMerging.py", {"k": 20}, "k=20", "<= 1.0"),
    ("main_TaskArithmetic.py", {"scaling_coef": math.inf}, "scaling_coef=inf", "finite"),
    ("main_TSVMerging.py", {"alpha": math.nan}, "alpha=nan", "finite"),
    ("main_TallMasks.py", {"prun_thre_k": 0}, "prun_thre_k=0", ">= 1"),
    ("main_TallMasks.py", {"tall_lambdas": []}, "tall_lambdas=[]", "non-empty"),
    ("main_TallMasks.py", {"tall_lambdas": [0.2, -0.1]}, "tall_lambdas=[0.2, -0.1]", ">= 0.0"),
    ("main_TaskArithmetic.py", {"tasks": ["MNIST", "MNIST"]}, "tasks=['MNIST', 'MNIST']", "without repeats"),
    ("main_TaskArithmetic.py", {"log_dir": ""}, "log_dir=''", "non-empty"),
    ("main_TaskArithmetic.py", {"dare_p": 1.0}, "dare_p=1.0", "< 1.0"),
    ("main_IsoMerging.py", {"method": "iso"}, "method='iso'", "'iso_cts'"),
    ("main_WUDIMerging.py", {"wudi_solver": "lbfgs"}, "wudi_solver='lbfgs'", "'closed_form'"),
    ("main_WUDIMerging.py", {"wudi_ridge": 0.1}, "wudi_ridge=0.1", "wudi_solver='closed_form'"),
    ("main_PCBMerging.py", {"pcb_ratio": 0.0}, "pcb_ratio=0.0", "> 0.0"),
    # types
    ("main_TiesMerging.py", {"k": "0.2"}, "k='0.2'", "a float or None"),
    ("main_TaskArithmetic.py", {"tasks": "MNIST"}, "tasks='MNIST'", "'TALL14'"),  # not a benchmark name
    ("main_TaskArithmetic.py", {"tasks": 8}, "tasks=8", "a list of strings or a string"),
    ("main_TaskArithmetic.py", {"select_on_val": 1}, "select_on_val=1", "True or False"),
    ("main_TaskArithmetic.py", {"batch_size": 12.0}, "batch_size=12.0", "an int"),
    ("main_TaskArithmetic.py", {"batch_size": True}, "batch_size=True", "an int"),
    ("build_embedded_benchmark.py", {"micro": "yes"}, "micro='yes'", "True or False"),
    # between settings
    ("main_TaskArithmetic_with_surgery.py", {"online": True, "surgery": "v2"}, "online=True", "surgery='v1'"),
    ("main_AdaMerging_with_surgery_online.py", {"surgery": "v2"}, "online=True", "surgery='v1'"),
    # a Surgery base's own settings, refused before the run starts
    ("main_TiesMerging_with_surgery.py", {"preset": "bogus"}, "preset='bogus'", "'ennengyang'"),
    ("main_Surgery.py", {"method_name": "consensus", "tall_lambdas": []}, "tall_lambdas=[]", "non-empty"),
    ("main_Surgery.py", {"method_name": "iso_c", "alpha": math.inf}, "alpha=inf", "finite"),
]


@pytest.mark.parametrize("script,replaced,named,allowed", REFUSED,
                         ids=[f"{s}:{','.join(r)}" for s, r, _, _ in REFUSED])
def test_out_of_range_choice_or_type_is_refused_naming_setting_value_and_what_is_allowed(
        script, replaced, named, allowed):
    with pytest.raises(ConfigError) as err:
        script_config(script, **replaced)
    message = str(err.value)
    assert named in message and allowed in message, message


@pytest.mark.parametrize("script,replaced", [
    ("main_TiesMerging.py", {"k": 1, "scaling_coef": 0.5, "merge": "dis-mean"}),
    ("main_TaskArithmetic.py", {"scaling_coef": -1.0, "tasks": ["MNIST", "DTD"]}),
    ("main_AdaMerging.py", {"prior": 0.0, "adamerging_steps": 1}),
    ("main_TaskArithmetic_with_surgery.py", {"surgery": "v2", "rank": 1}),
    ("main_AdaMerging_with_surgery_online.py", {"method_name": "tw_adamerging"}),
    ("main_Surgery.py", {"method_name": "wudi_merging", "wudi_steps": 3}),
    ("main_TallMasks.py", {"prun_thre_k": 8, "tall_lambdas": (0.5,)}),
])
def test_values_inside_their_range_pass(script, replaced):
    config = script_config(script, **replaced)
    for key, value in replaced.items():
        assert getattr(config, key) == (list(value) if isinstance(value, tuple) else value)


@pytest.mark.parametrize("script", [s for s in SCRIPTS if "device" in script_variables(s)])
def test_every_evaluating_script_defaults_to_the_auto_device_with_tf32_off(script):
    variables = script_variables(script)
    assert (variables["device"], variables["tf32"], variables["num_workers"]) == ("auto", False, "auto")
    assert variables["threads"] == "auto"


def test_auto_is_the_only_word_a_numeric_setting_takes():
    assert script_config("main_TaskArithmetic_with_surgery.py", rank="auto").rank == "auto"
    assert script_config("main_TaskArithmetic.py", num_workers=3).num_workers == 3
    for bad in ("max", -1, 2.5):
        with pytest.raises(ConfigError, match="num_workers"):
            script_config("main_TaskArithmetic.py", num_workers=bad)
    with pytest.raises(ConfigError, match=r"rank=0 .*>= 1.*or 'auto'"):
        script_config("main_TaskArithmetic_with_surgery.py", rank=0)


def test_an_int_given_for_a_float_becomes_a_float():
    config = script_config("main_TiesMerging.py", k=1)
    assert config.k == 1.0 and isinstance(config.k, float)


@pytest.mark.parametrize("base", sorted(registry.bases()))
def test_a_surgery_base_takes_its_own_scripts_defaults_and_what_its_name_fixes(base):
    """main_Surgery.py on `base`: the base method's settings are its own script's variables (one
    place for each default), except what the base's name means (iso_cts: method='iso_cts')."""
    method, fixed = registry.base(base)
    config = script_config("main_Surgery.py", method_name=base)
    own = script_variables(method.script)
    got_method, settings = base_settings(config)
    assert got_method is method
    for f in dataclasses.fields(method.settings):
        expected = fixed.get(f.name, base if f.name == "method_name" else own[f.name])
        assert getattr(settings, f.name) == expected, (base, f.name)


@pytest.mark.parametrize("script,base", [("main_TaskArithmetic_with_surgery.py", "task_arithmetic"),
                                         ("main_TiesMerging_with_surgery.py", "ties_merging"),
                                         ("main_WeightAveraging_with_surgery.py", "weight_averaging"),
                                         ("main_AdaMerging_with_surgery.py", "lw_adamerging"),
                                         ("main_AdaMerging_with_surgery_online.py", "lw_adamerging")])
def test_a_bases_surgery_script_holds_only_its_own_bases_settings(script, base):
    method, _ = registry.base(base)
    variables = set(script_variables(script))
    own = {f.name for f in dataclasses.fields(method.settings)}
    generic = set(script_variables("main_Surgery.py"))
    assert variables == generic | own, sorted(variables ^ (generic | own))
    assert script_config(script).method_name == base


def test_a_setting_the_base_name_fixes_cannot_be_set_otherwise():
    config = script_config("main_Surgery.py", method_name="iso_cts", method="iso_c")
    with pytest.raises(ConfigError, match="method='iso_c' contradicts method_name='iso_cts'"):
        base_settings(config)
    assert base_settings(script_config("main_Surgery.py", method_name="iso_cts"))[1].method == "iso_cts"


def test_the_ta_surgery_script_builds_its_bases_settings():
    config = script_config("main_TaskArithmetic_with_surgery.py", scaling_coef=0.5, val_grid="tsv")
    method, settings = base_settings(config)
    assert method.name == "task_arithmetic" and settings == TaskArithmeticMerge(
        dare_p=0.0, dare_rescale=True, dare_seed=0, scaling_coef=0.5, select_on_val=False, val_grid="tsv")


def test_a_field_declared_without_a_rule_is_a_bug_not_an_input_error():
    @dataclasses.dataclass
    class Sloppy:
        checked: int = setting(ge=0)
        unchecked: int = 3

    with pytest.raises(TypeError, match="Sloppy.unchecked"):
        check(Sloppy(1))
