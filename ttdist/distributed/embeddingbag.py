"""``ShardedTTEmbeddingBagCollection`` and its TorchRec sharder.

The sharded twin of ``ttdist.TTEmbeddingBagCollection``, built from it (its configs and
cores) by ``TTEmbeddingBagCollectionSharder.shard``. It implements TorchRec's ``ShardedModule``
pipeline, with TorchRec's types, so ``DistributedModelParallel`` and ``TrainPipelineSparseDist``
drive it as they drive a sharded ``EmbeddingBagCollection``:

* ``input_dist`` -> ``KJTListSplitsAwaitable``: one KJT all-to-all per sharding-type group
  (``ttdist.distributed.dists``, each group's ``KJTAllToAll`` in ``_input_dists[g]._dist``, where
  the pipeline fuses the splits all-to-alls of all modules);
* ``compute`` (``KJTList`` -> one tensor per group): each group's local shards are TT tables
  (a shard of a TT table is itself a TT table) looked up by ``ttdist.ops.tt_lookup``, the op and
  fused backward of the single-device module;
* ``output_dist``: pooled all-to-all (the butterfly shuffle; TorchRec's qcomm codecs apply) ->
  KeyedTensor whose keys follow the sharding, as a sharded TorchRec EBC's do (groups in order,
  table-/column-wise features by owning rank); config order only where a feature's column shards
  must be put back together. Read it by key (``to_dict()``), as DLRM does.

Training is fused, as in TorchRec: the optimizer comes from the sharder's ``fused_params`` or
from ``apply_optimizer_in_backward`` (``ttdist.distributed.fused_params``) and runs inside
backward. A core that only this rank trains (every core of a table-wise table, a row-/column-wise
shard's slice of G_1) is updated by the fused kernel. A core that several ranks hold (G_2..G_d of
row-/column-wise tables, every core of a data-parallel one) is *replicated*: its gradient is
handed to a hook, and after the last lookup's backward one all-reduce of all replicated
gradients (data-parallel ones averaged) precedes their update, so the replicas stay equal. The
pooled all-to-all divides gradients by W (TorchRec's gradient division), so with a per-rank mean
loss the cores see the gradient of the global mean loss — as one process on the global batch.

State: the model's ``state_dict()`` holds the weights only, per table and stable across plans and
world sizes: ``embedding_bags.<table>.tt_cores.<k>`` (a ``ShardedTensor`` where the core is split,
the full core where every rank holds it), the same keys on every rank, so
``torch.distributed.checkpoint`` saves and reshards it. The optimizer state lives in
``fused_optimizer`` (``dmp.fused_optimizer``), keyed by the same names.
"""
from __future__ import annotations

import bisect
import math
from typing import Any, Optional, Type

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd import Variable
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties
from torchrec.distributed.embedding_sharding import KJTListSplitsAwaitable
from torchrec.distributed.embedding_types import EmbeddingComputeKernel, KJTList
from torchrec.distributed.types import (Awaitable, EmbeddingModuleShardingPlan, LazyAwaitable,
                                        ModuleSharder, ShardedModule, ShardingEnv)
from torchrec.optim.fused import FusedOptimizer, FusedOptimizerModule
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor
from torchrec.streamable import Multistreamable

from ttdist.distributed.dists import DpDist, RwDist, TwCwDist, Unit, permute_features, pooled_codecs
from ttdist.distributed.fused_params import TTFusedParams, resolve_fused_params
from ttdist.distributed.shard_layout import (COLUMN_WISE, DATA_PARALLEL, ROW_WISE, TABLE_WISE, TTShard,
                                             replicated_cores, row_block, table_shards)
from ttdist.modules.collection import (TTEmbeddingBagCollection, TTEmbeddingBagConfig, check_kjt_layout,
                                       feature_positions, pooling_name, table_state_key)
from ttdist.modules.optim import OptimType, optimizer_state_like
from ttdist.modules.tt_init import init_tt_cores, table_generator
from ttdist.ops import POOLING_CODES, POOLING_SUM, FusedUpdate, LookupSpec, apply_updates, bag_scales, tt_lookup

# EmbeddingComputeKernel is a closed enum that the planner validates; CUSTOMIZED_KERNEL is the
# value TorchRec reserves for kernels it does not implement (claiming FUSED would make the
# planner model ttdist's kernel as fbgemm's TBE).
TT_COMPUTE_KERNEL = EmbeddingComputeKernel.CUSTOMIZED_KERNEL.value


