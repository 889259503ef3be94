"""The training module's handling of unknown labels (NaN targets): the masked
loss, the validation counts, synthetic cracks, and (slow) a whole run."""

import json
import math

import pytest
import torch
from helpers import write_partly_unknown_csv
from torch import nn

from elcell.training.augment import SyntheticCracks
from elcell.training.lightning_module import ELCellModule, LabelF1

# PyTorch on one thread (conftest.one_thread): no OpenMP stalls on a shared machine
pytestmark = pytest.mark.usefixtures("one_thread")

NAN = math.nan
POS_WEIGHT = [2.0, 3.0]


@pytest.fixture(scope="module")
def module() -> ELCellModule:
    return ELCellModule("test_resnet", ["crack", "inactive"], mean=0.5, std=0.2, pos_weight=POS_WEIGHT)


def bce(logit: float, target: float, pos_weight: float) -> float:
    """Weighted binary cross-entropy of one entry, written out."""
    p = 1 / (1 + math.exp(-logit))
    return -(pos_weight * target * math.log(p) + (1 - target) * math.log(1 - p))


def test_loss_is_the_mean_over_the_known_entries_only(module):
    logits = torch.tensor([[1.5, -0.5], [-2.0, 0.3], [0.7, 2.2]], requires_grad=True)
    targets = torch.tensor([[1.0, NAN], [NAN, 0.0], [0.0, 1.0]])
    loss = module.loss(logits, targets)
    known = [(0, 0), (1, 1), (2, 0), (2, 1)]
    expected = sum(bce(logits[i, j].item(), targets[i, j].item(), POS_WEIGHT[j]) for i, j in known) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad[0, 1] == 0 and logits.grad[1, 0] == 0  # an unknown label teaches nothing
    assert all(logits.grad[i, j] != 0 for i, j in known)


def test_with_every_label_known_the_loss_is_bce_with_logits_mean(module):
    torch.manual_seed(0)
    logits, targets = torch.randn(8, 2), (torch.rand(8, 2) > 0.5).float()
    reference = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(POS_WEIGHT))(logits, targets)
    assert module.loss(logits, targets).item() == pytest.approx(reference.item(), rel=1e-6)


def test_a_batch_with_nothing_known_gives_zero_loss_and_zero_gradient(module):
    logits = torch.randn(3, 2, requires_grad=True)
    loss = module.loss(logits, torch.full((3, 2), NAN))
    loss.backward()
    assert loss.item() == 0 and torch.equal(logits.grad, torch.zeros(3, 2))


def test_unknown_targets_do_not_poison_the_backward_pass_through_the_network(module):
    torch.manual_seed(1)
    images = torch.randn(4, 1, 32, 32)
    targets = torch.tensor([[1.0, NAN], [0.0, 0.0], [NAN, 1.0], [0.0, NAN]])
    module.zero_grad()
    module.train()
    module.loss(module(images), targets).backward()
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_label_f1_counts_only_known_cells():
    probs = torch.tensor([[0.9, 0.9], [0.1, 0.9], [0.8, 0.2], [0.2, 0.1], [0.9, 0.7]])
    targets = torch.tensor([[1.0, NAN], [1.0, NAN], [0.0, NAN], [NAN, NAN], [NAN, NAN]])
    scores = LabelF1(2)
    scores.update(probs, targets)
    assert scores.tp.tolist() == [1, 0] and scores.fn.tolist() == [1, 0]
    assert scores.fp.tolist() == [1, 0] and scores.tn.tolist() == [0, 0]
    result = scores.compute()
    assert result["f1"][0].item() == pytest.approx(0.5)
    # the label no cell knows is left out of the mean rather than scored 0
    assert result["mean_f1"].item() == pytest.approx(0.5)
    assert result["weighted_f1"].item() == pytest.approx(0.5)


def test_synthetic_cracks_only_on_cells_known_to_be_crack_free():
    torch.manual_seed(0)
    images = torch.rand(3, 1, 32, 32)
    targets = torch.tensor([[NAN, 0.0], [0.0, NAN], [1.0, 0.0]])
    out, marked = SyntheticCracks(p=1.0, label=0, shape="line", inactive_label=1)(images, targets)
    assert torch.equal(out[0], images[0]) and torch.isnan(marked[0, 0])  # unknown: maybe cracked already
    assert not torch.equal(out[1], images[1]) and marked[1, 0] == 1
    assert torch.isnan(marked[1, 1])  # a line crack darkens no area: inactive stays unknown
    assert torch.equal(out[2], images[2])


@pytest.mark.slow
def test_a_run_on_partly_unknown_labels_trains_and_reports_them(tmp_path, seed_csv):
    """End to end: split, pos_weight, masked loss, validation F1, val.csv and the
    evaluation of the exported model, with crack unknown on a third of the cells
    and inactive on the rest."""
    from elcell.cells.labels import read_labels_csv
    from elcell.training.config import TrainConfig
    from elcell.training.train import train

    data = write_partly_unknown_csv(tmp_path, seed_csv)
    out = tmp_path / "run"
    summary = train(TrainConfig.from_recipe("spec", data=str(data), out=str(out), backbone="test_resnet",
                                            pretrained="none", image_size=64, batch_size=16, epochs=1, lr=1e-3,
                                            val_fraction=0.25, progress=False))
    assert math.isfinite(summary["best_val_f1"])
    losses = (out / "metrics.csv").read_text()
    assert "nan" not in losses.lower()
    val = read_labels_csv(out / "val.csv")
    assert (~val.known).any(axis=0).all()  # both labels have unknown cells there, read back as unknown
    metrics = json.loads((out / "eval" / "val" / "metrics.json").read_text())
    for label in ("crack", "inactive"):
        m = metrics["per_label"][label]
        assert m["unknown"] == int((~val.known[:, val.names.index(label)]).sum()) > 0
        assert m["cells"] + m["unknown"] == len(val)
