"""Single-process training of a small DLRM built from ttdist modules alone, on CUDA and on CPU.

No TorchRec, no process group: a bottom MLP over 13 dense features, four TT tables in one
``TableBatchedTTEmbeddingBag`` (sparse=True: the fused EXACT_ROWWISE_ADAGRAD step in backward),
DLRM's pairwise dot interaction and a top MLP, trained on a fixed synthetic batch stream with a
learnable label. The same initial weights and batches run on both devices, in float64 and in
float32; the per-step losses and the final cores are compared (tolerances: LOSS_ATOL).

  python benchmarks/gpu_train_check.py [--steps 50] [--dtypes float64,float32] [--out result.json]
Prints one line per 10 steps and the summary; exits 1 when the CUDA losses leave the tolerance.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import Tensor, nn

import ttdist

NUM_DENSE = 13
TABLE_ROWS = [200_000, 50_000, 10_000, 1_000]
DIM = 16
BATCH = 512
POOLING = 3
# float64: the devices compute the same function, so the losses agree at every step. float32:
# summation-order differences (~1e-7) grow through training (a row-wise Adagrad step normalises
# each slice's gradient, so a slice whose gradient nearly cancels takes an O(lr) step in a
# direction set by rounding); the first steps must agree, later ones are reported.
LOSS_ATOL = {"float64": 1e-9, "float32": 1e-4}
TIGHT_STEPS = {"float64": None, "float32": 10}  # steps held to the tolerance (None: all)
DTYPES = {"float64": torch.float64, "float32": torch.float32}


class SmallDLRM(nn.Module):
    """DLRM: bottom MLP, TT embeddings, pairwise dot interaction, top MLP -> logit [B]."""

    def __init__(self, generator: torch.Generator, dtype: torch.dtype) -> None:
        super().__init__()
        self.bottom = nn.Sequential(nn.Linear(NUM_DENSE, 64), nn.ReLU(), nn.Linear(64, DIM), nn.ReLU())
        self.tables = ttdist.TableBatchedTTEmbeddingBag(
            len(TABLE_ROWS), TABLE_ROWS, DIM, [8, 8], mode="sum", sparse=True,
            optimizer="exact_row_wise_adagrad", learning_rate=0.2, eps=1e-8, include_last_offset=True,
            generators=[generator] * len(TABLE_ROWS), dtype=dtype)
        num_vectors = len(TABLE_ROWS) + 1
        self.top = nn.Sequential(nn.Linear(DIM + num_vectors * (num_vectors - 1) // 2, 32), nn.ReLU(),
                                 nn.Linear(32, 1))
        self.bottom.to(dtype)
        self.top.to(dtype)

    def forward(self, dense: Tensor, indices: Tensor, offsets: Tensor) -> Tensor:
        x = self.bottom(dense)
        pooled = self.tables(indices, offsets).view(dense.shape[0], len(TABLE_ROWS), DIM)
        vectors = torch.cat([x.unsqueeze(1), pooled], dim=1)  # (B, T + 1, D)
        dots = torch.bmm(vectors, vectors.transpose(1, 2))
        i, j = torch.triu_indices(vectors.shape[1], vectors.shape[1], offset=1)
        return self.top(torch.cat([x, dots[:, i, j]], dim=1)).squeeze(1)


def make_batches(steps: int, seed: int = 0) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
    """(dense [B, 13], indices [T * B * POOLING], offsets [T * B + 1], labels [B]) per step, CPU."""
    g = torch.Generator().manual_seed(seed)
    teacher_dense = torch.randn(NUM_DENSE, generator=g)
    teacher_rows = [torch.randn(rows, generator=g) for rows in TABLE_ROWS]
    batches = []
    for _ in range(steps):
        dense = torch.randn(BATCH, NUM_DENSE, generator=g)
        ids = [(torch.rand(BATCH, POOLING, generator=g) ** 3 * rows).long().clamp(max=rows - 1)  # skewed: hot rows
               for rows in TABLE_ROWS]
        logit = dense @ teacher_dense * 0.5 + sum(t[i].sum(1) * 0.5 for t, i in zip(teacher_rows, ids))
        labels = torch.bernoulli(torch.sigmoid(logit), generator=g)
        indices = torch.cat([i.reshape(-1) for i in ids])
        offsets = torch.arange(0, indices.numel() + 1, POOLING)
        batches.append((dense, indices, offsets, labels))
    return batches


def train(model: nn.Module, batches: list, device: str, dtype: torch.dtype) -> tuple[list[float], float]:
    """Trains on ``device``; returns the per-step losses and the seconds per step."""
    model = model.to(device)
    dense_params = [p for n, p in model.named_parameters() if not n.startswith("tables.")]
    opt = torch.optim.Adam(dense_params, lr=0.01)
    losses = []
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for dense, indices, offsets, labels in batches:
        dense, indices, offsets, labels = (t.to(device, non_blocking=True) for t in (dense, indices, offsets, labels))
        dense, labels = dense.to(dtype), labels.to(dtype)
        loss = nn.functional.binary_cross_entropy_with_logits(model(dense, indices, offsets), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    sync()
    seconds = (time.perf_counter() - t0) / len(batches)
    ttdist.ops.check_errors(torch.device(device))
    return [float(x) for x in losses], seconds


def compare(batches: list, dtype_name: str) -> dict:
    """The same model and batches on CPU and CUDA in ``dtype_name``; losses, core drift, timing."""
    dtype = DTYPES[dtype_name]
    cpu_model = SmallDLRM(torch.Generator().manual_seed(1), dtype)
    cuda_model = SmallDLRM(torch.Generator().manual_seed(1), dtype)
    cuda_model.load_state_dict(cpu_model.state_dict())
    cpu_losses, cpu_s = train(cpu_model, batches, "cpu", dtype)
    cuda_losses, cuda_s = train(cuda_model, batches, "cuda", dtype)
    diffs = [abs(a - b) for a, b in zip(cuda_losses, cpu_losses)]
    tight = diffs[: TIGHT_STEPS[dtype_name]]
    core_diff = max(float((a.detach().cpu() - b.detach()).abs().max() / b.detach().abs().max().clamp(min=1e-30))
                    for a, b in zip(cuda_model.tables.tt_cores, cpu_model.tables.tt_cores))
    ok = max(tight) <= LOSS_ATOL[dtype_name]
    for step in range(0, len(batches), 10):
        print(f"{dtype_name} step {step:3d}: loss cpu {cpu_losses[step]:.9f} cuda {cuda_losses[step]:.9f}")
    print(f"gpu_train_check {dtype_name}: {'OK' if ok else 'FAILED'}: loss {cpu_losses[0]:.4f} -> "
          f"cpu {cpu_losses[-1]:.6f} / cuda {cuda_losses[-1]:.6f}; max |loss diff| {max(tight):.2e} over the first "
          f"{len(tight)} steps (tolerance {LOSS_ATOL[dtype_name]:g}), {max(diffs):.2e} over all; max relative core "
          f"diff {core_diff:.2e}; {cpu_s * 1e3:.1f} ms/step CPU, {cuda_s * 1e3:.1f} ms/step CUDA", flush=True)
    return {"loss_cpu": cpu_losses, "loss_cuda": cuda_losses, "max_abs_loss_diff_checked": max(tight),
            "checked_steps": len(tight), "max_abs_loss_diff_all": max(diffs), "loss_atol": LOSS_ATOL[dtype_name],
            "max_rel_core_diff": core_diff, "ok": ok, "ms_per_step_cpu": cpu_s * 1e3, "ms_per_step_cuda": cuda_s * 1e3}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--dtypes", default="float64,float32")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_train_check: skipped (no CUDA device)")
        return 0
    torch.backends.cuda.matmul.allow_tf32 = False  # compare fp32 with fp32
    batches = make_batches(args.steps)
    runs = {name: compare(batches, name) for name in args.dtypes.split(",")}
    summary = {"steps": args.steps, "batch": BATCH, "tables": TABLE_ROWS, "dim": DIM, "tt_ranks": [8, 8],
               "optimizer": "fused exact_row_wise_adagrad lr 0.2 (TT), Adam lr 0.01 (MLPs)",
               "device_name": torch.cuda.get_device_name(), "runs": runs}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2))
    return 0 if all(r["ok"] for r in runs.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
