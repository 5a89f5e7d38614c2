"""The TT collection's fused optimizer from the sharder's fused_params and apply_optimizer_in_backward."""
import pytest
import torch
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

import ttdist
from ttdist.distributed import TTEmbeddingBagCollectionSharder
from ttdist.distributed.fused_params import TTFusedParams, resolve_fused_params
from ttdist.modules.optim import OptimType


def collection() -> ttdist.TTEmbeddingBagCollection:
    return ttdist.TTEmbeddingBagCollection([
        ttdist.TTEmbeddingBagConfig(name=n, num_embeddings=100, embedding_dim=8, feature_names=[f"f_{n}"],
                                    tt_ranks=[4]) for n in ("a", "b")])


@pytest.mark.parametrize("optimizer_class, kwargs, expected", [
    (torch.optim.SGD, {"lr": 0.3}, TTFusedParams(OptimType.EXACT_SGD, 0.3, 1e-10)),
    (torch.optim.Adagrad, {"lr": 0.2, "eps": 1e-6}, TTFusedParams(OptimType.EXACT_ADAGRAD, 0.2, 1e-6)),
    (RowWiseAdagrad, {"lr": 0.05}, TTFusedParams(OptimType.EXACT_ROWWISE_ADAGRAD, 0.05, 1e-10)),
])
def test_apply_optimizer_in_backward_becomes_the_fused_optimizer(optimizer_class, kwargs, expected):
    module = collection()
    apply_optimizer_in_backward(optimizer_class, module.parameters(), kwargs)
    assert resolve_fused_params(module.table_parameters(), None) == expected
    assert resolve_fused_params(module.table_parameters(), {"optimizer": expected.optimizer,
                                                            "learning_rate": expected.learning_rate,
                                                            "eps": expected.eps}) == expected


def test_fused_params_alone_and_torchrec_default():
    module = collection()
    assert resolve_fused_params(module.table_parameters(), {"optimizer": "exact_adagrad", "learning_rate": 0.5}) == \
        TTFusedParams(OptimType.EXACT_ADAGRAD, 0.5, 1e-10)
    assert resolve_fused_params(module.table_parameters(), None) == TTFusedParams(OptimType.EXACT_SGD, 0.01, 1e-10)


@pytest.mark.parametrize("optimizer_class, kwargs, message", [
    (torch.optim.Adam, {"lr": 0.1}, r"table 'a': apply_optimizer_in_backward\(torch.optim.adam.Adam\) has no fused TT "
                                    r"kernel"),
    (torch.optim.Adagrad, {"lr": 0.1, "weight_decay": 0.01}, r"table 'a': Adagrad\(weight_decay=0.01\) is not supported"),
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}, r"table 'a': SGD\(momentum=0.9\) is not supported"),
])
def test_unsupported_in_backward_optimizers_raise_naming_table_and_option(optimizer_class, kwargs, message):
    module = collection()
    apply_optimizer_in_backward(optimizer_class, module.parameters(), kwargs)
    with pytest.raises(ValueError, match=message):
        resolve_fused_params(module.table_parameters(), None)


def test_disagreements_raise():
    module = collection()
    apply_optimizer_in_backward(torch.optim.Adagrad, module.parameters(), {"lr": 0.1})
    with pytest.raises(ValueError, match=r"fused_params .* disagree with the optimizer that apply_optimizer_in_backward"):
        resolve_fused_params(module.table_parameters(), {"optimizer": "exact_sgd", "learning_rate": 0.1})
    mixed = collection()
    apply_optimizer_in_backward(torch.optim.Adagrad, mixed.table_parameters()[0][1], {"lr": 0.1})
    apply_optimizer_in_backward(torch.optim.SGD, mixed.table_parameters()[1][1], {"lr": 0.1})
    with pytest.raises(ValueError, match="must share one fused optimizer"):
        resolve_fused_params(mixed.table_parameters(), None)
    with pytest.raises(ValueError, match=r"fused_params \['weight_decay'\] are not supported"):
        TTEmbeddingBagCollectionSharder(fused_params={"optimizer": "exact_sgd", "weight_decay": 0.1})


def test_row_wise_adagrad_in_backward_keeps_column_wise_out_of_the_planner():
    module = collection()
    apply_optimizer_in_backward(RowWiseAdagrad, module.parameters(), {"lr": 0.1})
    sharder = TTEmbeddingBagCollectionSharder()
    assert "column_wise" in sharder.sharding_types("cpu")
    sharder.shardable_parameters(module)
    assert "column_wise" not in sharder.sharding_types("cpu")
