"""The eval AUC: ttdist.metrics.roc_auc against a pairwise count and torchmetrics' binary_auroc."""
import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from ttdist.metrics import roc_auc


def pairwise_auc(score: torch.Tensor, label: torch.Tensor) -> float:
    """P(positive outscores negative), ties half: every (positive, negative) pair counted."""
    pos, neg = score[label == 1].double(), score[label == 0].double()
    wins = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()
    return float(wins.mean())


@pytest.mark.parametrize("levels", [None, 7, 2])  # continuous scores, many ties, two values only
def test_roc_auc_equals_the_pairwise_count_and_torchmetrics(levels):
    g = torch.Generator().manual_seed(levels or 0)
    label = (torch.rand(3000, generator=g) < 0.3).float()
    score = torch.randn(3000, generator=g) + label  # informative but overlapping classes
    if levels is not None:
        score = torch.round(score * levels / 4)
    expected = pairwise_auc(score, label)
    assert 0.6 < expected < 0.9
    assert roc_auc(score, label) == pytest.approx(expected, abs=1e-12)
    assert roc_auc(score, label) == pytest.approx(float(binary_auroc(torch.sigmoid(score), label.long())), abs=1e-6)


def test_roc_auc_of_small_cases():
    label = torch.tensor([0.0, 0.0, 1.0, 1.0])
    assert roc_auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), label) == 0.75
    assert roc_auc(torch.tensor([0.0, 1.0, 2.0, 3.0]), label) == 1.0
    assert roc_auc(torch.tensor([3.0, 2.0, 1.0, 0.0]), label) == 0.0
    assert roc_auc(torch.zeros(4), label) == 0.5
