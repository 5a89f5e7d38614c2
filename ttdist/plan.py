"""Sharding plans of ttdist models: YAML files and their validation.

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
``ValueError`` listing every problem. The bytes each rank holds and the plan as a table:
``ttdist.distributed.plan_bytes``; fitting a model into a memory budget:
``ttdist.distributed.budget``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import yaml
from torch import nn
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharding_spec import EnumerableShardingSpec
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.types import EmbeddingModuleShardingPlan, ParameterSharding, ShardingPlan, ShardingType
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from ttdist.distributed.embeddingbag import TT_COMPUTE_KERNEL
from ttdist.distributed.shard_layout import COLUMN_WISE, DATA_PARALLEL, TABLE_WISE, table_shards
from ttdist.modules.collection import AnyTableConfig, TTEmbeddingBagConfig

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


def table_spec(tables: Optional[TableSpec]) -> Optional[dict[Optional[str], dict[str, Optional[AnyTableConfig]]]]:
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


def shard_rects(ps: ParameterSharding) -> list[tuple[list[int], list[int], int]]:
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
    spec = table_spec(tables)
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
            rects = shard_rects(ps)
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
