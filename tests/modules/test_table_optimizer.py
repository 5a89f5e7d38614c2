"""TableOptimizer (data-parallel plain tables) against fbgemm's fused TBE update of the same table."""
import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from fbgemm_gpu.split_table_batched_embeddings_ops_training import (ComputeDevice, EmbeddingLocation,
                                                                    SplitTableBatchedEmbeddingBagsCodegen)

from ttdist.modules.optim import OptimType, TableOptimizer


@pytest.mark.parametrize("optimizer", ["exact_sgd", "exact_adagrad", "exact_row_wise_adagrad"])
def test_table_optimizer_steps_as_the_fused_kernel(optimizer):
    """Two steps on one table (ids repeated within a bag and across bags; rows 0 and 7 never
    looked up): the weights equal fbgemm's fused update given the same pooled gradients, and the
    state is fbgemm's under fbgemm's name (``<table>.momentum1``), so checkpoints move between them."""
    rows, dim, lr, eps = 9, 8, 0.05, 1e-6
    gen = torch.Generator().manual_seed(0)
    initial = torch.randn(rows, dim, generator=gen)
    tbe = SplitTableBatchedEmbeddingBagsCodegen([(rows, dim, EmbeddingLocation.HOST, ComputeDevice.CPU)],
                                                optimizer=EmbOptimType(optimizer), learning_rate=lr, eps=eps)
    tbe.split_embedding_weights()[0].copy_(initial)
    weight = torch.nn.Parameter(initial.clone())
    table_opt = TableOptimizer([("t_x", weight)], optimizer, lr=lr, eps=eps)
    for _ in range(2):
        indices = torch.tensor([1, 2, 2, 3, 8, 1, 5, 6, 4, 3])
        offsets = torch.tensor([0, 3, 5, 8, 10])
        grad_out = torch.randn(4, dim, generator=gen)
        tbe(indices, offsets).backward(grad_out)
        bag = torch.repeat_interleave(torch.arange(4), offsets.diff())
        weight.grad = torch.zeros(rows, dim).index_add_(0, indices, grad_out[bag])
        table_opt.step()
    torch.testing.assert_close(weight.detach(), tbe.split_embedding_weights()[0], rtol=1e-5, atol=1e-6)
    assert torch.equal(weight[[0, 7]].detach(), initial[[0, 7]])
    if OptimType.parse(optimizer).code == 0:
        assert not table_opt.state[weight]
    else:
        (name, state), = table_opt.state[weight].items()
        assert name == "t_x.momentum1"
        torch.testing.assert_close(state, tbe.split_optimizer_states()[0][0].view(state.shape), rtol=1e-5, atol=1e-7)


def test_table_optimizer_follows_its_param_groups_rate():
    weight = torch.nn.Parameter(torch.zeros(3, 4))
    table_opt = TableOptimizer([("t", weight)], "exact_sgd", lr=0.1, eps=1e-8)
    table_opt.param_groups[0]["lr"] = 0.5  # as the LR schedule sets it
    weight.grad = torch.ones(3, 4)
    table_opt.step()
    assert torch.equal(weight.detach(), torch.full((3, 4), -0.5))
