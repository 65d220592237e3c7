"""`tasks` as a benchmark name: "TALL8" / "TALL14" / "TALL20" (the first N of the tall_masks order,
tall_masks' `num_tasks=N`) and "PAPER8", in every script's typed config, as an override, and in the
run's setup."""
import pytest
from script_variables import SCRIPTS, script_config, script_variables

from taskmerge.datasets import registry
from taskmerge.runs import setup as run_setup
from taskmerge.runs.config import configure
from taskmerge.storage.checkpoints import CheckpointError
from taskmerge.storage.errors import ConfigError


def test_benchmark_names_are_the_first_n_of_the_tall_masks_order():
    assert run_setup.resolve_tasks("TALL20") == registry.TALL_20 and len(registry.TALL_20) == 20
    assert run_setup.resolve_tasks("TALL14") == registry.TALL_20[:14]
    assert run_setup.resolve_tasks("TALL8") == registry.TALL_20[:8]
    assert run_setup.resolve_tasks("PAPER8") == registry.PAPER_8
    assert run_setup.resolve_tasks(["DTD", "Cars"]) == ["DTD", "Cars"]
    assert run_setup.resolve_tasks([]) is None
    with pytest.raises(ConfigError, match="tasks='TALL12'.*'TALL14'"):
        run_setup.resolve_tasks("TALL12")


SCRIPTS_WITH_TASKS = [s for s in SCRIPTS if "tasks" in script_variables(s)]


@pytest.mark.parametrize("script", SCRIPTS_WITH_TASKS)
def test_every_script_takes_a_benchmark_name(script):
    assert script_config(script, tasks="TALL20").tasks == "TALL20"
    assert script_config(script, tasks=["Cars", "DTD"]).tasks == ["Cars", "DTD"]
    with pytest.raises(ConfigError, match="setting tasks=5"):
        script_config(script, tasks=5)


def test_command_line_override_takes_a_name_for_a_list_default():
    assert configure({"tasks": []}, ["--tasks=TALL14"])["tasks"] == "TALL14"
    assert configure({"tasks": "TALL20"}, ["--tasks=['Cars']"])["tasks"] == ["Cars"]
    with pytest.raises(ConfigError, match="--batch_size=TALL14"):
        configure({"batch_size": 3}, ["--batch_size=TALL14"])


def test_setup_reads_the_named_tasks(tmp_path):
    with pytest.raises(CheckpointError) as e:  # no checkpoints here: the message lists what it looked for
        run_setup.resolve_setup("ViT-B-32", str(tmp_path), str(tmp_path), "TALL20", "folders")
    assert "tasks " + ", ".join(registry.TALL_20) in str(e.value)
    with pytest.raises(ConfigError, match="'TALL99'"):
        run_setup.resolve_setup("ViT-B-32", str(tmp_path), str(tmp_path), "TALL99", "folders")


def test_the_embedded_benchmark_refuses_a_benchmark_name(tmp_path):
    with pytest.raises(ConfigError, match="tasks='TALL14'.*embedded"):
        run_setup.resolve_setup("taskmerge-tiny", str(tmp_path), str(tmp_path), "TALL14", "folders")
