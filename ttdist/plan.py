"""Sharding plans of ttdist models: YAML files, validation, a readable table, and compression to a memory budget.

A plan is TorchRec's ``ShardingPlan``: module path -> table -> ``ParameterSharding``. On disk it
is YAML that a person can edit::

    sparse_arch.embedding_bag_collection.tt:        # module path (as DistributedModelParallel sees it)
      t0:                                           # table name
        sharding_type: row_wise                     # table_wise | row_wise | column_wise | data_parallel | ...
        compute_kernel: customized_kernel           # TT tables: customized_kernel; TorchRec tables: fused, dense, ...
        ranks: [0, 1]                               # the rank of every shard, in shard order
        shards:                                     # ShardMetadata of the [rows, dim] table (none: data_parallel)
        - {offsets: [0, 0], sizes: [500, 8], rank: 0, device: cpu}
        - {offsets: [500, 0], sizes: [500, 8], rank: 1, device: cpu}

For a TT table the shards describe TorchRec's 2-D proxy ``[num_embeddings, dim]``; the sharded
module derives the TT-aligned split of the cores from the sharding type and the ranks
(``ttdist.distributed.shard_layout``). Only ``sharding_type``, ``compute_kernel``, ``ranks`` and
the sharding spec are stored; ``plan_to_dict`` refuses plans that set other ``ParameterSharding``
fields (cache_params, key_value_params, ...) rather than dropping them silently.

``load_plan`` validates a file against the world size and the model's tables and raises
``ValueError`` listing every problem. ``format_plan`` prints a plan with the bytes each rank
holds. ``compress_to_budget`` picks, per table, dense or TT (and the TT rank) so that TorchRec's
planner fits the model into a per-rank memory budget with the least compression.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import torch
import yaml
from torch import nn
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharding_spec import EnumerableShardingSpec
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.planner import Topology
from torchrec.distributed.planner.types import PlannerError, PlannerErrorType
from torchrec.distributed.types import EmbeddingModuleShardingPlan, ParameterSharding, ShardingPlan, ShardingType
from torchrec.modules.embedding_configs import DATA_TYPE_NUM_BITS, EmbeddingBagConfig

from ttdist.distributed.embeddingbag import TT_COMPUTE_KERNEL, TTEmbeddingBagCollectionSharder
from ttdist.distributed.planner import make_planner, tt_shard_bytes
from ttdist.distributed.shard_layout import COLUMN_WISE, DATA_PARALLEL, TABLE_WISE, table_shards
from ttdist.modules.collection import AnyTableConfig, MixedEmbeddingBagCollection, TTEmbeddingBagConfig
from ttdist.modules.optim import OptimType

SHARDING_TYPES = tuple(t.value for t in ShardingType)
COMPUTE_KERNELS = tuple(k.value for k in EmbeddingComputeKernel)
_EXTRA_FIELDS = ("cache_params", "enforce_hbm", "stochastic_rounding", "bounds_check_mode", "output_dtype",
                 "key_value_params")
_FULL_WIDTH = ("table_wise", "row_wise", "table_row_wise")  # shards span all columns
_FULL_HEIGHT = ("table_wise", "column_wise", "table_column_wise")  # shards span all rows

# module path -> table name -> its config (None: only the name is known). Key None: any module.
TableSpec = Union[nn.Module, Mapping[Optional[str], Iterable[Union[str, EmbeddingBagConfig]]],
                  Sequence[Union[str, EmbeddingBagConfig]]]


# ----------------------------------------------------------------------------- dict / YAML
def plan_to_dict(plan: ShardingPlan) -> dict[str, dict[str, dict[str, Any]]]:
    """``ShardingPlan`` -> plain dict (YAML/JSON-able): module -> table -> sharding (see module docstring)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for module_path, module_plan in plan.plan.items():
        tables: dict[str, dict[str, Any]] = {}
        for name, ps in module_plan.items():
            extra = [f for f in _EXTRA_FIELDS if getattr(ps, f, None) is not None]
            if extra:
                raise ValueError(f"module '{module_path}', table '{name}': plan_to_dict stores only sharding_type, "
                                 f"compute_kernel, ranks and shards, but this ParameterSharding also sets {extra}")
            entry: dict[str, Any] = {"sharding_type": str(ps.sharding_type), "compute_kernel": str(ps.compute_kernel),
                                     "ranks": [int(r) for r in ps.ranks] if ps.ranks is not None else None}
            if ps.sharding_spec is not None:
                if not isinstance(ps.sharding_spec, EnumerableShardingSpec):
                    raise ValueError(f"module '{module_path}', table '{name}': only EnumerableShardingSpec is "
                                     f"supported, got {type(ps.sharding_spec).__name__}")
                entry["shards"] = [{"offsets": [int(o) for o in s.shard_offsets],
                                    "sizes": [int(n) for n in s.shard_sizes],
                                    "rank": int(s.placement.rank()), "device": str(s.placement.device())}
                                   for s in ps.sharding_spec.shards]
            else:
                entry["shards"] = []
            tables[name] = entry
        out[module_path] = tables
    return out


