"""`load_mask=True`: tall_masks' released `TALL_mask_<N>task.npy` (np.save of {task: np.packbits(mask
flattened over the sorted keys of the whole state dict)}) read back as the masks we would compute."""
import numpy as np
import pytest
import torch

from taskmerge.merging.tall_masks import (consensus_mask, load_released_masks, multitask_vector,
                                          released_mask_names, tall_masks)
from taskmerge.storage.safe_pickle import CheckpointError

TASKS = ["Cars", "DTD", "EuroSAT"]


@pytest.fixture
def models():
    gen = torch.Generator().manual_seed(0)
    # key order on purpose not sorted, plus an int buffer that τ_MTL skips but the flat mask covers
    pretrained = {"model.visual.proj": torch.randn(5, 3, generator=gen),
                  "model.visual.conv1.weight": torch.randn(4, 3, 2, 2, generator=gen),
                  "model.visual.class_embedding": torch.randn(7, generator=gen),
                  "model.visual.steps": torch.tensor([3], dtype=torch.int64)}
    experts = {t: {k: v + 0.1 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v.clone()
                   for k, v in pretrained.items()} for t in TASKS}
    return pretrained, experts


def write_released(path, pretrained, tall, tasks=TASKS):
    """As tall_masks' find_optimal_mask saves them: state_dict_to_vector sorts the keys."""
    masks = {}
    for t in tasks:
        m = tall.mask(t)
        flat = [m[k].reshape(-1).numpy() if k in m else np.ones(pretrained[k].numel(), bool)
                for k in sorted(pretrained)]
        masks[t] = np.packbits(np.concatenate(flat))
    np.save(path, masks)


def test_released_masks_are_the_masks_we_compute(models, tmp_path):
    pretrained, experts = models
    tau = multitask_vector(pretrained, experts)
    ours = tall_masks(pretrained, experts, [0.2, 0.4, 0.6], tau_mtl=tau)
    path = tmp_path / released_mask_names(3, False)[0]
    write_released(path, pretrained, ours)
    loaded = load_released_masks(str(path), pretrained, tau, TASKS)
    assert loaded.tasks == TASKS and set(loaded.masks) == set(tau)
    for t in TASKS:
        assert all(torch.equal(loaded.mask(t)[k], ours.mask(t)[k]) for k in tau)
    assert all(torch.equal(consensus_mask(loaded, 2)[k], consensus_mask(ours, 2)[k]) for k in tau)
    # a file of more tasks serves a subset, in the order asked
    sub = load_released_masks(str(path), pretrained, tau, ["EuroSAT", "Cars"])
    assert torch.equal(sub.mask("EuroSAT")["model.visual.proj"], ours.mask("EuroSAT")["model.visual.proj"])


def test_file_names():
    assert released_mask_names(20, False) == ["TALL_mask_20task.npy"]
    assert released_mask_names(8, True) == ["TALL_mask_8task_use_ties.npy", "TALL_mask_8task_use_ties_sum.npy"]


def test_mismatches_are_refused_naming_the_file(models, tmp_path):
    pretrained, experts = models
    tau = multitask_vector(pretrained, experts)
    ours = tall_masks(pretrained, experts, 0.4, tau_mtl=tau)
    path = tmp_path / "TALL_mask_3task.npy"
    write_released(path, pretrained, ours, TASKS[:2])
    with pytest.raises(CheckpointError, match=r"TALL_mask_3task.npy: no mask for EuroSAT \(the file has Cars, DTD\)"):
        load_released_masks(str(path), pretrained, tau, TASKS)
    # masks of a bigger model: one key more
    bigger = dict(pretrained, **{"model.visual.extra": torch.zeros(9)})
    write_released(path, bigger, ours)
    with pytest.raises(CheckpointError, match=r"has 10 bytes \(80 bits\), but the model has 71 parameters over its 4 keys"):
        load_released_masks(str(path), pretrained, tau, TASKS)
    np.save(path, {t: np.zeros(10, dtype=np.int64) for t in TASKS})
    with pytest.raises(CheckpointError, match="the mask of Cars .*uint8"):
        load_released_masks(str(path), pretrained, tau, TASKS)
    np.save(path, np.arange(4))
    with pytest.raises(CheckpointError, match="expected tall_masks' dict"):
        load_released_masks(str(path), pretrained, tau, TASKS)
