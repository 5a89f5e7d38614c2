"""``ShardedTTEmbeddingBagCollection`` and its TorchRec sharder.

The sharded twin of ``ttdist.TTEmbeddingBagCollection``, built from it (its configs and
cores) by ``TTEmbeddingBagCollectionSharder.shard``. It implements TorchRec's ``ShardedModule``
pipeline: ``input_dist`` (KJT all-to-all, per sharding-type group, ``ttdist.distributed.dists``)
-> ``compute`` (one ``ttdist::tt_forward`` call per group over this rank's shards) ->
``output_dist`` (pooled all-to-all: the butterfly shuffle) -> KeyedTensor in config order.

Training is fused, as in TorchRec (``fused_params``): one autograd node covers all local
lookups; its backward computes core gradients with ``ttdist::tt_backward``, all-reduces the
gradients of cores replicated across ranks (row-/column-wise: G_2..G_d; data-parallel: all),
and applies the optimizer in place with ``ttdist::sparse_row_update_``. The pooled all-to-all
divides gradients by W in backward (TorchRec's gradient division), so with a per-rank mean loss
the cores see the gradient of the global mean loss — the same as one process on the global batch.

``state_dict()`` uses the unsharded module's keys (``tt_tables.tt_cores.<i>``,
``tt_tables.optimizer_state_<i>``): split cores are ``ShardedTensor`` s, replicated ones plain
tensors, so ``torch.distributed.checkpoint`` saves them and reloads them on any world size.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Type

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.types import (Awaitable, EmbeddingModuleShardingPlan, LazyAwaitable, ModuleSharder,
                                        ShardedModule, ShardingEnv, ShardingType)
from torchrec.optim.fused import FusedOptimizer, FusedOptimizerModule
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor
from torchrec.streamable import Multistreamable

from ttdist.distributed.dists import DpDist, Ready, RwDist, TwCwDist, Unit
from ttdist.distributed.shard_layout import TTShard, replicated_cores, row_block, table_shards
from ttdist.modules.collection import TTEmbeddingBagCollection, TTEmbeddingBagConfig, select_features
from ttdist.modules.optim import OptimType, optimizer_state_like
from ttdist.modules.tt_init import init_tt_cores, table_generator
from ttdist.ops import POOLING_CODES, POOLING_SUM, LookupSpec, bag_scales

# EmbeddingComputeKernel is a closed enum that the planner validates; CUSTOMIZED_KERNEL is the
# value TorchRec reserves for kernels it does not implement (claiming FUSED would make the
# planner model ttdist's kernel as fbgemm's TBE).
TT_COMPUTE_KERNEL = EmbeddingComputeKernel.CUSTOMIZED_KERNEL.value
DEFAULT_FUSED_PARAMS = {"optimizer": OptimType.EXACT_SGD, "learning_rate": 0.01, "eps": 1e-10}


class TTEmbeddingBagCollectionSharder(ModuleSharder[TTEmbeddingBagCollection]):
    """Shards ``TTEmbeddingBagCollection`` tables table-, row-, column-wise or data-parallel.

    ``fused_params`` follow TorchRec: ``{"optimizer": EmbOptimType.EXACT_SGD | EXACT_ADAGRAD |
    EXACT_ROWWISE_ADAGRAD, "learning_rate": float, "eps": float}``.
    """

    def __init__(self, fused_params: Optional[dict[str, Any]] = None, qcomm_codecs_registry=None) -> None:
        super().__init__(qcomm_codecs_registry=qcomm_codecs_registry)
        self._fused_params = {**DEFAULT_FUSED_PARAMS, **(fused_params or {})}
        OptimType.parse(self._fused_params["optimizer"])

    @property
    def fused_params(self) -> dict[str, Any]:
        return self._fused_params

    @property
    def module_type(self) -> Type[TTEmbeddingBagCollection]:
        return TTEmbeddingBagCollection

    def shardable_parameters(self, module: TTEmbeddingBagCollection) -> dict[str, nn.Parameter]:
        """A 2-D meta proxy ``[num_embeddings, dim]`` per table (the planner needs 2-D
        parameters); the real byte counts come from ``ttdist.distributed.planner``'s estimator."""
        return {c.name: nn.Parameter(torch.empty(c.num_embeddings, c.embedding_dim, device="meta"), requires_grad=False)
                for c in module.embedding_bag_configs()}

    def sharding_types(self, compute_device_type: str) -> list[str]:
        """All four, except column_wise under row-wise Adagrad (its per-slice state would be split)."""
        types = [ShardingType.TABLE_WISE.value, ShardingType.ROW_WISE.value, ShardingType.COLUMN_WISE.value,
                 ShardingType.DATA_PARALLEL.value]
        if OptimType.parse(self._fused_params["optimizer"]) == OptimType.EXACT_ROWWISE_ADAGRAD:
            types.remove(ShardingType.COLUMN_WISE.value)
        return types

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> list[str]:
        return [TT_COMPUTE_KERNEL]

    def shard(self, module: TTEmbeddingBagCollection, params: EmbeddingModuleShardingPlan, env: ShardingEnv,
              device: Optional[torch.device] = None, module_fqn: Optional[str] = None
              ) -> "ShardedTTEmbeddingBagCollection":
        return ShardedTTEmbeddingBagCollection(module, params, env, device or torch.device("cpu"), self._fused_params)