def _int_list(value: Any, where: str, what: str) -> list[int]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError(f"{where}: '{what}' must be a list of integers, got {value!r}")
    return [int(v) for v in value]


def plan_from_dict(d: Mapping[str, Any], source: str = "plan") -> ShardingPlan:
    """The inverse of ``plan_to_dict``; checks the structure (types, required keys), not the model.

    ``source`` prefixes error messages (``load_plan`` passes the file name).
    """
    if not isinstance(d, Mapping):
        raise ValueError(f"{source}: a plan is a mapping module path -> table -> sharding, got {type(d).__name__}")
    plan: dict[str, EmbeddingModuleShardingPlan] = {}
    for module_path, tables in d.items():
        if not isinstance(tables, Mapping) or not tables:
            raise ValueError(f"{source}: module '{module_path}' must map table names to shardings, got {tables!r}")
        module_plan = EmbeddingModuleShardingPlan()
        for name, entry in tables.items():
            where = f"{source}: module '{module_path}', table '{name}'"
            if not isinstance(entry, Mapping):
                raise ValueError(f"{where}: expected a mapping with sharding_type, compute_kernel, ranks, shards; "
                                 f"got {entry!r}")
            unknown = sorted(set(entry) - {"sharding_type", "compute_kernel", "ranks", "shards"})
            if unknown:
                raise ValueError(f"{where}: unknown keys {unknown} "
                                 "(valid: sharding_type, compute_kernel, ranks, shards)")
            for key in ("sharding_type", "compute_kernel"):
                if not isinstance(entry.get(key), str):
                    raise ValueError(f"{where}: '{key}' must be a string, got {entry.get(key)!r}")
            ranks = entry.get("ranks")
            ranks = None if ranks is None else _int_list(ranks, where, "ranks")
            shards = entry.get("shards") or []
            if not isinstance(shards, list):
                raise ValueError(f"{where}: 'shards' must be a list, got {shards!r}")
            metas = []
            for j, s in enumerate(shards):
                swhere = f"{where}, shard {j}"
                if not isinstance(s, Mapping) or not {"offsets", "sizes", "rank"} <= set(s):
                    raise ValueError(f"{swhere}: expected {{offsets, sizes, rank, device}}, got {s!r}")
                offsets, sizes = _int_list(s["offsets"], swhere, "offsets"), _int_list(s["sizes"], swhere, "sizes")
                if len(offsets) != len(sizes):
                    raise ValueError(f"{swhere}: offsets {offsets} and sizes {sizes} differ in length")
                rank = s["rank"]
                if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
                    raise ValueError(f"{swhere}: 'rank' must be a non-negative integer, got {rank!r}")
                device = str(s.get("device", "cpu"))
                try:  # torch raises RuntimeError for an unknown device type
                    metas.append(ShardMetadata(shard_offsets=offsets, shard_sizes=sizes,
                                               placement=f"rank:{rank}/{device}"))
                except (RuntimeError, ValueError) as e:
                    raise ValueError(f"{swhere}: bad placement rank:{rank}/{device}: {e}") from None
            try:  # EnumerableShardingSpec rejects overlapping shards itself
                spec = EnumerableShardingSpec(metas) if metas else None
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            module_plan[str(name)] = ParameterSharding(
                sharding_type=entry["sharding_type"], compute_kernel=entry["compute_kernel"], ranks=ranks,
                sharding_spec=spec)
        plan[str(module_path)] = module_plan
    return ShardingPlan(plan=plan)


_HEADER = ("# ttdist sharding plan (ttdist.plan.load_plan): module path -> table -> sharding.\n"
           "# shards: TorchRec ShardMetadata of the [rows, dim] table; TT tables split their cores\n"
           "# from sharding_type and ranks (ttdist.distributed.shard_layout).\n")


