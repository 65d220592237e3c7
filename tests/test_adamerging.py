import math

import pytest
import torch
from training_toys import apply_task_vectors, single_thread, toy_setup  # noqa: F401 (autouse)

from taskmerge.adaptive.adamerging import (AdaMergingConfig, adamerging_step, entropy, evaluate_merged,
                                           train_adamerging)
from taskmerge.adaptive.adaptation_data import TaskImages, sample_batches
from taskmerge.adaptive.functional_merge import MergedEncoder
from taskmerge.models.encoders import build_image_encoder
from taskmerge.runs.reporting import RunLogger


@pytest.fixture(scope="module")
def toy():
    return toy_setup(n=20)


def test_entropy_hand_cases():
    torch.testing.assert_close(entropy(torch.zeros(2, 4)), torch.full((2,), math.log(4)))
    assert entropy(torch.tensor([[50.0, 0.0, 0.0]])).item() < 1e-18
    p = torch.tensor([0.5, 0.25, 0.25])
    torch.testing.assert_close(entropy(p.log()[None]), torch.tensor([1.5 * math.log(2)]))


def test_sampling_is_seeded_and_without_replacement():
    a = sample_batches(40, torch.Generator().manual_seed(3))
    b = sample_batches(40, torch.Generator().manual_seed(3))
    assert [len(x) for x in a] == [16, 16] and all(torch.equal(x, y) for x, y in zip(a, b))
    assert len(torch.cat(a).unique()) == 32
    assert [len(x) for x in sample_batches(20, torch.Generator().manual_seed(0))] == [16, 4]


def test_init_evaluation_equals_task_arithmetic(toy):
    encoder, pre, taus, tasks, images, heads = toy
    merged = MergedEncoder(encoder, pre, taus, mode="layer", init=0.3)
    ta = build_image_encoder("taskmerge-tiny", apply_task_vectors(pre, taus, [0.3] * 3))
    accs = evaluate_merged(merged, tasks, images, heads, batch_size=7)
    for t in tasks:
        with torch.no_grad():
            x = images[t].images
            torch.testing.assert_close(merged(x), ta(x), rtol=1e-5, atol=1e-5)
            expected = (heads[t](ta(x)).argmax(1) == images[t].labels).float().mean().item()
        assert accs[t] == pytest.approx(expected)


def test_step_gradient_equals_one_graph_gradient(toy):
    """Per-batch backward into leaf copies of θ, then one backward through the merge, gives the
    gradient of the originals' single summed loss."""
    encoder, pre, taus, tasks, images, heads = toy
    merged = MergedEncoder(encoder, pre, taus, mode="layer")
    batches = [(heads[t], images[t].images[i:i + 5]) for t in tasks for i in (0, 5)]
    total = adamerging_step(merged, batches)
    ours = merged.lam_raw.grad.clone()
    merged.lam_raw.grad = None
    loss = sum(entropy(h(merged(x))).mean() for h, x in batches)   # 6 graphs alive, one backward
    loss.backward()
    ref = merged.lam_raw.grad
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
    assert total == pytest.approx(loss.item(), rel=1e-5)


def _full_entropy(merged, tasks, images, heads):
    with torch.no_grad():
        return sum(entropy(heads[t](merged(images[t].images))).mean().item() for t in tasks)


def test_entropy_decreases_and_text_rows_stay_at_init(toy, tmp_path):
    encoder, pre, taus, tasks, images, heads = toy
    merged = MergedEncoder(encoder, pre, taus, mode="layer")
    before = _full_entropy(merged, tasks, images, heads)
    # Batches of 10 × 2 cover each 20-image task, so every step sees the full objective.
    config = AdaMergingConfig(steps=6, lr=0.02, batch_size=10, eval_every=3, checkpoint_every=100)
    logger = RunLogger(str(tmp_path / "log.txt"), {"method": "lw_adamerging"}, echo=False)
    result = train_adamerging(merged, tasks, images, heads, config, logger=logger)
    after = _full_entropy(merged, tasks, images, heads)
    assert after < before
    assert result.losses[-1] < result.losses[0]
    text_rows = [j for j, k in enumerate(merged.param_names) if not k.startswith("model.visual.")]
    assert torch.all(merged.lam_raw[text_rows] == 0.3)
    assert torch.all(result.coefficients[:, 0] == 1.0)
    assert [h["step"] for h in result.history] == ["init", 2, 5]
    lines = logger.lines
    assert f"Eval: init:  dataset: {tasks[0]} ACC: {result.history[0]['accs'][tasks[0]]}" in lines
    assert f"Eval: Epoch: 5 dataset: {tasks[2]} ACC: {result.history[-1]['accs'][tasks[2]]}" in lines
    assert any(line.startswith("Eval: init:  Avg ACC:") for line in lines)


class Killed(Exception):
    pass


def _run(toy, folder, kill_at=None, mode="task", logger=None):
    encoder, pre, taus, tasks, images, heads = toy
    merged = MergedEncoder(encoder, pre, taus, mode=mode)
    config = AdaMergingConfig(steps=5, lr=0.05, batch_size=4, eval_every=2, checkpoint_every=2, seed=11)

    def on_step(step):
        if step == kill_at:
            raise Killed

    result = train_adamerging(merged, tasks, images, heads, config, checkpoint_dir=str(folder),
                              run_key={"test": "resume"}, on_step=on_step, logger=logger)
    return merged, result


def test_resume_after_kill_is_bit_identical(toy, tmp_path):
    full, full_result = _run(toy, tmp_path / "a")
    with pytest.raises(Killed):
        _run(toy, tmp_path / "b", kill_at=3)        # last checkpoint at step 2: step 3 is redone
    logger = RunLogger(str(tmp_path / "resumed.txt"), {}, echo=False)
    resumed, resumed_result = _run(toy, tmp_path / "b", logger=logger)
    assert torch.equal(full.lam_raw, resumed.lam_raw)
    # The resumed log is complete: the rounds before the kill are written again.
    assert sum(line.startswith("Eval: init:  dataset:") for line in logger.lines) == 3
    assert any(line.startswith("Resumed AdaMerging") for line in logger.lines)
    assert full_result.history == resumed_result.history
    assert full_result.losses == resumed_result.losses
    assert len(list((tmp_path / "b").glob("adamerging_*.pt"))) == 1


def test_dataset_backed_images_are_read_per_index(toy):
    encoder, pre, taus, tasks, images, heads = toy
    ds = torch.utils.data.TensorDataset(images[tasks[0]].images, images[tasks[0]].labels)
    lazy = TaskImages(ds, preload=False)
    idx = torch.tensor([5, 0, 7])
    assert not lazy.preloaded and torch.equal(lazy.take(idx), images[tasks[0]].images[idx])
    assert torch.equal(lazy.labels, images[tasks[0]].labels)
    assert lazy.fingerprint() == images[tasks[0]].fingerprint()
