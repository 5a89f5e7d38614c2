"""Training configuration: small dataclasses, one per component, loaded from YAML.

``load_config(path, overrides)`` reads a YAML file, applies ``key.sub=value`` overrides (values
parsed as YAML), and validates: unknown keys, wrong types and impossible values raise
``ConfigError`` naming the dotted key to fix (e.g. ``model.tt_ranks``), and the config file when
the value came from it. A key given twice in one mapping, a top level that is not a mapping and a
file that is not UTF-8 are errors too (naming the file, key and lines).
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import yaml

from ttdist.data.config import DataConfig, scaled_cardinalities


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` as a float (YAML 1.1 needs ``1.0e-3``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
               r"|[0-9][0-9_]*[eE][-+]?[0-9]+|\.inf|\.Inf|\.INF|\.nan|\.NaN|\.NAN)$"),
    list("-+0123456789."),
)


def _load_yaml(text: str):
    """The YAML document in ``text``; ConfigError on a key given twice in one mapping (PyYAML
    would silently keep the last one, e.g. of two ``train:`` blocks)."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_duplicate_keys(node, "", set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _check_duplicate_keys(node: yaml.Node, prefix: str, seen_nodes: set) -> None:
    if id(node) in seen_nodes:  # an alias (possibly recursive): checked where it was anchored
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_duplicate_keys(item, f"{prefix}[{i}].", seen_nodes)
    elif isinstance(node, yaml.MappingNode):
        lines: dict = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = key_node.value
            if key in lines:
                raise ConfigError(f"duplicate key '{prefix}{key}' (lines {lines[key]} and "
                                  f"{key_node.start_mark.line + 1}); YAML would silently keep only the last one: "
                                  "merge them")
            lines[key] = key_node.start_mark.line + 1
            _check_duplicate_keys(value_node, f"{prefix}{key}.", seen_nodes)


@dataclass
class ModelConfig:
    """DLRM architecture and which tables are TT-compressed."""

    embedding_dim: int = 16
    """Dimension D of every table (DLRM's dot interaction needs one D)."""
    dense_arch_layer_sizes: list[int] = field(default_factory=lambda: [512, 256, 16])
    """Bottom MLP (13 -> ... -> D); the last size must equal embedding_dim."""
    over_arch_layer_sizes: list[int] = field(default_factory=lambda: [512, 256, 1])
    """Top MLP; the last size must be 1 (the logit)."""
    tt_tables: int = 7
    """Number of largest tables stored as TT; the others stay dense TorchRec tables."""
    tt_ranks: list[int] = field(default_factory=lambda: [32, 32])
    """Inner TT ranks of every TT table (d = len + 1 cores)."""
    weight_dist: str = "approx-normal"
    """Initialisation of the TT cores."""
    max_rows: int = 0
    """Cap on rows per table (hashing larger ones modulo the cap, as DLRM's terabyte runs); 0 = none.
    Config copies it to data.max_rows: the datasets take their ids modulo it."""
    dense_baseline: bool = False
    """Store every table dense (the comparison run)."""


@dataclass
class OptimConfig:
    """Fused embedding optimizer (TT and dense tables) and the MLPs' optimizer and schedule."""

    embedding_optimizer: str = "exact_row_wise_adagrad"
    """fbgemm EmbOptimType value: exact_sgd, exact_adagrad or exact_row_wise_adagrad."""
    embedding_lr: float = 0.05
    """Learning rate of the embedding tables."""
    eps: float = 1e-8
    """Adagrad epsilon."""
    dense_optimizer: str = "adagrad"
    """Any torch.optim class name, case-insensitive (sgd, adagrad, adam, ...)."""
    dense_lr: float = 0.05
    """Learning rate of the MLPs."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up (DLRM's schedule)."""
    decay_start_step: int = 0
    """Step at which polynomial decay starts (0 = no decay)."""
    decay_steps: int = 0
    """Steps over which the rate decays to 0 (DLRM: power 2)."""


