"""TorchRec-facing TT modules: ``TTEmbeddingBagConfig`` and ``TTEmbeddingBagCollection``.

``TTEmbeddingBagCollection`` behaves as TorchRec's ``EmbeddingBagCollection``:
``forward(KeyedJaggedTensor) -> KeyedTensor`` with one key per feature in config order,
``embedding_bag_configs()``, ``is_weighted()`` — so ``torchrec.models.dlrm.DLRM`` takes it in
place of an EBC unchanged. Its TT tables are looked up together by one
``TableBatchedTTEmbeddingBag`` (one op call). ``MixedEmbeddingBagCollection`` puts plain
TorchRec tables (small features) beside them.

Symbols: F features (in config order), B batch size, D_f the dim of feature f's table.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from ttdist.modules.optim import OptimType
from ttdist.modules.tt_embedding_bag import TableBatchedTTEmbeddingBag
from ttdist.modules.tt_init import table_generator
from ttdist.modules.tt_shapes import TTShape, make_tt_shape


@dataclass
class TTEmbeddingBagConfig(EmbeddingBagConfig):
    """TorchRec's EmbeddingBagConfig plus the TT factorisation of the table."""

    tt_ranks: list[int] = field(default_factory=lambda: [16, 16])
    """Inner TT ranks (d - 1 entries); d = len(tt_ranks) + 1 cores."""
    tt_p_shapes: Optional[list[int]] = None
    """Row factors p (prod >= num_embeddings); None = factor automatically."""
    tt_q_shapes: Optional[list[int]] = None
    """Column factors q (prod == embedding_dim); None = factor automatically."""
    weight_dist: str = "approx-normal"
    """Core initialisation (ttdist.modules.tt_init.WEIGHT_DISTS)."""
    use_cache: bool = False
    """Keep the most frequent rows decompressed (TTEmbeddingBag's row cache)."""
    cache_size: int = 0
    """Rows in the cache (0 = 10 % of the rows)."""
    hashtbl_size: int = 0
    """Buckets of the frequency counter (0 = num_embeddings: exact counts)."""

    def tt_shape(self) -> TTShape:
        """The validated TT shape (raises ValueError naming this table)."""
        return make_tt_shape(self.num_embeddings, self.embedding_dim, self.tt_ranks, self.tt_p_shapes,
                             self.tt_q_shapes, table_name=self.name)


AnyTableConfig = Union[TTEmbeddingBagConfig, EmbeddingBagConfig]


def table_state_key(table: str, k: int, optimizer_state: bool = False) -> str:
    """The state_dict key of core k of a TT table (or of its fused-optimizer state), relative to
    the collection: ``embedding_bags.<table>.tt_cores.<k>`` (``...optimizer_state.<k>``)."""
    return f"embedding_bags.{table}.{'optimizer_state' if optimizer_state else 'tt_cores'}.{k}"
POOLING_NAMES = {PoolingType.SUM: "sum", PoolingType.MEAN: "mean"}


def pooling_name(config: EmbeddingBagConfig) -> str:
    if config.pooling not in POOLING_NAMES:
        raise ValueError(f"table '{config.name}': pooling {config.pooling} is not supported (SUM or MEAN)")
    return POOLING_NAMES[config.pooling]


def build_tt_tables(configs: Sequence[TTEmbeddingBagConfig], fused_params: Optional[dict[str, Any]],
                    device: Optional[torch.device], seed: int, feature_table_map: Sequence[int]
                    ) -> TableBatchedTTEmbeddingBag:
    """One TableBatchedTTEmbeddingBag for ``configs``; initial cores depend only on (seed, table name).

    ``fused_params`` (TorchRec's convention: ``optimizer`` (EmbOptimType/OptimType),
    ``learning_rate``, ``eps``) turns on the fused update; None = plain autograd gradients.
    """
    fused = dict(fused_params or {})
    return TableBatchedTTEmbeddingBag(
        len(configs),
        [c.num_embeddings for c in configs], [c.embedding_dim for c in configs], [list(c.tt_ranks) for c in configs],
        [c.tt_shape().p for c in configs], [c.tt_shape().q for c in configs],
        mode=[pooling_name(c) for c in configs],
        sparse=fused_params is not None,
        optimizer=OptimType.parse(fused.get("optimizer", OptimType.EXACT_SGD)),
        learning_rate=float(fused.get("learning_rate", 0.01)), eps=float(fused.get("eps", 1e-10)),
        use_cache=[c.use_cache for c in configs], cache_size=[c.cache_size for c in configs],
        hashtbl_size=[c.hashtbl_size for c in configs], weight_dist=[c.weight_dist for c in configs],
        include_last_offset=True, device=device, feature_table_map=feature_table_map,
        table_names=[c.name for c in configs], generators=[table_generator(seed, c.name) for c in configs],
    )