class TTEmbeddingBagCollectionSharder(ModuleSharder[TTEmbeddingBagCollection]):
    """Shards ``TTEmbeddingBagCollection`` tables table-, row-, column-wise or data-parallel.

    The fused optimizer: ``fused_params`` as TorchRec's (``{"optimizer": EmbOptimType.EXACT_SGD |
    EXACT_ADAGRAD | EXACT_ROWWISE_ADAGRAD, "learning_rate": float, "eps": float}``) or what
    ``apply_optimizer_in_backward`` attached to the collection's parameters (see
    ``ttdist.distributed.fused_params``). ``qcomm_codecs_registry``: TorchRec's, for the pooled
    all-to-all. ``raise_on_every_rank``: bad input on one rank raises on every rank in the same
    forward, at the cost of one all-reduce per forward (for debugging; off, the rank with the bad
    input raises before any collective and the others' next collective fails).
    """

    def __init__(self, fused_params: Optional[dict[str, Any]] = None, qcomm_codecs_registry=None,
                 raise_on_every_rank: bool = False) -> None:
        super().__init__(qcomm_codecs_registry=qcomm_codecs_registry)
        self._raise_on_every_rank = raise_on_every_rank
        self._fused_params = dict(fused_params) if fused_params is not None else None
        self._optimizer = resolve_fused_params([], self._fused_params).optimizer

    @property
    def fused_params(self) -> Optional[dict[str, Any]]:
        return self._fused_params

    @property
    def module_type(self) -> Type[TTEmbeddingBagCollection]:
        return TTEmbeddingBagCollection

    def shardable_parameters(self, module: TTEmbeddingBagCollection) -> dict[str, nn.Parameter]:
        """A 2-D meta proxy ``[num_embeddings, dim]`` per table (the planner needs 2-D
        parameters); the real byte counts come from ``ttdist.distributed.planner``'s estimator."""
        self._optimizer = resolve_fused_params(module.table_parameters(), self._fused_params).optimizer
        return {c.name: nn.Parameter(torch.empty(c.num_embeddings, c.embedding_dim, device="meta"), requires_grad=False)
                for c in module.embedding_bag_configs()}

    def sharding_types(self, compute_device_type: str) -> list[str]:
        """All four, except column_wise under row-wise Adagrad (its per-slice state would be split)."""
        types = [TABLE_WISE, ROW_WISE, COLUMN_WISE, DATA_PARALLEL]
        if self._optimizer == OptimType.EXACT_ROWWISE_ADAGRAD:
            types.remove(COLUMN_WISE)
        return types

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> list[str]:
        return [TT_COMPUTE_KERNEL]

    def shard(self, module: TTEmbeddingBagCollection, params: EmbeddingModuleShardingPlan, env: ShardingEnv,
              device: Optional[torch.device] = None, module_fqn: Optional[str] = None
              ) -> "ShardedTTEmbeddingBagCollection":
        fused = resolve_fused_params(module.table_parameters(), self._fused_params)
        return ShardedTTEmbeddingBagCollection(module, params, env, device or torch.device("cpu"), fused,
                                               self.qcomm_codecs_registry, self._raise_on_every_rank)


class TTShardingContext(Multistreamable):
    """Per-batch state between the pipeline steps (the local batch size; no tensors, so there
    is nothing to record on another stream)."""

    def __init__(self) -> None:
        self.batch_size = 0

    def record_stream(self, stream) -> None:
        pass


def core_key(t: int, k: int, shard: int = 0) -> str:
    """The internal name of this rank's copy of core k of table t (G_1: of shard ``shard``)."""
    return f"t{t}_c0_s{shard}" if k == 0 else f"t{t}_c{k}"


class _ReplicaSync(torch.autograd.Function):
    """Every lookup of a step takes this node's output as its anchor, so this node's backward
    runs once all their backwards have handed over the replicated cores' gradients: it starts
    their all-reduce, applied when the backward pass ends. Every rank has it, so every rank
    joins the all-reduce."""

    @staticmethod
    def forward(ctx, module: "ShardedTTEmbeddingBagCollection", anchor: Tensor) -> Tensor:
        ctx.module = module
        return anchor.new_zeros(0)

    @staticmethod
    def backward(ctx, grad: Tensor):
        ctx.module._update_replicas()
        return None, None