class _FlowMap(dict):
    """A mapping written on one line (a shard)."""


class _PlanDumper(yaml.SafeDumper):
    pass


_PlanDumper.add_representer(_FlowMap, lambda dumper, data: dumper.represent_mapping(
    "tag:yaml.org,2002:map", data.items(), flow_style=True))


def save_plan(plan: ShardingPlan, path: Union[str, Path]) -> None:
    """Writes ``plan`` as YAML (see the module docstring), one line per shard."""
    d = plan_to_dict(plan)
    for tables in d.values():
        for entry in tables.values():
            entry["shards"] = [_FlowMap(s) for s in entry["shards"]]
    text = yaml.dump(d, Dumper=_PlanDumper, sort_keys=False, default_flow_style=None, width=120)
    Path(path).write_text(_HEADER + text)


def load_plan(path: Union[str, Path], world_size: Optional[int] = None, tables: Optional[TableSpec] = None
              ) -> ShardingPlan:
    """Reads a YAML plan and validates it (``validate_plan``); raises ValueError naming the file and problem.

    Args:
        world_size: ranks of the job; shards on ranks >= world_size are rejected.
        tables: the model's tables per module — the model itself (its leaf embedding
            collections), ``{module_path: [table name or config, ...]}``, or a flat list of
            configs/names. With configs, the shards are checked to tile each table and TT
            tables are checked against their TT shape.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: malformed YAML: {e}") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read the plan: {e}") from None
    if data is None:
        raise ValueError(f"{path}: the plan file is empty")
    plan = plan_from_dict(data, source=str(path))
    validate_plan(plan, world_size, tables, source=str(path))
    return plan


# ------------------------------------------------------------------------------ validation
def _leaf_collections(model: nn.Module) -> dict[Optional[str], list[AnyTableConfig]]:
    """Embedding collections that DMP shards: modules with ``embedding_bag_configs`` and no such child."""
    has = {name: m for name, m in model.named_modules() if callable(getattr(m, "embedding_bag_configs", None))}
    leaves = {name: m for name, m in has.items()
              if not any(other != name and (name == "" or other.startswith(name + ".")) for other in has)}
    return {name: list(m.embedding_bag_configs()) for name, m in leaves.items()}


def _table_spec(tables: Optional[TableSpec]) -> Optional[dict[Optional[str], dict[str, Optional[AnyTableConfig]]]]:
    if tables is None:
        return None
    if isinstance(tables, nn.Module):
        raw: Mapping[Optional[str], Iterable] = _leaf_collections(tables)
    elif isinstance(tables, Mapping):
        raw = tables
    else:
        raw = {None: tables}
    out: dict[Optional[str], dict[str, Optional[AnyTableConfig]]] = {}
    for module_path, items in raw.items():
        out[module_path] = {}
        for item in items:
            if isinstance(item, str):
                out[module_path][item] = None
            else:
                out[module_path][item.name] = item
    return out


def _plan_ranks(plan: ShardingPlan) -> list[int]:
    ranks = []
    for module_plan in plan.plan.values():
        for ps in module_plan.values():
            ranks += list(ps.ranks or [])
            if isinstance(ps.sharding_spec, EnumerableShardingSpec):
                ranks += [s.placement.rank() for s in ps.sharding_spec.shards]
    return ranks


def _shard_rects(ps: ParameterSharding) -> list[tuple[list[int], list[int], int]]:
    if not isinstance(ps.sharding_spec, EnumerableShardingSpec):
        return []
    return [(list(s.shard_offsets), list(s.shard_sizes), s.placement.rank()) for s in ps.sharding_spec.shards]


def _tiling_problems(rects: list[tuple[list[int], list[int], int]], rows: int, dim: int,
                     sharding_type: str) -> list[str]:
    """Why the shards do not tile the [rows, dim] table exactly (empty: they do)."""
    problems = []
    for j, (off, size, _) in enumerate(rects):
        if len(off) != 2:
            problems.append(f"shard {j} is {len(off)}-D; tables are 2-D [rows, dim]")
            continue
        if min(off) < 0 or min(size) < 0 or off[0] + size[0] > rows or off[1] + size[1] > dim:
            problems.append(f"shard {j} (offsets {off}, sizes {size}) lies outside the table [{rows}, {dim}]")
        if sharding_type in _FULL_WIDTH and (off[1], size[1]) != (0, dim):
            problems.append(f"{sharding_type} shard {j} must span all {dim} columns, got columns "
                            f"[{off[1]}, {off[1] + size[1]})")
        if sharding_type in _FULL_HEIGHT and (off[0], size[0]) != (0, rows):
            problems.append(f"{sharding_type} shard {j} must span all {rows} rows, "
                            f"got rows [{off[0]}, {off[0] + size[0]})")
    if problems:
        return problems
    for i in range(len(rects)):
        for j in range(i + 1, len(rects)):
            (a, sa, _), (b, sb, _) = rects[i], rects[j]
            if all(a[k] < b[k] + sb[k] and b[k] < a[k] + sa[k] for k in range(2)):
                problems.append(f"shards {i} and {j} overlap (offsets {a} and {b})")
    area = sum(s[0] * s[1] for _, s, _ in rects)
    if not problems and area != rows * dim:
        problems.append(f"the shards cover {area} of the table's {rows} x {dim} = {rows * dim} entries")
    return problems


def validate_plan(plan: ShardingPlan, world_size: Optional[int] = None, tables: Optional[TableSpec] = None,
                  source: str = "plan") -> None:
    """Raises ValueError listing every problem of ``plan`` (see ``load_plan`` for the arguments).

    Checks: known sharding types and compute kernels; every rank < world_size; ``ranks`` equal
    the shards' placements; shards present unless data_parallel, and (with configs) tiling the
    [rows, dim] table with the geometry of the sharding type; every table and module known to
    the model and every table of a planned module planned; TT tables use the TT kernel and a
    sharding their TT shape can take (``shard_layout.table_shards``: e.g. no more column_wise
    shards than q_1, row_wise on ranks 0..W-1).
    """
    spec = _table_spec(tables)
    all_ranks = _plan_ranks(plan)
    world = world_size if world_size is not None else (max(all_ranks) + 1 if all_ranks else 1)
    problems: list[str] = []
    if spec is not None and None not in spec:
        for module_path in plan.plan:
            if module_path not in spec:
                problems.append(f"module '{module_path}' is not an embedding collection of the model "
                                f"(its collections: {sorted(k for k in spec if k is not None)})")
    for module_path, module_plan in plan.plan.items():
        known = None if spec is None else (spec.get(module_path) if None not in spec else spec[None])
        if known is not None:
            unknown = [n for n in module_plan if n not in known]
            if unknown:
                problems.append(f"module '{module_path}': tables {unknown} are not in the model "
                                f"(its tables: {sorted(known)})")
            if None not in spec:
                missing = [n for n in known if n not in module_plan]
                if missing:
                    problems.append(f"module '{module_path}': the plan misses the model's tables {missing}")
        for name, ps in module_plan.items():
            where = f"module '{module_path}', table '{name}'"
            st = ps.sharding_type
            if st not in SHARDING_TYPES:
                problems.append(f"{where}: unknown sharding type '{st}' (valid: {', '.join(SHARDING_TYPES)})")
                continue
            if ps.compute_kernel not in COMPUTE_KERNELS:
                problems.append(f"{where}: unknown compute kernel '{ps.compute_kernel}' "
                                f"(valid: {', '.join(COMPUTE_KERNELS)})")
            rects = _shard_rects(ps)
            ranks = list(ps.ranks or [])
            bad = sorted({r for r in ranks + [r for _, _, r in rects] if not 0 <= r < world})
            if bad and world_size is not None:
                problems.append(f"{where}: ranks {bad} do not exist in a world of {world_size} ranks "
                                f"(valid: 0..{world_size - 1})")
                continue
            if st == DATA_PARALLEL:
                if rects:
                    problems.append(f"{where}: data_parallel keeps a full copy on every rank and takes no shards")
            elif not rects:
                problems.append(f"{where}: {st} needs shards (offsets, sizes, rank)")
                continue
            elif ranks != [r for _, _, r in rects]:
                problems.append(f"{where}: ranks {ranks} do not match the shards' ranks {[r for _, _, r in rects]}")
            if st == TABLE_WISE and len(rects) != 1:
                problems.append(f"{where}: table_wise takes exactly one shard, got {len(rects)}")
                continue
            config = known.get(name) if known is not None else None
            if config is None:
                continue
            if st != DATA_PARALLEL:
                problems += [f"{where}: {p}" for p in
                             _tiling_problems(rects, config.num_embeddings, config.embedding_dim, st)]
            if isinstance(config, TTEmbeddingBagConfig):
                if ps.compute_kernel != TT_COMPUTE_KERNEL:
                    problems.append(f"{where}: a TT table takes compute_kernel '{TT_COMPUTE_KERNEL}', "
                                    f"got '{ps.compute_kernel}'")
                try:
                    table_shards(name, config.tt_shape(), st, ranks, world,
                                 [r for _, _, r in rects] if st == COLUMN_WISE else None)
                except ValueError as e:
                    problems.append(f"{where}: {e}")
            elif ps.compute_kernel == TT_COMPUTE_KERNEL:
                problems.append(f"{where}: compute_kernel '{TT_COMPUTE_KERNEL}' is ttdist's TT kernel, but this "
                                "table is a plain TorchRec table")
    if problems:
        raise ValueError(f"{source}: invalid sharding plan:\n  - " + "\n  - ".join(problems))


# ------------------------------------------------------------------------------ bytes per rank
def _element_size(config: EmbeddingBagConfig) -> int:
    return DATA_TYPE_NUM_BITS[config.data_type] // 8


def tt_bytes_per_rank(config: TTEmbeddingBagConfig, ps: ParameterSharding, world_size: int,
                      optimizer: OptimType = OptimType.EXACT_SGD) -> list[int]:
    """Bytes of the cores (and optimizer state) each rank holds of one TT table under ``ps``.

    What ``ShardedTTEmbeddingBagCollection`` allocates: the G_1 slice of every local shard plus
    one copy of G_2..G_d on every rank holding a shard (also when it holds several column_wise
    shards). TorchRec's planner estimates per shard, before placement, so its numbers count
    G_2..G_d once per shard (``ttdist.distributed.planner``).
    """
    shape = config.tt_shape()
    rects = _shard_rects(ps)
    shards = table_shards(config.name, shape, ps.sharding_type, list(ps.ranks or []), world_size,
                          [r for _, _, r in rects] if ps.sharding_type == COLUMN_WISE else None)
    rest = shape.core_shapes[1:]
    out = []
    for rank in range(world_size):
        local = [s for s in shards if s.rank == rank]
        if not local:
            out.append(0)
            continue
        r0, r1 = shape.ranks[0], shape.ranks[1]
        params = (sum((s.p1[1] - s.p1[0]) * r0 * (s.q1[1] - s.q1[0]) * r1 for s in local)
                  + sum(math.prod(c) for c in rest))
        slices = sum(s.p1[1] - s.p1[0] for s in local) + sum(c[0] for c in rest)
        out.append(tt_shard_bytes(config, params, optimizer, slices, 4))
    return out


def dense_bytes_per_rank(config: EmbeddingBagConfig, ps: ParameterSharding, world_size: int) -> list[int]:
    """Weight bytes each rank holds of a plain TorchRec table (TorchRec's planner adds optimizer state and I/O)."""
    e = _element_size(config)
    out = [0] * world_size
    if ps.sharding_type == DATA_PARALLEL:
        return [config.num_embeddings * config.embedding_dim * e] * world_size
    for _, size, rank in _shard_rects(ps):
        out[rank] += math.prod(size) * e
    return out


def _configs_by_module(tables: TableSpec) -> dict[Optional[str], dict[str, AnyTableConfig]]:
    spec = _table_spec(tables) or {}
    out = {}
    for module_path, named in spec.items():
        missing = [n for n, c in named.items() if c is None]
        if missing:
            raise ValueError(f"format_plan needs the table configs, got only the names {missing}")
        out[module_path] = dict(named)  # type: ignore[arg-type]
    return out


def _lookup(configs: dict[Optional[str], dict[str, AnyTableConfig]], module_path: str, name: str) -> AnyTableConfig:
    for key in (module_path, None):
        if key in configs and name in configs[key]:
            return configs[key][name]
    raise ValueError(f"module '{module_path}', table '{name}': no config given for this table")


def plan_bytes_per_rank(plan: ShardingPlan, tables: TableSpec, world_size: int,
                        optimizer: OptimType = OptimType.EXACT_SGD) -> dict[tuple[str, str], list[int]]:
    """(module path, table) -> bytes per rank: TT cores (+ TT optimizer state), dense weights."""
    configs = _configs_by_module(tables)
    out = {}
    for module_path, module_plan in plan.plan.items():
        for name, ps in module_plan.items():
            cfg = _lookup(configs, module_path, name)
            out[(module_path, name)] = (tt_bytes_per_rank(cfg, ps, world_size, optimizer)
                                        if isinstance(cfg, TTEmbeddingBagConfig)
                                        else dense_bytes_per_rank(cfg, ps, world_size))
    return out


def _ranks_text(ranks: Sequence[int]) -> str:
    ranks = list(ranks)
    if len(ranks) > 2 and ranks == list(range(ranks[0], ranks[0] + len(ranks))):
        return f"{ranks[0]}-{ranks[-1]}"
    return ",".join(str(r) for r in ranks)


def format_plan(plan: ShardingPlan, tables: TableSpec, topology: Union[Topology, int],
                optimizer: OptimType = OptimType.EXACT_SGD) -> str:
    """A readable table of ``plan``: one line per table, then the total per rank.

    Columns: module, table, rows, dim, TT ranks (or 'dense'), sharding type, kernel, ranks, and
    the bytes each rank holds of the table — for TT tables the real cores (``tt_bytes_per_rank``;
    plus optimizer state when ``optimizer`` keeps one), for plain tables the weights.
    ``tables``: the model or its configs (as for ``load_plan``); ``topology``: a Topology or the
    world size.
    """
    world = topology if isinstance(topology, int) else topology.world_size
    configs = _configs_by_module(tables)
    per_rank = plan_bytes_per_rank(plan, tables, world, optimizer)
    header = ["module", "table", "rows", "dim", "TT ranks", "sharding", "kernel", "ranks"] + [f"rank {r} bytes"
                                                                                             for r in range(world)]
    rows = []
    totals = [0] * world
    for module_path, module_plan in plan.plan.items():
        for name, ps in module_plan.items():
            cfg = _lookup(configs, module_path, name)
            tt = "x".join(str(r) for r in cfg.tt_ranks) if isinstance(cfg, TTEmbeddingBagConfig) else "dense"
            nbytes = per_rank[(module_path, name)]
            totals = [a + b for a, b in zip(totals, nbytes)]
            rows.append([module_path or "(root)", name, str(cfg.num_embeddings), str(cfg.embedding_dim), tt,
                         ps.sharding_type, ps.compute_kernel, _ranks_text(ps.ranks or [])]
                        + [f"{n:,}" for n in nbytes])
    rows.append(["total", "", "", "", "", "", "", ""] + [f"{n:,}" for n in totals])
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    numeric = {2, 3} | set(range(8, len(header)))

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in numeric else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    what = "TT: cores" + (" + optimizer state" if optimizer.code else "") + "; dense: weights"
    return "\n".join([f"sharding plan on {world} ranks (bytes per rank: {what})", line(header), rule]
                     + [line(r) for r in rows[:-1]] + [rule, line(rows[-1])])


# -------------------------------------------------------------------------- memory budget
class BudgetError(ValueError):
    """The tables do not fit the budget even at the smallest TT rank of the ladder."""

    def __init__(self, message: str, required_bytes: int, budget_bytes: int) -> None:
        super().__init__(message)
        self.required_bytes, self.budget_bytes = required_bytes, budget_bytes


@dataclass
class BudgetResult:
    """What ``compress_to_budget`` chose."""

    configs: list[AnyTableConfig]
    """The tables in input order: plain EmbeddingBagConfig (dense) or TTEmbeddingBagConfig."""
    plan: ShardingPlan
    """TorchRec's plan of ``MixedEmbeddingBagCollection(configs)`` (module paths under ``module_fqn``)."""
    storage_per_rank: list[int]
    """The planner's estimate of the bytes each rank holds (compute-device memory)."""
    steps: list[str] = field(default_factory=list)
    """The compression steps, in order (empty: all dense fit)."""


def _tt_config(base: EmbeddingBagConfig, rank: int, num_cores: int,
               tt_options: Mapping[str, Any]) -> TTEmbeddingBagConfig:
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(EmbeddingBagConfig) if f.init}
    return TTEmbeddingBagConfig(**fields, tt_ranks=[rank] * (num_cores - 1), **dict(tt_options))