@dataclass
class CheckpointConfig:
    """torch.distributed.checkpoint saves (atomic: written aside, then renamed)."""

    every_steps: int = 0
    """Save every N steps (0 = only at the end when `at_end`)."""
    at_end: bool = True
    """Save after the last step."""
    keep_last_n: int = 2
    """Complete checkpoints kept; older ones are pruned after a new one is complete."""
    resume: bool = True
    """Continue from the newest complete checkpoint of this run, if any."""


@dataclass
class TrainConfig:
    """The run: steps, evaluation, logging, distributed settings."""

    name: str = "run"
    """Run name; outputs go to `<output_dir>/<name>/`."""
    output_dir: str = "runs"
    """Directory of all runs."""
    steps: int = 100
    """Training steps (global batches)."""
    eval_every_steps: int = 0
    """Evaluate every N steps (0 = only at the end)."""
    log_every_steps: int = 10
    """Append training metrics to metrics.jsonl every N steps."""
    seed: int = 0
    """Seed of model initialisation (cores: per table name) and RNGs."""
    world_size: int = 0
    """Expected number of ranks (0 = whatever torchrun gives); a mismatch is an error."""
    backend: str = "auto"
    """Process-group backend: auto (nccl on GPU, gloo on CPU), gloo or nccl."""
    collective_timeout_s: float = 300.0
    """Every collective fails with an error after this many seconds instead of hanging."""
    sharding_types: dict[str, str] = field(default_factory=dict)
    """Force a sharding type per table name (table_wise, row_wise, column_wise, data_parallel)."""
    plan_path: Optional[str] = None
    """Load the sharding plan from this YAML file (ttdist.plan) instead of planning."""
    nonfinite: str = "stop"
    """On a non-finite loss: stop (raise, naming step and table) or skip (drop the batch, count it)."""
    progress_bar: bool = True
    """Show a tqdm bar on rank 0."""