class _GroupLookup:
    """This rank's lookups of one sharding-type group: the units (feature, shard) it computes,
    as one table-batched TT lookup per kind of core ownership (owned: fused update in the kernel;
    replicated: gradients to the module's hook). Output: [B_in, sum of the local units' dims]."""

    def __init__(self, module: "ShardedTTEmbeddingBagCollection", units: list[Unit], dims: list[int],
                 row_wise: bool) -> None:
        self._module = module
        self.dims = dims
        calls: dict[bool, dict] = {}
        for pos, u in enumerate(units):
            shard = u.shard_index if u.rank >= 0 else (module._rank if row_wise else 0)
            first = core_key(u.table, 0, shard)
            if first not in module._cores:
                continue  # a row-wise shard past the end of G_1: no index can reach it
            call = calls.setdefault(module._sharding_type[u.table] != TABLE_WISE,
                                    {"tables": {}, "positions": [], "ftm": [], "modes": []})
            if (u.table, shard) not in call["tables"]:
                call["tables"][(u.table, shard)] = [first] + [core_key(u.table, k) for k in
                                                             range(1, module._shapes[u.table].d)]
            call["positions"].append(pos)
            call["ftm"].append(list(call["tables"]).index((u.table, shard)))
            call["modes"].append(POOLING_SUM if row_wise else POOLING_CODES[pooling_name(module._configs[u.table])])
        self._calls = []
        for replicated, c in sorted(calls.items()):
            tables = list(c["tables"])
            rows = tuple(module._shards[t][s].local_shape(module._shapes[t]).num_embeddings for t, s in tables)
            spec = LookupSpec(tuple(module._shapes[t].d for t, _ in tables), tuple(c["ftm"]), tuple(c["modes"]), rows)
            keys = [k for ks in c["tables"].values() for k in ks]
            self._calls.append((replicated, keys, spec, c["positions"]))
        self._offsets = [sum(dims[:i]) for i in range(len(dims) + 1)]

    def __call__(self, kjt: KeyedJaggedTensor, anchor: Tensor, lr: float) -> Tensor:
        batch = kjt.stride()
        if len(self._calls) == 1 and self._calls[0][3] == list(range(len(self.dims))):
            return self._lookup(self._calls[0], kjt, anchor, lr)
        blocks: list[Optional[Tensor]] = [None] * len(self.dims)
        for call in self._calls:
            pooled = self._lookup(call, kjt.permute(call[3]), anchor, lr)
            for pos, block in zip(call[3], pooled.split([self.dims[p] for p in call[3]], dim=1)):
                blocks[pos] = block
        zeros = anchor.sum().expand(batch, 0)  # keeps the output in the graph (see _ReplicaSync)
        return torch.cat([zeros] + [b if b is not None else zeros.new_zeros(batch, d)
                                    for b, d in zip(blocks, self.dims)], dim=1)

    def _lookup(self, call, kjt: KeyedJaggedTensor, anchor: Tensor, lr: float) -> Tensor:
        replicated, keys, spec, _ = call
        m = self._module
        fused = FusedUpdate(m._fused.optimizer.code, lr, m._fused.eps, tuple(m._states[k] for k in keys),
                            grad_hook=m._take_grads if replicated else None)
        return tt_lookup([m._cores[k] for k in keys], spec, kjt.values(), kjt.offsets(), kjt.weights_or_none(),
                         fused, anchor)