class TTEmbeddingBagCollection(nn.Module):
    """EmbeddingBagCollection of TT tables, looked up by one table-batched op call.

    Args:
        tables: ``TTEmbeddingBagConfig`` per table (for plain tables beside them use
            ``MixedEmbeddingBagCollection``).
        is_weighted: features carry per-sample weights (KJT.weights()), SUM pooling only.
        device: where the cores live.
        seed: initial cores depend only on (seed, table name) — never on world size or plan.
        fused_params: TorchRec's fused-optimizer convention (see build_tt_tables); None = plain
            autograd gradients on ``tt_tables.tt_cores``.
    """

    def __init__(self, tables: Sequence[TTEmbeddingBagConfig], is_weighted: bool = False,
                 device: Optional[torch.device] = None, seed: int = 0,
                 fused_params: Optional[dict[str, Any]] = None) -> None:
        super().__init__()
        check_table_configs(tables)
        plain = [c.name for c in tables if not isinstance(c, TTEmbeddingBagConfig)]
        if plain:
            raise TypeError(f"tables {plain} are not TTEmbeddingBagConfig; use MixedEmbeddingBagCollection to "
                            "combine TT tables with plain TorchRec tables")
        self._configs = list(tables)
        self._is_weighted, self.seed, self.fused_params = is_weighted, seed, fused_params
        self.feature_names = [f for c in self._configs for f in c.feature_names]
        feature_table_map = [t for t, c in enumerate(self._configs) for _ in c.feature_names]
        self.tt_tables = build_tt_tables(self._configs, fused_params, device, seed, feature_table_map)
        self._register_state_dict_hook(TTEmbeddingBagCollection._per_table_state_dict)
        self._register_load_state_dict_pre_hook(self._load_per_table_state_dict, with_module=False)

    def embedding_bag_configs(self) -> list[TTEmbeddingBagConfig]:
        return self._configs

    def table_parameters(self) -> list[tuple[str, list[nn.Parameter]]]:
        """(table name, its cores) per table, in config order."""
        return [(c.name, list(self.tt_tables.table_cores(t))) for t, c in enumerate(self._configs)]

    def _state_keys(self) -> list[tuple[str, str]]:
        """(internal key, per-table key) of every core and optimizer state, relative to this module."""
        keys, i = [], 0
        for c, d in zip(self._configs, self.tt_tables.table_num_cores):
            for k in range(d):
                keys += [(f"tt_tables.tt_cores.{i}", table_state_key(c.name, k)),
                         (f"tt_tables.optimizer_state_{i}", table_state_key(c.name, k, optimizer_state=True))]
                i += 1
        return keys

    @staticmethod
    def _per_table_state_dict(module: "TTEmbeddingBagCollection", destination, prefix, local_metadata):
        """Cores (and fused-optimizer state) under their table's name, so that a checkpoint does not
        depend on the order of the tables; an unfused module has no optimizer state."""
        for internal, public in module._state_keys():
            value = destination.pop(prefix + internal, None)
            if value is not None and (module.fused_params is not None or "tt_cores" in internal):
                destination[prefix + public] = value
        return destination

    def _load_per_table_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                   unexpected_keys, error_msgs) -> None:
        for internal, public in self._state_keys():
            if prefix + public in state_dict:
                state_dict[prefix + internal] = state_dict.pop(prefix + public)
            elif "optimizer_state" in internal and (prefix + internal) not in state_dict:
                # a checkpoint of an unfused module (or of a sharded one): the state starts afresh
                state_dict[prefix + internal] = getattr(self.tt_tables, internal.split(".")[-1])

    def is_weighted(self) -> bool:
        return self._is_weighted

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """KJT (keys ⊇ this collection's features) -> KeyedTensor [B, sum_f D_f], config order."""
        kjt = select_features(check_jagged(features, self.tt_tables.tt_cores[0].device), self.feature_names)
        out = self.tt_tables(kjt.values(), kjt.offsets(), kjt.weights() if self._is_weighted else None)
        return KeyedTensor(keys=self.feature_names, length_per_key=self.tt_tables.feature_dims, values=out)


