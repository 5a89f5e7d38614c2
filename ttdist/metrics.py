"""Evaluation metrics gathered across ranks, and the run's metrics log."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Iterable, Optional

import torch
import torch.distributed as dist


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable, device: torch.device) -> dict[str, Optional[float]]:
    """AUC, logloss and accuracy of ``model`` over every rank's eval batches (all ranks get them).
    AUC is None when the eval labels hold one class only (undefined; a note is printed)."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for batch in batches:
        batch = batch.to(device)
        logits.append(model(batch.dense_features, batch.sparse_features).squeeze(-1).float())
        labels.append(batch.labels.float())
    model.train(was_training)
    local = torch.stack([torch.cat(logits), torch.cat(labels)]) if logits else torch.zeros(2, 0, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, local)
        local = torch.cat(gathered, dim=1)
    logit, label = local[0].cpu(), local[1].cpu()
    return {
        "auc": _auc(logit, label),
        "logloss": float(torch.nn.functional.binary_cross_entropy_with_logits(logit, label)),
        "accuracy": float(((logit > 0).float() == label).float().mean()),
        "eval_samples": int(label.numel()),
    }


def _auc(logit: torch.Tensor, label: torch.Tensor) -> Optional[float]:
    """ROC AUC, or None (null in summary.json) when the labels hold only one class: AUC is then
    undefined (torchmetrics would return 0.0, which reads as a score). Rank 0 prints a note."""
    classes = torch.unique(label).tolist()
    if len(classes) == 2:
        return roc_auc(logit, label)
    if not dist.is_initialized() or dist.get_rank() == 0:
        which = f"all have label {int(classes[0])}" if classes else "are none"
        print(f"note: eval AUC is undefined: the {label.numel()} eval samples {which} (AUC needs both classes); "
              "reported as null", file=sys.stderr, flush=True)
    return None


def roc_auc(score: torch.Tensor, label: torch.Tensor) -> float:
    """Area under the ROC curve of ``score`` [N] for 0/1 ``label`` [N], both classes present: the
    probability that a positive outscores a negative, ties counting half (Mann-Whitney U over
    mid-ranks), which is the trapezoidal ROC area torchmetrics' ``binary_auroc`` computes. Here
    rather than torchmetrics, whose import costs every rank about a second at start-up."""
    sorted_score, order = torch.sort(score)
    _, group, counts = torch.unique_consecutive(sorted_score, return_inverse=True, return_counts=True)
    counts = counts.double()
    mid_rank = (counts.cumsum(0) - (counts - 1) / 2)[group]  # 1-based rank, averaged over ties
    positive = label[order] > 0.5
    n_pos = positive.sum().double()
    n_neg = label.numel() - n_pos
    return float((mid_rank[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl`` (rank 0 only)."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def write(self, **record) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