class ShardedTTEmbeddingBagCollection(ShardedModule[KJTList, list[Tensor], KeyedTensor, TTShardingContext],
                                      FusedOptimizerModule):
    """Sharded TT collection (see the module docstring)."""

    def __init__(self, module: TTEmbeddingBagCollection, plan: EmbeddingModuleShardingPlan, env: ShardingEnv,
                 device: torch.device, fused: TTFusedParams, qcomm_codecs_registry=None,
                 raise_on_every_rank: bool = False) -> None:
        super().__init__(qcomm_codecs_registry=qcomm_codecs_registry)
        self._raise_on_every_rank = raise_on_every_rank
        self._pg, self._world, self._rank = env.process_group, env.world_size, env.rank
        self._device = device
        self._configs: list[TTEmbeddingBagConfig] = list(module.embedding_bag_configs())
        cached = [c.name for c in self._configs if c.use_cache]
        if cached:
            raise ValueError(f"tables {cached} set use_cache=True, which sharded TT tables do not support (the row "
                             "cache is a single-device feature); set use_cache=False for sharded training")
        self._shapes = [c.tt_shape() for c in self._configs]
        self._is_weighted = module.is_weighted()
        self._dtype = module.tt_tables.dtype
        self.feature_names = list(module.feature_names)
        self._feature_tables = [t for t, c in enumerate(self._configs) for _ in c.feature_names]
        self._fused = fused
        self._shards = self._create_shards(plan)
        self._cores = nn.ParameterDict()
        self._states: dict[str, Tensor] = {}
        self._create_local_cores(module)
        # The replicated cores, in the same order on every rank (the order of the all-reduced vector):
        # data-parallel tables' first, whose summed gradient is then divided by the world size (the
        # mean over ranks; the others' sums are already the global batch's, see the module docstring).
        replicated = [(t, k) for t in range(len(self._configs))
                      for k in replicated_cores(self._sharding_type[t], self._shapes[t].d)]
        replicated.sort(key=lambda tk: self._sharding_type[tk[0]] != DATA_PARALLEL)  # stable
        self._replicas = [core_key(t, k) for t, k in replicated]
        sizes = [self._cores[key].numel() for key in self._replicas]
        self._mean_numel = sum(n for n, (t, _) in zip(sizes, replicated) if self._sharding_type[t] == DATA_PARALLEL)
        # per feature, the rows an index may name (the host-side range check of CPU input)
        self._feature_rows = [self._configs[t].num_embeddings for t in self._feature_tables]
        # The replicated cores' gradients of a step in one vector (the all-reduced one): a view per
        # core; the lookups' hook writes them, _update_replicas reduces and applies them.
        self._replica_grads = torch.zeros(sum(sizes), device=device, dtype=self._dtype)
        self._replica_grad_of = {key: view.view(self._cores[key].shape) for key, view in
                                 zip(self._replicas, self._replica_grads.split(sizes))}
        self._replica_written: set[str] = set()
        self._replica_pending, self._replica_work = False, None  # an update queued by _update_replicas
        self._key_of = {id(p): k for k, p in self._cores.items()}
        codecs = pooled_codecs(qcomm_codecs_registry)
        # A plain list, as in TorchRec's sharded modules: the dists' buffers are not model state.
        self._input_dists: list[nn.Module] = self._create_dists(codecs)
        self._feature_dims = [self._configs[t].embedding_dim for t in self._feature_tables]
        # Each feature in one unit (no column shards to join): the groups' outputs side by side are
        # the output, keyed in unit order.
        units = [u for d in self._input_dists for u in d.units]
        self._units_are_keys = len(units) == len(self.feature_names)
        self._output_keys = [self.feature_names[u.feature] for u in units] if self._units_are_keys else self.feature_names
        self._output_dims = [self._feature_dims[u.feature] for u in units] if self._units_are_keys else self._feature_dims
        self._lookups = [_GroupLookup(self, d.local_units, [u.columns[1] - u.columns[0] for u in d.local_units],
                                      isinstance(d, RwDist)) for d in self._input_dists]
        self._anchor = torch.zeros(0, requires_grad=True, device=device, dtype=self._dtype)
        self._fused_optimizer = TTFusedOptimizer(self)
        self._register_state_dict_hook(ShardedTTEmbeddingBagCollection._public_state_dict)
        self._register_load_state_dict_pre_hook(self._load_public_state_dict, with_module=False)
        self.register_load_state_dict_post_hook(ShardedTTEmbeddingBagCollection._public_missing_keys)

    # ---------------------------------------------------------------------------------- set-up
    def _create_shards(self, plan: EmbeddingModuleShardingPlan) -> list[list[TTShard]]:
        names = [c.name for c in self._configs]
        unknown = sorted(set(plan) - set(names))
        missing = [n for n in names if n not in plan]
        if unknown or missing:
            raise ValueError(f"the sharding plan names unknown tables {unknown} and misses tables {missing} "
                             f"of this TTEmbeddingBagCollection (tables: {names})")
        self._sharding_type = [plan[n].sharding_type for n in names]
        shards = []
        for cfg, shape in zip(self._configs, self._shapes):
            ps = plan[cfg.name]
            spec_ranks = ([s.placement.rank() for s in ps.sharding_spec.shards]
                          if ps.sharding_spec is not None and ps.sharding_type == COLUMN_WISE else None)
            shards.append(table_shards(cfg.name, shape, ps.sharding_type, ps.ranks or [], self._world, spec_ranks))
            if ps.sharding_type == COLUMN_WISE and self._fused.optimizer == OptimType.EXACT_ROWWISE_ADAGRAD:
                raise ValueError(f"table '{cfg.name}': row-wise Adagrad keeps one state per row of G_1, which a "
                                 "column_wise split divides; use exact_adagrad or exact_sgd, or another sharding type")
        return shards

    def _local_first_core_shards(self, t: int) -> list[TTShard]:
        """The shards of table t whose slice of G_1 this rank holds."""
        kind = self._sharding_type[t]
        if kind == DATA_PARALLEL:
            return self._shards[t][:1]
        return [s for s in self._shards[t] if s.rank == self._rank and s.p1[1] > s.p1[0]]

    def _holds_other_cores(self, t: int) -> bool:
        """G_2..G_d: on the owner of a table-wise table, on every rank otherwise (replicated)."""
        return self._sharding_type[t] != TABLE_WISE or self._shards[t][0].rank == self._rank

    def _create_local_cores(self, module: TTEmbeddingBagCollection) -> None:
        """This rank's slices, copied from the unsharded cores (or drawn per table when on meta)."""
        for t, (cfg, shape) in enumerate(zip(self._configs, self._shapes)):
            first = self._local_first_core_shards(t)
            if not first and not self._holds_other_cores(t):
                continue
            full = [c.detach() for c in module.tt_tables.table_cores(t)]
            if full[0].device.type == "meta":
                full = init_tt_cores(shape, cfg.weight_dist, table_generator(module.seed, cfg.name), self._dtype)
            for s in first:
                self._add_core(core_key(t, 0, s.index), full[0][s.p1[0]:s.p1[1], :, s.q1[0]:s.q1[1]])
            if self._holds_other_cores(t):
                for k in range(1, shape.d):
                    self._add_core(core_key(t, k), full[k])

    def _add_core(self, key: str, value: Tensor) -> None:
        param = nn.Parameter(value.detach().clone().contiguous().to(self._device), requires_grad=False)
        param._in_backward_optimizers = [None]  # TorchRec: keeps it out of the dense optimizer
        self._cores[key] = param
        self._states[key] = optimizer_state_like(param, self._fused.optimizer)

    def _create_dists(self, codecs) -> list[nn.Module]:
        """One dist per sharding-type group present, in a fixed order (TW+CW, RW, DP)."""
        units: dict[str, list[Unit]] = {"twcw": [], "rw": [], "dp": []}
        for f, t in enumerate(self._feature_tables):
            kind, shape = self._sharding_type[t], self._shapes[t]
            owned = kind in (TABLE_WISE, COLUMN_WISE)
            for s in self._shards[t] if owned else self._shards[t][:1]:
                unit = Unit(f, t, s.index, s.rank if owned else -1, s.columns(shape),
                            row_block(shape, self._world) if kind == ROW_WISE else 0)
                units["twcw" if owned else "rw" if kind == ROW_WISE else "dp"].append(unit)
        dims = {g: [u.columns[1] - u.columns[0] for u in us] for g, us in units.items()}
        dists: list[nn.Module] = []
        if units["twcw"]:
            dists.append(TwCwDist(units["twcw"], dims["twcw"], self._pg, self._world, self._rank, codecs))
        if units["rw"]:
            dists.append(RwDist(units["rw"], dims["rw"], self._pg, self._world, codecs))
        if units["dp"]:
            dists.append(DpDist(units["dp"], dims["dp"]))
        return dists

    # ------------------------------------------------------------------------------- pipeline
    def create_context(self) -> TTShardingContext:
        return TTShardingContext()

    def input_dist(self, ctx: TTShardingContext, features: KeyedJaggedTensor) -> Awaitable[Awaitable[KJTList]]:
        position = self._check_input(features)
        ctx.batch_size = features.stride()
        return KJTListSplitsAwaitable([self._group_input(d, features, position) for d in self._input_dists], ctx)

    def _group_input(self, group: nn.Module, features: KeyedJaggedTensor, position: list[int]) -> Awaitable:
        """The group's input dist of its features, taken from ``features`` (where this collection's
        feature f is key ``position[f]``) in one permute."""
        kjt = permute_features(features, [position[f] for f in group.perm])
        if not isinstance(group, RwDist):
            return group(kjt)
        modes = [POOLING_CODES[pooling_name(self._configs[u.table])] for u in group.units]
        weights = None
        if self._is_weighted or any(m != POOLING_SUM for m in modes):
            # row-wise partial sums cannot divide by the bag length: weight instead
            weights = bag_scales(kjt.offsets(), modes, kjt.values().numel(),
                                 kjt.weights() if self._is_weighted else None, torch.float32)
        return group(kjt, weights)

    def _check_input(self, features: KeyedJaggedTensor) -> list[int]:
        """The position of each of this collection's features among the keys of ``features``; raises
        naming the table, feature and rank for a missing feature or (CPU input) an index out of
        range, before any collective. The other ranks learn of it from their next collective, which
        fails (``ttdist.train`` reports the peer's error); with ``raise_on_every_rank`` one
        all-reduce of error codes makes them raise at once. CUDA input is checked by the ops on the
        device, without a host sync."""
        error: Optional[Exception] = None
        code = 0  # 0 ok, -1 an unsupported KJT layout, 1 a feature is missing, 2 + f an index of feature f out of range
        position: list[int] = []
        try:
            position = feature_positions(check_kjt_layout(features), self.feature_names)
        except ValueError as e:
            code, error = -1, ValueError(f"{e} (rank {self._rank})")
        except KeyError as e:
            code, error = 1, KeyError(f"{e.args[0]} (rank {self._rank})")
        values = features.values() if error is None else None
        if values is not None and not values.is_cuda and values.numel():
            rows = [-1] * len(features.keys())  # another module's features: not checked here
            for f, key in enumerate(position):
                rows[key] = self._feature_rows[f]
            pos = torch.ops.ttdist.first_out_of_range(values, features.length_per_key(), rows)
            if pos >= 0:
                f = position.index(bisect.bisect_right(features.offset_per_key(), pos) - 1)
                cfg = self._configs[self._feature_tables[f]]
                code, error = 2 + f, IndexError(
                    f"table '{cfg.name}', feature '{self.feature_names[f]}': index {int(values[pos])} is out of "
                    f"range [0, {cfg.num_embeddings}) on rank {self._rank}")
        if self._raise_on_every_rank and self._world > 1:
            codes = torch.zeros(self._world, dtype=torch.int64, device=self._device)
            codes[self._rank] = code
            dist.all_reduce(codes, group=self._pg)
            if error is None and bool(codes.any()):
                r = int(torch.nonzero(codes)[0])
                error = self._peer_input_error(r, int(codes[r]))
        if error is not None:
            raise error
        return position

    def _peer_input_error(self, rank: int, code: int) -> Exception:
        if code == -1:
            return ValueError(f"the KeyedJaggedTensor on rank {rank} has a layout TT collections do not support "
                              "(see that rank's error)")
        if code == 1:
            return KeyError(f"a feature of this TT collection {self.feature_names} is missing from the "
                            f"KeyedJaggedTensor on rank {rank} (see that rank's error)")
        cfg = self._configs[self._feature_tables[code - 2]]
        return IndexError(f"table '{cfg.name}', feature '{self.feature_names[code - 2]}': an index is out of range "
                          f"[0, {cfg.num_embeddings}) on rank {rank} (see that rank's error)")

    def compute(self, ctx: TTShardingContext, dist_input: KJTList) -> list[Tensor]:
        anchor = _ReplicaSync.apply(self, self._anchor)
        lr = self._fused_optimizer.param_groups[0]["lr"]
        return [lookup(kjt, anchor, lr) for lookup, kjt in zip(self._lookups, dist_input)]

    def output_dist(self, ctx: TTShardingContext, output: list[Tensor]) -> LazyAwaitable[KeyedTensor]:
        pending = [d.output_dist(out, ctx.batch_size) for d, out in zip(self._input_dists, output)]
        return _AssembledOutput(self, pending)

    def compute_and_output_dist(self, ctx: TTShardingContext, input: KJTList) -> LazyAwaitable[KeyedTensor]:
        return self.output_dist(ctx, self.compute(ctx, input))

    def _assemble(self, pooled: list[Tensor]) -> KeyedTensor:
        """The groups' pooled outputs [B, sum of their units' dims] -> KeyedTensor: side by side, keys
        in unit order, where every feature is one unit; otherwise in config order, each feature's
        column shards joined (one concatenation)."""
        if self._units_are_keys:
            values = pooled[0] if len(pooled) == 1 else torch.cat(pooled, dim=1)
        else:
            pieces: dict[int, list[tuple[int, Tensor]]] = {}
            for group, out in zip(self._input_dists, pooled):
                for unit, block in zip(group.units, out.split(group.dims, dim=1)):
                    pieces.setdefault(unit.feature, []).append((unit.columns[0], block))
            values = torch.cat([b for f in range(len(self.feature_names))
                                for _, b in sorted(pieces[f], key=lambda x: x[0])], dim=1)
        return KeyedTensor(keys=self._output_keys, length_per_key=self._output_dims, values=values)

    # ---------------------------------------------------------------------- replicated cores
    def _take_grads(self, cores: list[Tensor], grads: list[Tensor]) -> None:
        """Gradient hook of the lookups with replicated cores: a replicated core's gradient waits
        for the all-reduce; an owned slice of G_1 (row-/column-wise) is updated at once."""
        # The module looked up twice in one graph: the first call's update is still in flight and
        # its gradients are in the vector this call writes to; finish it first.
        self._apply_replicas()
        first, again, owned = [], [], []  # (view, grad) of a core's first / a later gradient this step; owned cores
        for core, grad in zip(cores, grads):
            key = self._key_of[id(core)]
            view = self._replica_grad_of.get(key)
            if view is None:
                owned.append((core, self._states[key], grad))
            else:
                (again if key in self._replica_written else first).append((view, grad))
                self._replica_written.add(key)
        if first:
            torch._foreach_copy_(*map(list, zip(*first)))
        if again:
            torch._foreach_add_(*map(list, zip(*again)))
        if owned:
            apply_updates(*map(list, zip(*owned)), self._fused.optimizer.code,
                          self._fused_optimizer.param_groups[0]["lr"], self._fused.eps)

    @torch.no_grad()
    def _update_replicas(self) -> None:
        """Starts the all-reduce of the replicated cores' gradients (summed over the ranks; data-
        parallel: averaged) and queues their update for the end of the backward pass, as DDP
        does: the all-reduce overlaps the rest of the backward (DLRM's bottom MLP runs after the
        embeddings), and the cores are updated before ``backward()`` returns."""
        if not self._replicas:
            return
        for key in self._replicas:
            if key not in self._replica_written:  # no lookup of this rank read the core this step
                self._replica_grad_of[key].zero_()
        self._replica_written.clear()
        if self._world > 1 and self._mean_numel:
            self._replica_grads[:self._mean_numel].mul_(1.0 / self._world)
        # On the sharding group itself: every rank issues its collectives in the same (autograd)
        # order, and a group per module would cost a communicator each (NCCL: GPU memory).
        self._replica_work = (dist.all_reduce(self._replica_grads, group=self._pg, async_op=True)
                              if self._world > 1 else None)
        self._replica_pending = True
        Variable._execution_engine.queue_callback(self._apply_replicas)

    @torch.no_grad()
    def _apply_replicas(self) -> None:
        """The fused optimizer's step on the replicated cores, from their all-reduced gradients, if
        one is pending (the queued call at the end of backward, or earlier: see ``_take_grads``)."""
        if not self._replica_pending:
            return
        self._replica_pending = False
        if self._replica_work is not None:
            self._replica_work.wait()
            self._replica_work = None
        apply_updates([self._cores[key] for key in self._replicas], [self._states[key] for key in self._replicas],
                      [self._replica_grad_of[key] for key in self._replicas], self._fused.optimizer.code,
                      self._fused_optimizer.param_groups[0]["lr"], self._fused.eps)

    # ------------------------------------------------------------------------------ metadata
    @property
    def unsharded_module_type(self) -> Type[TTEmbeddingBagCollection]:
        return TTEmbeddingBagCollection

    def embedding_bag_configs(self) -> list[TTEmbeddingBagConfig]:
        return self._configs

    def is_weighted(self) -> bool:
        return self._is_weighted

    @property
    def fused_optimizer(self) -> "TTFusedOptimizer":
        return self._fused_optimizer

    def sharding_types(self) -> dict[str, str]:
        return {c.name: st for c, st in zip(self._configs, self._sharding_type)}

    # ---------------------------------------------------------------------------- state_dict
    def public_tensors(self, state: bool = False) -> dict[str, Tensor]:
        """``{embedding_bags.<table>.tt_cores.<k>: value}`` of the cores (or, with ``state``, of their
        optimizer state): a ShardedTensor where G_1 is split across ranks, the local core where
        every rank holds it, and for a table-wise table a ShardedTensor with one shard on its owner."""
        out = {}
        for t, (cfg, shape) in enumerate(zip(self._configs, self._shapes)):
            for k in range(shape.d):
                value = self._public(t, k, state)
                if value is not None:
                    out[table_state_key(cfg.name, k)] = value
        return out

    def _public(self, t: int, k: int, state: bool) -> Optional[Tensor]:
        get = (lambda key: self._states[key]) if state else (lambda key: self._cores[key].detach())
        kind, shape = self._sharding_type[t], self._shapes[t]
        if state and self._fused.optimizer.code == 0:
            return None  # SGD keeps no state
        if kind == DATA_PARALLEL or (k > 0 and kind != TABLE_WISE):
            return get(core_key(t, k))
        core = list(shape.core_shapes[k])
        # Row-wise Adagrad keeps one state per slice G_k[i]: the leading dimension only.
        ndim = 1 if state and self._fused.optimizer == OptimType.EXACT_ROWWISE_ADAGRAD else 4
        metas, locals_ = [], []
        for s in self._shards[t]:
            offsets = ([s.p1[0], 0, s.q1[0], 0] if k == 0 else [0, 0, 0, 0])[:ndim]
            sizes = ([s.p1[1] - s.p1[0], core[1], s.q1[1] - s.q1[0], core[3]] if k == 0 else core)[:ndim]
            if sizes[0] == 0:
                continue
            meta = ShardMetadata(shard_offsets=offsets, shard_sizes=sizes, placement=f"rank:{s.rank}/{self._device}")
            metas.append(meta)
            if s.rank == self._rank:
                locals_.append(Shard(tensor=get(core_key(t, k, s.index)), metadata=meta))
        dtype = optimizer_state_like(torch.zeros(0, dtype=self._dtype), self._fused.optimizer).dtype if state \
            else self._dtype
        props = TensorProperties(dtype=dtype, layout=torch.strided, requires_grad=False,
                                 memory_format=torch.contiguous_format, pin_memory=False)
        md = ShardedTensorMetadata(shards_metadata=metas, size=torch.Size(core[:ndim]), tensor_properties=props)
        return ShardedTensor._init_from_local_shards_and_global_metadata(locals_, md, process_group=self._pg)

    @staticmethod
    def _public_state_dict(module: "ShardedTTEmbeddingBagCollection", destination, prefix, local_metadata):
        for key in [k for k in destination if k.startswith(prefix + "_cores.")]:
            del destination[key]
        for name, value in module.public_tensors().items():
            destination[prefix + name] = value
        return destination

    def _load_public_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                error_msgs) -> None:
        """Accepts ShardedTensors (matched by shard offsets) or full tensors (sliced here); an
        unsharded module's optimizer state (``...optimizer_state.<k>``) goes to the fused optimizer."""
        for t, (cfg, shape) in enumerate(zip(self._configs, self._shapes)):
            for k in range(shape.d):
                for state in (False, True):
                    value = state_dict.pop(prefix + table_state_key(cfg.name, k, state), None)
                    if value is None:
                        continue
                    self._check_loaded_shape(cfg.name, t, k, state, value)
                    for s in self._local_first_core_shards(t) if k == 0 else [None]:
                        key = core_key(t, k, s.index if s is not None else 0)
                        if key not in self._cores:
                            continue
                        part = _slice_for(value, s if k == 0 and self._sharding_type[t] != DATA_PARALLEL else None)
                        if state:
                            self._states[key].copy_(part)
                        else:
                            state_dict[prefix + "_cores." + key] = part

    def _check_loaded_shape(self, table: str, t: int, k: int, state: bool, value: Tensor) -> None:
        core = tuple(self._shapes[t].core_shapes[k])
        expected = tuple(optimizer_state_like(torch.empty(core, device="meta"), self._fused.optimizer).shape) \
            if state else core
        if tuple(value.shape) != expected:
            what = f"the {self._fused.optimizer.value} state of core {k}" if state else f"core {k}"
            raise ValueError(f"table '{table}': {what} in the state_dict has shape {tuple(value.shape)} but this "
                             f"model's has {expected} (the checkpoint's table differs in tt_ranks, tt_p_shapes, "
                             "tt_q_shapes, num_embeddings or optimizer)")

    @staticmethod
    def _public_missing_keys(module: "ShardedTTEmbeddingBagCollection", incompatible) -> None:
        """Missing internal core keys are reported by their public (per-table) names."""
        names = {}
        for t, (cfg, shape) in enumerate(zip(module._configs, module._shapes)):
            for k in range(shape.d):
                for s in range(max(len(module._shards[t]), 1)):
                    names[core_key(t, k, s)] = table_state_key(cfg.name, k)
        renamed = []
        for key in incompatible.missing_keys:
            head, _, tail = key.rpartition("_cores.")
            public = head + names[tail] if tail in names else key
            if public not in renamed:
                renamed.append(public)
        incompatible.missing_keys[:] = renamed