class MixedEmbeddingBagCollection(nn.Module):
    """TT tables and plain TorchRec tables behind one EmbeddingBagCollection interface.

    Holds a ``TTEmbeddingBagCollection`` (child ``tt``) and a TorchRec
    ``EmbeddingBagCollection`` (child ``dense``); TorchRec's planner and DMP walk into the
    children and shard each with its own sharder. Output keys follow the config order; once DMP
    has sharded the children, the children's order (``side_by_side``), which is TorchRec's: a
    sharded EmbeddingBagCollection orders its keys by sharding.
    """

    def __init__(self, tables: Sequence[AnyTableConfig], is_weighted: bool = False,
                 device: Optional[torch.device] = None, seed: int = 0,
                 fused_params: Optional[dict[str, Any]] = None) -> None:
        super().__init__()
        check_table_configs(tables)
        self._configs = list(tables)  # kept here: DMP replaces the children by sharded modules
        self._is_weighted = is_weighted
        tt = [c for c in tables if isinstance(c, TTEmbeddingBagConfig)]
        dense = [c for c in tables if not isinstance(c, TTEmbeddingBagConfig)]
        self.tt = TTEmbeddingBagCollection(tt, is_weighted, device, seed, fused_params) if tt else None
        self.dense = EmbeddingBagCollection(dense, is_weighted=is_weighted, device=device) if dense else None
        self.feature_names = [f for c in self._configs for f in c.feature_names]
        self._feature_dims = [c.embedding_dim for c in self._configs for _ in c.feature_names]

    def embedding_bag_configs(self) -> list[AnyTableConfig]:
        return self._configs

    def is_weighted(self) -> bool:
        return self._is_weighted

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Every child's input distribution starts before any child waits on its own, so under DMP
        the all-to-alls of the TT and the plain tables overlap (a child that is not sharded, or whose
        forward TorchRec's train pipeline replaced, is simply called)."""
        started = [(c, *_start_input_dist(c, features)) for c in (self.tt, self.dense) if c is not None]
        # first waits: the split sizes arrive and every child's tensor all-to-all starts
        dispatched = [(c, ctx, None if splits is None else splits.wait()) for c, ctx, splits in started]
        outputs = [child(features) if tensors is None else child.compute_and_output_dist(ctx, tensors.wait())
                   for child, ctx, tensors in dispatched]
        pooled = [out.wait() if hasattr(out, "wait") else out for out in outputs]
        if any(hasattr(child, "input_dist") for child, _, _ in dispatched):
            return side_by_side(pooled)
        # config order: TorchRec's regroup, one fbgemm permute of the side-by-side values
        values = KeyedTensor.regroup(pooled, [self.feature_names])[0]
        return KeyedTensor(keys=self.feature_names, length_per_key=self._feature_dims, values=values)


@torch.fx.wrap  # a leaf when TorchRec's train pipeline traces the model
def side_by_side(pooled: list[KeyedTensor]) -> KeyedTensor:
    """The children's outputs as one KeyedTensor, keys in the children's own order: values [B, sum
    of the children's dims], one ``cat`` (none for one child). Sharded children order their keys by
    sharding, as TorchRec's sharded EmbeddingBagCollection does, so this is the order a sharded
    collection returns; its consumers read by key (DLRM: ``to_dict()``)."""
    if len(pooled) == 1:
        return pooled[0]
    return KeyedTensor(keys=[k for kt in pooled for k in kt.keys()],
                       length_per_key=[n for kt in pooled for n in kt.length_per_key()],
                       values=torch.cat([kt.values() for kt in pooled], dim=1))


def _start_input_dist(child: nn.Module, features: KeyedJaggedTensor) -> tuple[Any, Any]:
    """(context, input-dist awaitable) of a TorchRec sharded module running its own forward, else
    (None, None): also while the model is traced (``features`` a ``torch.fx.Proxy``), so that the
    trace records a call of each child, which TorchRec's train pipeline looks for."""
    own_forward = getattr(type(child), "forward", None)
    if (isinstance(features, torch.fx.Proxy) or not hasattr(child, "input_dist")
            or getattr(child.forward, "__func__", None) is not own_forward):
        return None, None
    ctx = child.create_context()
    return ctx, child.input_dist(ctx, features)


def check_table_configs(tables: Sequence[AnyTableConfig]) -> None:
    """Unique non-empty table names; each feature feeds one table."""
    if not tables:
        raise ValueError("an embedding bag collection needs at least one table")
    names = [c.name for c in tables]
    if len(set(names)) != len(names) or any(not n for n in names):
        raise ValueError(f"table names must be unique and non-empty, got {names}")
    features = [f for c in tables for f in c.feature_names]
    if len(set(features)) != len(features):
        raise ValueError(f"a feature may feed only one table, got {features}")


def check_kjt_layout(kjt: KeyedJaggedTensor) -> list[str]:
    """Rejects what TT collections do not support (no host sync): a key given twice, a variable
    batch size per feature. Returns the keys."""
    keys = kjt.keys()
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise ValueError(f"KeyedJaggedTensor has the keys {repeated} more than once; each feature must appear once")
    if kjt.variable_stride_per_key():
        raise ValueError("KeyedJaggedTensor has a variable batch size per feature (stride_per_key_per_rank / "
                         "inverse_indices), which TT collections do not support; give every feature the same batch")
    return keys


def check_jagged(kjt: KeyedJaggedTensor, device: Optional[torch.device] = None) -> KeyedJaggedTensor:
    """Rejects a malformed KJT in the user's terms (its lengths) before the offsets are derived:
    ValueError when it is not on ``device`` (the tables'), TypeError for non-integer values or
    lengths or non-float weights, ValueError for a negative length, a length count that is not keys x batch, or lengths that
    do not add up to the number of values."""
    values = kjt.values()
    if device is not None and isinstance(values, Tensor) and values.device != torch.device(device):
        raise ValueError(f"the KeyedJaggedTensor is on {values.device} but the tables are on {torch.device(device)}; "
                         "move it with .to(device)")
    if isinstance(values, Tensor) and values.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"KeyedJaggedTensor values (row indices) must be an int32 or int64 tensor, got {values.dtype}")
    weights = kjt.weights_or_none()
    if weights is not None and (not isinstance(weights, Tensor) or not weights.is_floating_point()):
        raise TypeError(f"KeyedJaggedTensor weights must be a floating-point tensor, got "
                        f"{getattr(weights, 'dtype', type(weights).__name__)}")
    keys = check_kjt_layout(kjt)
    lengths = kjt.lengths_or_none()
    if lengths is None:
        return kjt  # built from offsets: normalize_lookup_inputs checks those
    if not isinstance(lengths, Tensor) or lengths.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"KeyedJaggedTensor lengths must be an int32 or int64 tensor, got "
                        f"{getattr(lengths, 'dtype', type(lengths).__name__)}")
    if lengths.dim() != 1:
        raise ValueError(f"KeyedJaggedTensor lengths must be 1-D, got shape {tuple(lengths.shape)}")
    n = lengths.numel()
    stride = kjt.stride() if keys else 0
    if n != len(keys) * stride:
        raise ValueError(f"KeyedJaggedTensor has {n} lengths for {len(keys)} keys and batch size {stride}; "
                         f"expected {len(keys) * stride}")
    if n and bool((lengths < 0).any()):
        i = int(torch.nonzero(lengths < 0)[0])
        raise ValueError(f"KeyedJaggedTensor lengths must be >= 0: feature '{keys[i // stride]}', sample "
                         f"{i % stride} has length {int(lengths[i])}")
    if not isinstance(values, Tensor) or values.dim() != 1:
        return kjt  # normalize_lookup_inputs names the problem
    if n and int(lengths.max()) > values.numel():  # also keeps the sum below from overflowing int64
        i = int(torch.argmax(lengths))
        raise ValueError(f"KeyedJaggedTensor length {int(lengths[i])} (feature '{keys[i // stride]}', sample "
                         f"{i % stride}) exceeds its {values.numel()} values")
    total = int(lengths.sum()) if n else 0
    if total != values.numel():
        raise ValueError(f"KeyedJaggedTensor lengths add up to {total} but it has {values.numel()} values")
    return kjt


def feature_positions(keys: Sequence[str], names: Sequence[str]) -> list[int]:
    """The position of each of ``names`` among a KeyedJaggedTensor's ``keys``; KeyError naming the
    missing ones."""
    index = {k: i for i, k in enumerate(keys)}
    missing = [n for n in names if n not in index]
    if missing:
        raise KeyError(f"features {missing} are missing from the KeyedJaggedTensor (its keys: {list(keys)})")
    return [index[n] for n in names]


def select_features(features: KeyedJaggedTensor, names: Sequence[str]) -> KeyedJaggedTensor:
    """The KJT restricted to ``names``, in that order (no copy when it already is)."""
    if list(features.keys()) == list(names):
        return features
    return features.permute(feature_positions(features.keys(), names))
