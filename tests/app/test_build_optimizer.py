"""The app's optimizers: a data-parallel plain table the plan names must be one of the model's
parameters, or it would silently train with the MLPs' optimizer."""
from types import SimpleNamespace

import pytest
import torch
from torchrec.distributed.types import ParameterSharding, ShardingPlan

from ttdist.config import OptimConfig
from ttdist.session import build_optimizer


def test_a_replicated_table_missing_from_the_model_is_named():
    plan = ShardingPlan({"sparse.ebc": {"t_cat_0": ParameterSharding(sharding_type="data_parallel",
                                                                      compute_kernel="dense", ranks=[0])}})
    model = SimpleNamespace(plan=plan, named_parameters=lambda: iter([("mlp.weight", torch.nn.Parameter(torch.zeros(2)))]))
    with pytest.raises(RuntimeError, match=r"sparse\.ebc\.embedding_bags\.t_cat_0\.weight"):
        build_optimizer(model, OptimConfig())