def _weight_bytes(config: AnyTableConfig) -> int:
    if isinstance(config, TTEmbeddingBagConfig):
        return 4 * config.tt_shape().num_parameters
    return config.num_embeddings * config.embedding_dim * _element_size(config)


def _budget_topology(topology: Topology, budget: int) -> Topology:
    topo = copy.deepcopy(topology)
    on_hbm = topo.compute_device in ("cuda", "mtia")
    for device in topo.devices:
        if on_hbm:
            device.storage.hbm = budget
        else:
            device.storage.ddr = budget
    return topo


def _rank_storage(planner, world: int, on_hbm: bool) -> list[int]:
    out = [0] * world
    for option in planner._best_plan or []:
        for shard in option.shards:
            out[shard.rank] += shard.storage.hbm if on_hbm else shard.storage.ddr
    return out


def compress_to_budget(tables: Sequence[EmbeddingBagConfig], topology: Topology, hbm_per_rank: int,
                       rank_ladder: Sequence[int] = (4, 8, 16, 32, 64), *, batch_size: int = 512,
                       num_cores: int = 3, optimizer: OptimType = OptimType.EXACT_SGD,
                       tt_options: Optional[Mapping[str, Any]] = None, constraints=None, sharders=None,
                       module_fqn: str = "") -> BudgetResult:
    """Dense or TT per table, and the TT rank, so that the model fits ``hbm_per_rank`` bytes per rank.

    The rule (greedy, largest table first):

    1. Start with every table dense.
    2. Plan with TorchRec's ``EmbeddingShardingPlanner`` (``make_planner``) on ``topology`` with
       each rank's memory set to ``hbm_per_rank`` (HBM on cuda/mtia, DDR on cpu). Storage is
       TorchRec's estimate for dense tables and the real TT bytes for TT tables
       (``TTStorageEstimator``: the cores of each shard, ``TTShape.num_parameters``, plus
       optimizer state). If the plan fits, stop. (The plan is skipped when the weights alone,
       summed over tables, exceed ``world_size * hbm_per_rank``.)
    3. Otherwise compress by one step the table holding the most bytes now (weights:
       rows * dim * element size dense, 4 * TT parameters): a dense table becomes TT at the
       highest ladder rank whose cores are smaller than the dense table (never if none is); a TT
       table moves one rung down the ladder. Ties go to the earlier table. Back to 2. (Ranks
       above a table's TT rank limit — ``make_tt_shape`` — are skipped.)
    4. If no table can be compressed further, raise ``BudgetError`` with the bytes required.

    So each table keeps as much capacity as possible: only the largest tables are compressed,
    every TT table reaches a rung before any is pushed below it while it is the largest, and the
    result is minimal in that undoing its last step no longer fits.

    Args:
        tables: plain TorchRec EmbeddingBagConfigs.
        rank_ladder: TT ranks to choose from (every inner rank of a table is the same).
        batch_size: per-rank batch size for the planner.
        num_cores: TT cores d of a compressed table (``tt_ranks`` has d - 1 entries).
        optimizer: the TT fused optimizer (its state counts in the TT bytes).
        tt_options: extra TTEmbeddingBagConfig fields for compressed tables (e.g. weight_dist).
        constraints: TorchRec ParameterConstraints per table name (applied in every plan).
        sharders: default ``[TTEmbeddingBagCollectionSharder({"optimizer": optimizer}),
            EmbeddingBagCollectionSharder()]``.
        module_fqn: where the MixedEmbeddingBagCollection sits in the model (e.g.
            ``"sparse_arch.embedding_bag_collection"``); prefixes the plan's module paths.
    """
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder

    tables = list(tables)
    tt_given = [c.name for c in tables if isinstance(c, TTEmbeddingBagConfig)]
    if tt_given:
        raise TypeError(f"compress_to_budget takes plain EmbeddingBagConfigs, got TT tables {tt_given}")
    ladder = sorted(set(int(r) for r in rank_ladder), reverse=True)
    if not ladder or ladder[-1] < 1:
        raise ValueError(f"rank_ladder must hold positive ranks, got {list(rank_ladder)}")
    if hbm_per_rank <= 0:
        raise ValueError(f"hbm_per_rank must be positive, got {hbm_per_rank}")
    sharders = sharders or [TTEmbeddingBagCollectionSharder(fused_params={"optimizer": optimizer}),
                            EmbeddingBagCollectionSharder()]
    topo = _budget_topology(topology, hbm_per_rank)
    world, on_hbm = topo.world_size, topo.compute_device in ("cuda", "mtia")
    opts = dict(tt_options or {})
    state: list[Optional[int]] = [None] * len(tables)  # None: dense; i: TT at ladder[i]

    def config(i: int, s: Optional[int]) -> AnyTableConfig:
        return tables[i] if s is None else _tt_config(tables[i], ladder[s], num_cores, opts)

    def next_state(i: int) -> Optional[int]:
        s = state[i]
        if s is None:  # the highest valid ladder rank with smaller cores than the dense table
            dense = _weight_bytes(tables[i])
            for k in range(len(ladder)):
                try:
                    if _weight_bytes(config(i, k)) < dense:
                        return k
                except ValueError:  # rank above the unfolding's limit (make_tt_shape)
                    continue
            return None
        return s + 1 if s + 1 < len(ladder) else None

    def attempt(configs: list[AnyTableConfig]):
        planner = make_planner(topo, batch_size=batch_size, constraints=constraints, optimizer=optimizer)
        model = MixedEmbeddingBagCollection(configs, device=torch.device("meta"))
        try:
            return planner, planner.plan(model, sharders)
        except PlannerError as e:
            # TorchRec reports a shard that fits no rank as STRICT_CONSTRAINTS
            if e.error_type not in (PlannerErrorType.INSUFFICIENT_STORAGE, PlannerErrorType.PARTITION,
                                    PlannerErrorType.STRICT_CONSTRAINTS):
                raise
            last_error[0] = str(e).strip().splitlines()[-1].strip()
            reserved = getattr(planner._storage_reservation, "last_reserved_topology", None)
            if reserved is not None:
                available[0] = [d.storage.hbm if on_hbm else d.storage.ddr for d in reserved.devices]
            return planner, None

    steps: list[str] = []
    last_error = ["the weights alone exceed the budget"]
    available: list = [None]  # bytes per rank left to the tables after TorchRec's storage reservation
    while True:
        configs = [config(i, s) for i, s in enumerate(state)]
        if sum(_weight_bytes(c) for c in configs) <= world * hbm_per_rank:
            planner, plan = attempt(configs)
            if plan is not None:
                if module_fqn:
                    plan = ShardingPlan(plan={f"{module_fqn}.{k}" if k else module_fqn: v
                                              for k, v in plan.plan.items()})
                return BudgetResult(configs, plan, _rank_storage(planner, world, on_hbm), steps)
        movable = [i for i in range(len(tables)) if next_state(i) is not None]
        if not movable:
            required = _required_bytes(configs, topo, batch_size, constraints, optimizer, sharders, on_hbm)
            smallest = [c.name for c in configs if isinstance(c, TTEmbeddingBagConfig)]
            left = ""
            if available[0]:
                most = max(available[0])
                left = (f"; TorchRec's storage reservation (a margin, dense parameters, input buffers) leaves "
                        f"{most} bytes for the tables on the emptiest rank" if most > 0 else
                        f"; TorchRec's storage reservation (a margin, dense parameters, input buffers) alone exceeds "
                        f"the budget by {-most} bytes per rank")
            raise BudgetError(
                f"the tables do not fit {hbm_per_rank} bytes per rank on {world} ranks "
                f"({world * hbm_per_rank} in all): with {smallest or 'no table'} at TT rank {ladder[-1]} and the rest "
                f"dense (no smaller TT rank on the ladder {sorted(ladder)}), the tables need at least {required} bytes "
                f"in all ({math.ceil(required / world)} per rank if spread evenly) by the planner's estimates{left}; "
                f"planner: {last_error[0]}", required, hbm_per_rank)
        i = max(movable, key=lambda k: (_weight_bytes(configs[k]), -k))
        before = "dense" if state[i] is None else f"TT rank {ladder[state[i]]}"
        state[i] = next_state(i)
        steps.append(f"{tables[i].name}: {before} ({_weight_bytes(configs[i])} bytes) -> TT rank {ladder[state[i]]} "
                     f"({_weight_bytes(config(i, state[i]))} bytes)")


def _required_bytes(configs, topo, batch_size, constraints, optimizer, sharders, on_hbm) -> int:
    """Sum over tables of the smallest total storage of any of its sharding options."""
    planner = make_planner(topo, batch_size=batch_size, constraints=constraints, optimizer=optimizer)
    options = planner._enumerator.enumerate(MixedEmbeddingBagCollection(configs, device=torch.device("meta")), sharders)
    best: dict[str, int] = {}
    for o in options:
        total = sum((s.storage.hbm if on_hbm else s.storage.ddr) for s in o.shards)
        best[o.fqn] = min(best.get(o.fqn, total), total)
    return sum(best.values())