class TTShardingContext(Multistreamable):
    """Per-batch state between the pipeline steps."""

    def __init__(self) -> None:
        self.batch_size = 0

    def record_stream(self, stream) -> None:
        pass


class _LazyKeyedTensor(LazyAwaitable[KeyedTensor]):
    def __init__(self, fn) -> None:
        super().__init__()
        self._fn = fn

    def _wait_impl(self) -> KeyedTensor:
        return self._fn()


class _FusedShardedLookup(torch.autograd.Function):
    """All local lookups of one step; backward = grads, replica all-reduce, in-place update."""

    @staticmethod
    def forward(ctx, module: "ShardedTTEmbeddingBagCollection", inputs: list, anchor: Tensor, *params: Tensor):
        ctx.module, ctx.inputs = module, inputs
        return tuple(module._lookup(group, kjt) for group, kjt in zip(module._groups, inputs))

    @staticmethod
    def backward(ctx, *grad_outputs: Tensor):
        module: ShardedTTEmbeddingBagCollection = ctx.module
        grads: dict[str, Tensor] = {}
        for group, kjt, grad in zip(module._groups, ctx.inputs, grad_outputs):
            module._accumulate_grads(group, kjt, grad, grads)
        module._all_reduce_replicated(grads)
        module._apply_optimizer(grads)
        return (None, None, None) + (None,) * len(module._cores)