@dataclass
class Config:
    """Everything a training run needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self) -> None:
        """Copies model.max_rows to data.max_rows, unless set there (validate() checks they agree):
        the datasets see only DataConfig, and their ids must fit the capped tables."""
        if not self.data.max_rows:
            self.data.max_rows = self.model.max_rows

    def table_rows(self) -> list[int]:
        """Rows of each of the 26 tables after scaling and the max_rows cap."""
        rows = scaled_cardinalities(self.data)
        return [min(r, self.model.max_rows) if self.model.max_rows else r for r in rows]

    def tt_table_indices(self) -> list[int]:
        """Indices of the tables stored as TT: the `model.tt_tables` largest (none for the baseline)."""
        if self.model.dense_baseline:
            return []
        rows = self.table_rows()
        return sorted(sorted(range(len(rows)), key=lambda t: -rows[t])[: self.model.tt_tables])


# ------------------------------------------------------------------------------------------------
# Loading and validation
# ------------------------------------------------------------------------------------------------


def _check_type(key: str, value: Any, annotation: Any) -> Any:
    """Returns ``value`` converted to ``annotation`` where lossless (int -> float), else raises."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _check_type(key, value, option)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(annotation)
        return [_check_type(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        k_type, v_type = typing.get_args(annotation)
        return {_check_type(f"{key}", k, k_type): _check_type(f"{key}.{k}", v, v_type) for k, v in value.items()}
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if annotation in (int, str, bool):
        if isinstance(value, bool) != (annotation is bool) or not isinstance(value, annotation):
            raise ConfigError(f"{key}: expected {annotation.__name__}, got {value!r} ({type(value).__name__})")
        if annotation is int and not -(2**63) <= value < 2**63:
            raise ConfigError(f"{key}: {value} does not fit in a 64-bit integer")
        return value
    return value


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown key '{prefix}{unknown[0]}'; valid keys under '{prefix or '.'}': {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_type(f"{prefix}{name}", value, hint)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:  # a component's own validation (e.g. DataConfig)
        text = str(e)
        field = re.match(r"[A-Za-z_]\w*", text)
        if field and field.group(0) in names:  # "batch_size must be ..." -> "data.batch_size must be ..."
            raise ConfigError(f"{prefix}{text}") from None
        raise ConfigError(f"{prefix.rstrip('.')}: {text}") from None


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def validate(cfg: Config, world_size: Optional[int] = None) -> None:
    """Cross-field checks; ``world_size`` (when known) is checked against the config."""
    m, o, t = cfg.model, cfg.optim, cfg.train
    _require(m.embedding_dim > 0, "model.embedding_dim", "must be positive")
    for key in ("dense_arch_layer_sizes", "over_arch_layer_sizes"):
        sizes = getattr(m, key)
        for i, size in enumerate(sizes):
            _require(size > 0, f"model.{key}[{i}]", f"layer sizes must be positive, got {size}")
    _require(bool(m.dense_arch_layer_sizes) and m.dense_arch_layer_sizes[-1] == m.embedding_dim,
             "model.dense_arch_layer_sizes", f"must end with embedding_dim (model.embedding_dim = {m.embedding_dim})")
    _require(bool(m.over_arch_layer_sizes) and m.over_arch_layer_sizes[-1] == 1, "model.over_arch_layer_sizes", "must end with 1")
    _require(0 <= m.tt_tables <= 26, "model.tt_tables", "must be in [0, 26]")
    _require(m.max_rows >= 0, "model.max_rows", "must be >= 0")
    _require(cfg.data.max_rows == m.max_rows, "data.max_rows",
             f"is {cfg.data.max_rows} but model.max_rows is {m.max_rows}; set model.max_rows only "
             "(Config copies it here, and the data's ids must fit the model's tables)")
    from ttdist.modules.tt_init import WEIGHT_DISTS
    from ttdist.modules.tt_shapes import make_tt_shape

    _require(m.weight_dist in WEIGHT_DISTS, "model.weight_dist", f"must be one of {WEIGHT_DISTS}")
    rows = cfg.table_rows()
    for table in cfg.tt_table_indices():
        try:
            make_tt_shape(rows[table], m.embedding_dim, m.tt_ranks, table_name=f"t_cat_{table}")
        except ValueError as e:
            raise ConfigError(f"model.tt_ranks: {e} (the table has {rows[table]} rows = "
                              "data.num_embeddings_per_feature x data.cardinality_scale, capped by model.max_rows, "
                              "and model.embedding_dim columns)") from None
    from ttdist.modules.optim import OptimType

    try:
        OptimType.parse(o.embedding_optimizer)
    except ValueError as e:
        raise ConfigError(f"optim.embedding_optimizer: {e}") from None
    import torch

    _require(dense_optimizer_class(o.dense_optimizer) is not None, "optim.dense_optimizer",
             f"no torch.optim class named {o.dense_optimizer!r} that can train the MLPs (e.g. sgd, adagrad, "
             "adam; LBFGS needs a closure, SparseAdam sparse gradients)")
    for key in ("embedding_lr", "dense_lr", "eps"):
        value = getattr(o, key)
        _require(math.isfinite(value) and value > 0, f"optim.{key}", f"must be a positive finite number, got {value}")
    for key in ("warmup_steps", "decay_start_step", "decay_steps"):
        _require(getattr(o, key) >= 0, f"optim.{key}", "must be >= 0")
    _require(t.steps > 0, "train.steps", "must be positive")
    _require(bool(t.name) and t.name not in (".", "..") and "/" not in t.name and "\\" not in t.name
             and len(t.name) <= 200, "train.name",
             f"must be a non-empty directory name (no '/', at most 200 characters), got {t.name!r}")
    _require(bool(t.output_dir), "train.output_dir", "must be a non-empty path ('.' for the current directory)")
    _require(t.plan_path is None or bool(t.plan_path.strip()), "train.plan_path", "must be null or a file path")
    _require(0 <= t.seed < 2**63, "train.seed", f"must be in [0, 2**63), got {t.seed}")
    _require(math.isfinite(t.collective_timeout_s) and t.collective_timeout_s <= MAX_COLLECTIVE_TIMEOUT_S,
             "train.collective_timeout_s", f"must be at most {MAX_COLLECTIVE_TIMEOUT_S} s, got {t.collective_timeout_s}")
    _require(t.backend in ("auto", "gloo", "nccl"), "train.backend", "must be auto, gloo or nccl")
    _require(t.nonfinite in ("stop", "skip"), "train.nonfinite", "must be stop or skip")
    _require(t.collective_timeout_s > 0, "train.collective_timeout_s", "must be positive")
    for key in ("eval_every_steps", "log_every_steps", "world_size"):
        _require(getattr(t, key) >= 0, f"train.{key}", "must be >= 0")
    valid_types = ("table_wise", "row_wise", "column_wise", "data_parallel")
    for table, kind in t.sharding_types.items():
        _require(kind in valid_types, f"train.sharding_types.{table}", f"must be one of {valid_types}")
        _require(table in [f"t_cat_{i}" for i in range(26)], f"train.sharding_types.{table}",
                 "unknown table; tables are t_cat_0..t_cat_25")
    _require(cfg.checkpoint.keep_last_n >= 1, "checkpoint.keep_last_n", "must be >= 1")
    _require(cfg.checkpoint.every_steps >= 0, "checkpoint.every_steps", "must be >= 0")
    if world_size is not None:
        _require(t.world_size in (0, world_size), "train.world_size",
                 f"the config expects {t.world_size} ranks but torchrun started {world_size}")
        _require(cfg.data.batch_size % world_size == 0, "data.batch_size",
                 f"{cfg.data.batch_size} is not divisible by the world size {world_size}")


MAX_COLLECTIVE_TIMEOUT_S = 7 * 24 * 3600.0  # a week; datetime.timedelta overflows near 1e14 s


def dense_optimizer_class(name: str):
    """The torch.optim optimizer class named ``name`` (case-insensitive), or None when there is
    none usable for the MLPs (the base class, LBFGS (needs a closure), SparseAdam (sparse grads))."""
    import torch

    for attr in dir(torch.optim):
        cls = getattr(torch.optim, attr)
        if (attr.lower() == name.lower() and isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)
                and cls not in (torch.optim.Optimizer, torch.optim.LBFGS, torch.optim.SparseAdam)):
            return cls
    return None


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Applies ``a.b.c=value`` overrides (value parsed as YAML) to the raw mapping."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: '{'.'.join(parts[:i + 1])}' is not a section")
        try:
            node[parts[-1]] = _load_yaml(raw)
        except (yaml.YAMLError, ConfigError) as e:
            raise ConfigError(f"{key.strip()}: the override's value {raw!r} is not valid YAML: "
                              f"{' '.join(str(e).split())}") from None
    return data


def load_config(path: Optional[Union[str, Path]] = None, overrides: Sequence[str] = (),
                world_size: Optional[int] = None) -> Config:
    """Config from a YAML file plus overrides, validated (see module docstring)."""
    data: dict = {}
    if path is not None:
        try:
            raw = Path(path).read_bytes()
            data = _load_yaml(raw.decode("utf-8")) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except UnicodeDecodeError as e:
            line = raw[:e.start].count(b"\n") + 1
            raise ConfigError(f"config file {path} is not UTF-8 text: byte 0x{raw[e.start]:02x} at line {line} "
                              f"(byte offset {e.start}); save it as UTF-8") from None
        except OSError as e:
            raise ConfigError(f"config file {path} cannot be read: {e.strerror or e}") from None
        except ConfigError as e:
            raise ConfigError(f"config file {path}: {e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path}: the top level must be a mapping of sections (model, data, optim, "
                              f"train, checkpoint), got a {type(data).__name__}: {str(data)[:100]}")
    try:
        cfg = _build(Config, apply_overrides(data, overrides), "")
        validate(cfg, world_size)
    except ConfigError as e:
        if path is None or _from_override(str(e), overrides):
            raise
        raise ConfigError(f"config file {path}: {e}") from None
    return cfg


def _from_override(message: str, overrides: Sequence[str]) -> bool:
    """Whether the key a ConfigError message starts with (or names as unknown) was set by an override."""
    m = re.match(r"(?:unknown key ')?([A-Za-z_][\w.]*)", message)
    if message.startswith("override ") or m is None:
        return message.startswith("override ")
        return False
    key = m.group(1).rstrip(".")
    for item in overrides:
        set_key = item.split("=", 1)[0].strip()
        if key == set_key or key.startswith(set_key + ".") or set_key.startswith(key + "."):
            return True
    return False


def to_dict(cfg: Config) -> dict:
    """Plain mapping of the config (written next to a run's outputs)."""
    return dataclasses.asdict(cfg)