class _AssembledOutput(LazyAwaitable[KeyedTensor]):
    """The KeyedTensor of the groups' pooled outputs, assembled when first used (TorchRec's lazy output)."""

    def __init__(self, module: ShardedTTEmbeddingBagCollection, pending: list[Awaitable[Tensor]]) -> None:
        super().__init__()
        self._module, self._pending = module, pending

    def _wait_impl(self) -> KeyedTensor:
        return self._module._assemble([p.wait() for p in self._pending])


def _slice_for(value, shard: Optional[TTShard]) -> Tensor:
    """The part of a core (or its optimizer state) that ``shard`` holds (None: the whole)."""
    if isinstance(value, ShardedTensor):
        for local in value.local_shards():
            off = local.metadata.shard_offsets
            if shard is None or (off[0] == shard.p1[0] and (len(off) < 3 or off[2] == shard.q1[0])):
                return local.tensor
        raise ValueError("the checkpoint's shard layout does not match this rank's shards; load it with "
                         "torch.distributed.checkpoint, which reshards")
    if shard is None or value.numel() == 0:
        return value
    value = value[shard.p1[0]:shard.p1[1]]
    return value[:, :, shard.q1[0]:shard.q1[1]] if value.dim() == 4 else value


class TTFusedOptimizer(FusedOptimizer):
    """The optimizer fused into the sharded TT backward, as TorchRec exposes fbgemm's.

    Keyed like the model's state_dict (``embedding_bags.<table>.tt_cores.<k>``); its ``state`` holds
    each core's Adagrad accumulator (``"sum"``, shaped like the core, or per slice for row-wise
    Adagrad; none for SGD), sharded like the core, so ``state_dict()`` / ``load_state_dict()``
    go through ``torch.distributed.checkpoint`` and reshard. ``step()`` and ``zero_grad()`` do
    nothing (the update runs in backward); ``param_groups[0]["lr"]`` is read at every step, so a
    learning-rate schedule (e.g. TorchRec's ``WarmupOptimizer``) applies.
    """

    def __init__(self, module: ShardedTTEmbeddingBagCollection) -> None:
        params = module.public_tensors()
        states = module.public_tensors(state=True)
        state = {params[name]: {"sum": states[name]} for name in states}
        super().__init__(params, state, [{"params": list(params.values()), "lr": module._fused.learning_rate}])

    def step(self, closure: Any = None) -> None:
        pass

    def zero_grad(self, set_to_none: bool = False) -> None:
        pass