class ShardedTTEmbeddingBagCollection(ShardedModule[list, list, KeyedTensor, TTShardingContext],
                                      FusedOptimizerModule):
    """Sharded TT collection (see the module docstring)."""

    def __init__(self, module: TTEmbeddingBagCollection, plan: EmbeddingModuleShardingPlan, env: ShardingEnv,
                 device: torch.device, fused_params: dict[str, Any]) -> None:
        super().__init__(qcomm_codecs_registry=None)
        self._pg, self._world, self._rank = env.process_group, env.world_size, env.rank
        self._device = device
        self._configs: list[TTEmbeddingBagConfig] = list(module.embedding_bag_configs())
        self._shapes = [c.tt_shape() for c in self._configs]
        self._is_weighted = module.is_weighted()
        self._dtype = module.tt_tables.dtype
        self.feature_names = list(module.feature_names)
        self._optimizer = OptimType.parse(fused_params["optimizer"])
        self._eps = float(fused_params.get("eps", 1e-10))
        self._core_offsets = [sum(s.d for s in self._shapes[:t]) for t in range(len(self._shapes))]
        self._shards = self._create_shards(plan)
        self._cores = nn.ParameterDict()
        self._create_local_cores(module)
        self._groups = self._create_groups()
        self._replicas = [(t, k) for t, c in enumerate(self._configs)
                          for k in replicated_cores(self._sharding_type[t], self._shapes[t].d)]
        self._grad_pg = dist.new_group(backend=dist.get_backend(self._pg)) if self._world > 1 else None
        self._anchor = torch.zeros(0, requires_grad=True, device=device)
        self._fused_optimizer = TTFusedOptimizer(self, float(fused_params.get("learning_rate", 0.01)))
        self._register_state_dict_hook(ShardedTTEmbeddingBagCollection._public_state_dict)
        self._register_load_state_dict_pre_hook(self._load_public_state_dict, with_module=False)

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
                          if ps.sharding_spec is not None and ps.sharding_type == "column_wise" else None)
            shards.append(table_shards(cfg.name, shape, ps.sharding_type, ps.ranks or [], self._world, spec_ranks))
            if ps.sharding_type == "column_wise" and self._optimizer == OptimType.EXACT_ROWWISE_ADAGRAD:
                raise ValueError(f"table '{cfg.name}': row-wise Adagrad keeps one state per row of G_1, which a "
                                 "column_wise split divides; use exact_adagrad or exact_sgd, or another sharding type")
        return shards

    def _create_local_cores(self, module: TTEmbeddingBagCollection) -> None:
        """This rank's slices, copied from the unsharded cores (or drawn per table when on meta)."""
        for t, (cfg, shape) in enumerate(zip(self._configs, self._shapes)):
            local = [s for s in self._shards[t] if s.rank == self._rank]
            if not local:
                continue
            full = [c.detach() for c in module.tt_tables.table_cores(t)]
            if full[0].device.type == "meta":
                full = init_tt_cores(shape, cfg.weight_dist, table_generator(module.seed, cfg.name))
            for s in local:
                if s.p1[1] > s.p1[0]:  # a row-wise shard past the last slice of G_1 holds no rows
                    self._add_core(f"t{t}_c0_s{s.index}", full[0][s.p1[0]:s.p1[1], :, s.q1[0]:s.q1[1]])
            for k in range(1, shape.d):
                self._add_core(f"t{t}_c{k}", full[k])

    def _add_core(self, key: str, value: Tensor) -> None:
        param = nn.Parameter(value.detach().clone().contiguous().to(self._device), requires_grad=False)
        param._in_backward_optimizers = [None]  # TorchRec: keeps it out of the dense optimizer
        self._cores[key] = param
        self.register_buffer(f"_state_{key}", optimizer_state_like(param, self._optimizer))

    def _create_groups(self) -> list:
        """One dist per sharding-type group present, in a fixed order (TW+CW, RW, DP)."""
        units: dict[str, list[tuple[Unit, int]]] = {"twcw": [], "rw": [], "dp": []}
        f = 0
        for t, (cfg, shape) in enumerate(zip(self._configs, self._shapes)):
            kind = self._sharding_type[t]
            for _ in cfg.feature_names:
                for s in self._shards[t] if kind in ("table_wise", "column_wise") else self._shards[t][:1]:
                    cols = s.columns(shape)
                    unit = Unit(f, t, s.index, s.rank if kind in ("table_wise", "column_wise") else -1, cols,
                                row_block(shape, self._world) if kind == "row_wise" else 0)
                    units[{"table_wise": "twcw", "column_wise": "twcw", "row_wise": "rw"}.get(kind, "dp")].append(
                        (unit, cols[1] - cols[0]))
                f += 1
        groups = []
        if units["twcw"]:
            ordered = sorted(units["twcw"], key=lambda x: x[0].rank)
            groups.append(TwCwDist([u for u, _ in ordered], [d for _, d in ordered], self._pg, self._world, self._rank))
        if units["rw"]:
            groups.append(RwDist([u for u, _ in units["rw"]], [d for _, d in units["rw"]], self._pg, self._world))
        if units["dp"]:
            groups.append(DpDist([u for u, _ in units["dp"]], [d for _, d in units["dp"]]))
        return groups

    # ------------------------------------------------------------------------------- pipeline
    def create_context(self) -> TTShardingContext:
        return TTShardingContext()

    def input_dist(self, ctx: TTShardingContext, features: KeyedJaggedTensor) -> Awaitable[Awaitable[list]]:
        features = self._check_input(features)
        ctx.batch_size = features.stride()
        pending = [self._group_input(group, features) for group in self._groups]
        return Ready(lambda: Ready(lambda: [p.wait() for p in pending]))

    def _group_input(self, group, features: KeyedJaggedTensor) -> Awaitable:
        if not isinstance(group, RwDist):
            return group.input_dist(features)
        modes = [POOLING_CODES[self._pooling(u.table)] for u in group.units]
        needs_weights = self._is_weighted or any(m != POOLING_SUM for m in modes)
        weights = None
        if needs_weights:  # row-wise partial sums cannot divide by the bag length: weight instead
            kjt = features.permute(group.perm)
            weights = bag_scales(kjt.offsets(), modes, kjt.values().numel(),
                                 kjt.weights() if self._is_weighted else None, torch.float32)
        return group.input_dist(features, weights)

    def _check_input(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        """This collection's features of ``features``; bad input raises on EVERY rank, before any all-to-all.

        Each rank puts a code in its own slot of a [W] int64 vector (0 ok, 1 a feature is missing
        from its KJT, 2 + f an index of feature f out of range) and one all-reduce (SUM) shares
        them, so a rank whose own input is fine raises too, naming the bad rank, instead of
        blocking in the next collective.
        """
        own_error: Optional[Exception] = None
        code = 0
        try:
            features = select_features(features, self.feature_names)
        except KeyError as e:
            code, own_error = 1, KeyError(f"{e.args[0]} (rank {self._rank})")
        if own_error is None:
            for f, jt in enumerate(features.split([1] * len(self.feature_names))):
                values = jt.values()
                rows = self._configs[self._feature_table(f)].num_embeddings
                if values.numel() and (int(values.min()) < 0 or int(values.max()) >= rows):
                    v = int(values[(values < 0) | (values >= rows)][0])
                    code = 2 + f
                    own_error = IndexError(f"table '{self._configs[self._feature_table(f)].name}', feature "
                                           f"'{self.feature_names[f]}': index {v} is out of range [0, {rows}) "
                                           f"on rank {self._rank}")
                    break
        codes = [code]
        if self._world > 1:
            flags = torch.zeros(self._world, dtype=torch.int64, device=self._device)
            flags[self._rank] = code
            dist.all_reduce(flags, group=self._pg)
            codes = [int(c) for c in flags]
        if own_error is not None:
            raise own_error
        bad = [r for r, c in enumerate(codes) if c]
        if bad:
            r, c = bad[0], codes[bad[0]]
            if c == 1:
                raise KeyError(f"a feature of this TT collection {self.feature_names} is missing from the "
                               f"KeyedJaggedTensor on rank {r} (see that rank's error)")
            f = c - 2
            cfg = self._configs[self._feature_table(f)]
            raise IndexError(f"table '{cfg.name}', feature '{self.feature_names[f]}': an index is out of range "
                             f"[0, {cfg.num_embeddings}) on rank {r} (see that rank's error)")
        return features

    def _feature_table(self, f: int) -> int:
        return [t for t, c in enumerate(self._configs) for _ in c.feature_names][f]

    def _pooling(self, t: int) -> str:
        from ttdist.modules.collection import pooling_name

        return pooling_name(self._configs[t])

    def compute(self, ctx: TTShardingContext, dist_input: list) -> list:
        # The anchor keeps every rank's outputs in the graph, so every rank runs the backward
        # all-to-alls and the replica all-reduce even when it owns no shard.
        return list(_FusedShardedLookup.apply(self, dist_input, self._anchor, *self._cores.values()))

    def output_dist(self, ctx: TTShardingContext, output: list) -> LazyAwaitable[KeyedTensor]:
        pending = [group.output_dist(out, ctx.batch_size) for group, out in zip(self._groups, output)]

        def assemble() -> KeyedTensor:
            pieces: dict[int, list[tuple[int, Tensor]]] = {}
            for group, p in zip(self._groups, pending):
                for unit, block in group.split_output(p.wait()):
                    pieces.setdefault(unit.feature, []).append((unit.columns[0], block))
            values = [torch.cat([b for _, b in sorted(pieces[f], key=lambda x: x[0])], dim=1)
                      for f in range(len(self.feature_names))]
            return KeyedTensor.from_tensor_list(self.feature_names, values)

        return _LazyKeyedTensor(assemble)

    def compute_and_output_dist(self, ctx: TTShardingContext, input: list) -> LazyAwaitable[KeyedTensor]:
        return self.output_dist(ctx, self.compute(ctx, input))

    # ----------------------------------------------------------------------- local lookups
    def _local_tables(self, group):
        """(core keys per local table, LookupSpec, positions of the looked-up units, column
        offset of every local unit) for this rank's units of ``group``. A unit whose shard holds
        no rows (row-wise past the end of G_1) is not looked up: no index can reach it."""
        keys: list[list[str]] = []
        index: dict[tuple[int, int], int] = {}
        table_of_unit, positions, modes = [], [], []
        rw = isinstance(group, RwDist)
        for pos, u in enumerate(group.local_units):
            shard = u.shard_index if u.rank >= 0 else (self._rank if rw else 0)
            if f"t{u.table}_c0_s{shard}" not in self._cores:
                continue
            if (u.table, shard) not in index:
                index[(u.table, shard)] = len(keys)
                keys.append([f"t{u.table}_c0_s{shard}"] + [f"t{u.table}_c{k}" for k in range(1, self._shapes[u.table].d)])
            table_of_unit.append(index[(u.table, shard)])
            positions.append(pos)
            modes.append(POOLING_SUM if rw else POOLING_CODES[self._pooling(u.table)])
        dims = [u.columns[1] - u.columns[0] for u in group.local_units]
        offsets = [sum(dims[:i]) for i in range(len(dims) + 1)]
        return keys, LookupSpec(tuple(len(k) for k in keys), tuple(table_of_unit), tuple(modes)), positions, offsets

    @staticmethod
    def _looked_up(kjt: KeyedJaggedTensor, positions: list[int], num_units: int) -> KeyedJaggedTensor:
        return kjt if len(positions) == num_units else kjt.permute(positions)

    def _lookup(self, group, kjt: KeyedJaggedTensor) -> Tensor:
        keys, spec, positions, offsets = self._local_tables(group)
        out = torch.zeros(kjt.stride(), offsets[-1], device=self._device)
        if not positions:
            return out
        sub = self._looked_up(kjt, positions, len(group.local_units))
        pooled = torch.ops.ttdist.tt_forward([self._cores[k] for ks in keys for k in ks], spec.table_num_cores,
                                             spec.feature_table_map, spec.pooling_modes, sub.values(), sub.offsets(),
                                             sub.weights_or_none())
        if len(positions) == len(group.local_units):
            return pooled
        col = 0
        for pos in positions:  # zero columns stay for the units without rows here
            width = offsets[pos + 1] - offsets[pos]
            out[:, offsets[pos]:offsets[pos + 1]] = pooled[:, col:col + width]
            col += width
        return out

    def _accumulate_grads(self, group, kjt: KeyedJaggedTensor, grad: Tensor, grads: dict[str, Tensor]) -> None:
        keys, spec, positions, offsets = self._local_tables(group)
        if not positions:
            return
        sub = self._looked_up(kjt, positions, len(group.local_units))
        grad = torch.cat([grad[:, offsets[p]:offsets[p + 1]] for p in positions], dim=1).contiguous()
        flat = [k for ks in keys for k in ks]
        core_grads = torch.ops.ttdist.tt_backward(grad, [self._cores[k] for k in flat], spec.table_num_cores,
                                                  spec.feature_table_map, spec.pooling_modes, sub.values(),
                                                  sub.offsets(), sub.weights_or_none())
        for key, g in zip(flat, core_grads):
            grads[key] = grads[key] + g if key in grads else g

    def _all_reduce_replicated(self, grads: dict[str, Tensor]) -> None:
        """Sums (data-parallel: averages) the gradients of replicated cores over all ranks."""
        if self._world == 1 or not self._replicas:
            return
        parts = []
        for t, k in self._replicas:
            key = f"t{t}_c{k}" if k else f"t{t}_c0_s0"
            shape = self._shapes[t].core_shapes[k]
            g = grads.get(key)
            g = torch.zeros(math.prod(shape), device=self._device) if g is None else g.reshape(-1)
            parts.append(g / self._world if self._sharding_type[t] == "data_parallel" else g)
        flat = torch.cat(parts)
        dist.all_reduce(flat, group=self._grad_pg)
        for (t, k), chunk in zip(self._replicas, flat.split([math.prod(self._shapes[t].core_shapes[k]) for t, k in self._replicas])):
            key = f"t{t}_c{k}" if k else f"t{t}_c0_s0"
            if key in self._cores:
                grads[key] = chunk.view(self._cores[key].shape)

    @torch.no_grad()
    def _apply_optimizer(self, grads: dict[str, Tensor]) -> None:
        lr = self._fused_optimizer.param_groups[0]["lr"]
        for key, g in grads.items():
            core = self._cores[key]
            rows = core.shape[0]
            g2 = g.reshape(rows, -1)
            touched = torch.nonzero(g2.ne(0).any(dim=1)).flatten()
            if touched.numel():
                torch.ops.ttdist.sparse_row_update_(core.data.view(rows, -1), getattr(self, f"_state_{key}"), touched,
                                                   g2[touched], self._optimizer.code, lr, self._eps)

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
    def _public(self, t: int, k: int, state: bool):
        """The unsharded key's value: a ShardedTensor for a split core, else the local full core."""
        get = (lambda key: getattr(self, f"_state_{key}")) if state else (lambda key: self._cores[key].detach())
        kind, shape = self._sharding_type[t], self._shapes[t]
        split = kind == "table_wise" or (k == 0 and kind in ("row_wise", "column_wise"))
        if not split:
            key = f"t{t}_c{k}" if k else f"t{t}_c0_s0"
            return get(key) if key in self._cores else None
        if state and self._optimizer.code == 0:  # SGD keeps no state: the unsharded module's empty buffer
            return torch.zeros(0, device=self._device)
        core = list(shape.core_shapes[k])
        # Row-wise Adagrad keeps one state per slice G_k[i]: the leading dimension only.
        ndim = 1 if state and self._optimizer == OptimType.EXACT_ROWWISE_ADAGRAD else 4
        full = core[:ndim]
        metas, locals_ = [], []
        for s in self._shards[t]:
            offsets = ([s.p1[0], 0, s.q1[0], 0] if k == 0 else [0, 0, 0, 0])[:ndim]
            sizes = ([s.p1[1] - s.p1[0], core[1], s.q1[1] - s.q1[0], core[3]] if k == 0 else core)[:ndim]
            if sizes[0] == 0:
                continue
            meta = ShardMetadata(shard_offsets=offsets, shard_sizes=sizes, placement=f"rank:{s.rank}/{self._device}")
            metas.append(meta)
            if s.rank == self._rank:
                locals_.append(Shard(tensor=get(f"t{t}_c0_s{s.index}" if k == 0 else f"t{t}_c{k}"), metadata=meta))
        dtype = optimizer_state_like(torch.zeros(0, dtype=self._dtype), self._optimizer).dtype if state else self._dtype
        props = TensorProperties(dtype=dtype, layout=torch.strided, requires_grad=False,
                                 memory_format=torch.contiguous_format, pin_memory=False)
        md = ShardedTensorMetadata(shards_metadata=metas, size=torch.Size(full), tensor_properties=props)
        return ShardedTensor._init_from_local_shards_and_global_metadata(locals_, md, process_group=self._pg)

    @staticmethod
    def _public_state_dict(module: "ShardedTTEmbeddingBagCollection", destination, prefix, local_metadata):
        for key in [k for k in destination if k.startswith(prefix + "_cores.") or k.startswith(prefix + "_state_")]:
            del destination[key]
        for t, shape in enumerate(module._shapes):
            for k in range(shape.d):
                i = module._core_offsets[t] + k
                for name, state in ((f"tt_tables.tt_cores.{i}", False), (f"tt_tables.optimizer_state_{i}", True)):
                    value = module._public(t, k, state)
                    if value is not None:
                        destination[prefix + name] = value
        return destination

    def _load_public_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                error_msgs) -> None:
        """Accepts ShardedTensors (matched by shard offsets) or full tensors (sliced here)."""
        for t, shape in enumerate(self._shapes):
            for k in range(shape.d):
                i = self._core_offsets[t] + k
                for name, internal in ((f"tt_tables.tt_cores.{i}", "_cores."), (f"tt_tables.optimizer_state_{i}", "_state_")):
                    value = state_dict.pop(prefix + name, None)
                    if value is None:
                        continue
                    for s in (self._shards[t] if k == 0 else self._shards[t][:1]):
                        key = f"t{t}_c0_s{s.index}" if k == 0 else f"t{t}_c{k}"
                        if key not in self._cores or (k == 0 and s.rank != self._rank):
                            continue
                        state_dict[prefix + internal + key] = _slice_for(value, s if k == 0 else None)


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

    ``step()`` and ``zero_grad()`` do nothing (the update runs in backward); ``param_groups[0]["lr"]``
    is read at every backward, so a learning-rate schedule applies. Its ``state`` is empty: the
    Adagrad accumulators live in the module's state_dict (``tt_tables.optimizer_state_<i>``),
    sharded like the cores, so they are checkpointed and resharded with the model.
    """

    def __init__(self, module: ShardedTTEmbeddingBagCollection, learning_rate: float) -> None:
        params = dict(module._cores.items())
        super().__init__(params, {}, [{"params": list(params.values()), "lr": learning_rate}])

    def step(self, closure: Any = None) -> None:
        pass

    def zero_grad(self, set_to_none: bool = False) -> None:
        pass
