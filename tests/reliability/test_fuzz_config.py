"""Every config key, fuzzed: wrong types and out-of-range values through the command-line path.

The keys come from ``dataclasses.fields`` of Config's sections, so a key added later is fuzzed
without touching this file. Each value goes in as a ``key=value`` override (parsed as YAML, as
on the command line) on top of a small valid config. The contract:
  * a value of the wrong type raises ConfigError naming the dotted key;
  * any other value either raises ConfigError naming the key (cross-field checks name it
    beside the key they fail on) or is accepted, and then everything the app derives from the
    config before training (table shapes, model, plan constraints, optimizer class, schedule,
    dataset, run directory, timeout, seeds) works with it.
"""
import dataclasses
import json
import math
import types
import typing
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from tests.app.common import ROOT, TINY
from ttdist.config import Config, ConfigError, dense_optimizer_class, load_config

BASE = [o for o in TINY if not o.startswith("train.world_size")]


def _keys(cls=Config, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", hints[f.name]


KEYS = dict(_keys())


def _yaml(value) -> str:
    """A YAML flow literal for value (JSON, but YAML's spellings of NaN and infinities)."""
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
    if isinstance(value, list):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_yaml(k)}: {_yaml(v)}" for k, v in value.items()) + "}"
    return json.dumps(value, ensure_ascii=False)


def _parts(annotation):
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return [p for a in typing.get_args(annotation) for p in _parts(a)]
    return [origin or annotation]


SCALARS = {int: st.integers(-5, 5), float: st.sampled_from([0.5, -2.5, 1e-3]), str: st.sampled_from(["abc", "1x", ""]),
           bool: st.booleans(), type(None): st.none(), list: st.lists(st.integers(0, 3), max_size=2),
           dict: st.dictionaries(st.sampled_from(["a", "t_cat_1"]), st.sampled_from(["row_wise", "x"]), max_size=1)}


def wrong_type(annotation) -> st.SearchStrategy:
    """Values whose YAML type the annotation does not allow (an int is allowed where a float is)."""
    allowed = set(_parts(annotation))
    if float in allowed:
        allowed.add(int)
    strategies = [s for t, s in SCALARS.items() if t not in allowed]
    if list in allowed:  # a list with items of the wrong type (every list key holds ints)
        strategies.append(st.lists(st.sampled_from(["x", 1.5, None, [1], True]), min_size=1, max_size=3))
    if dict in allowed:  # values or keys of the wrong type
        strategies.append(st.dictionaries(st.sampled_from(["t_cat_1", "t_cat_2"]), st.sampled_from([1, None, [1], 2.5]),
                                          min_size=1, max_size=2))
        strategies.append(st.just({1: "row_wise"}))
    return st.one_of(strategies)


EXTREMES = {
    int: st.one_of(st.sampled_from([-1, 0, 1, 2**31, 2**62, 2**63 - 1, -(2**63), 2**63, 2**80]), st.integers()),
    float: st.one_of(st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, -1.0, 5e-324, 1e308, 2**63]),
                     st.floats(allow_nan=True, allow_infinity=True)),
    str: st.one_of(st.sampled_from(["", " ", "..", "a/b", "../../etc", "x" * 300, "\u00e9\u4e2d", "null", "1e3"]),
                   st.text(max_size=20)),
    bool: st.booleans(),
    list: st.one_of(st.sampled_from([[], [0], [-1], [2**62], [1] * 1000, [16, 0, 16]]),
                    st.lists(st.integers(-3, 2**40), max_size=5)),
    dict: st.one_of(st.sampled_from([{}, {"t_cat_99": "row_wise"}, {"t_cat_1": "diagonal"}, {"": "table_wise"}]),
                    st.dictionaries(st.text(max_size=8), st.sampled_from(["table_wise", "row_wise", "x"]), max_size=2)),
    type(None): st.none(),
}


def extreme(annotation) -> st.SearchStrategy:
    return st.one_of([EXTREMES[t] for t in _parts(annotation)])


def _names_key(error: ConfigError, key: str) -> bool:
    return key in str(error)


def use(cfg: Config) -> None:
    """What the app derives from a config before the first step, without a process group."""
    import torch

    from ttdist.data import make_dataset
    from ttdist.model import build_model, embedding_bytes, plan_constraints
    from ttdist.modules.tt_init import table_generator
    from torchrec.optim.keyed import KeyedOptimizerWrapper

    from ttdist.schedule import LRSchedule

    cfg.table_rows(), cfg.tt_table_indices(), embedding_bytes(cfg), plan_constraints(cfg, "cpu")
    model = build_model(cfg)
    assert dense_optimizer_class(cfg.optim.dense_optimizer) is not None
    dense = {n: p for n, p in model.named_parameters() if "over_arch" in n or "dense_arch" in n}
    cls = dense_optimizer_class(cfg.optim.dense_optimizer)
    schedule = LRSchedule(KeyedOptimizerWrapper(dense, lambda params: cls(params, lr=cfg.optim.dense_lr)), cfg.optim)
    for step in (0, 1, cfg.optim.warmup_steps, cfg.optim.decay_start_step, cfg.train.steps - 1, 2**62):
        assert 0 < schedule.factor_at(step) <= 1
    for every in (cfg.train.log_every_steps, cfg.train.eval_every_steps, cfg.checkpoint.every_steps):
        assert isinstance(every, int) and every >= 0  # every N steps, 0 = never (train.py's _due)
    timedelta(seconds=cfg.train.collective_timeout_s)
    torch.Generator().manual_seed(cfg.train.seed), table_generator(cfg.train.seed, "t_cat_0")
    run_dir = Path(cfg.train.output_dir) / cfg.train.name
    assert run_dir.name == cfg.train.name and len(cfg.train.name.encode()) < 255
    make_dataset(cfg.data, "train", 0, 1)


SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("key", sorted(KEYS))
def test_every_key_rejects_a_value_of_the_wrong_type(key):
    value = {int: "seven", float: "fast", str: 7, bool: "yes", list: 3, dict: [1]}[_parts(KEYS[key])[0]]
    with pytest.raises(ConfigError) as info:
        load_config(ROOT / "configs/demo.yaml", BASE + [f"{key}={_yaml(value)}"])
    assert _names_key(info.value, key), str(info.value)


@pytest.mark.slow
@SETTINGS
@given(data=st.data(), key=st.sampled_from(sorted(KEYS)))
def test_wrong_types_raise_config_error_naming_the_key(data, key):
    value = data.draw(wrong_type(KEYS[key]), label="value")
    with pytest.raises(ConfigError) as info:
        load_config(ROOT / "configs/demo.yaml", BASE + [f"{key}={_yaml(value)}"])
    assert _names_key(info.value, key), str(info.value)


@pytest.mark.slow  # 300 configs, each building the model, dataset and schedule
@SETTINGS
@given(data=st.data(), key=st.sampled_from(sorted(KEYS)))
def test_out_of_range_values_are_rejected_naming_the_key_or_work(data, key):
    value = data.draw(extreme(KEYS[key]), label="value")
    try:
        cfg = load_config(ROOT / "configs/demo.yaml", BASE + [f"{key}={_yaml(value)}"])
    except ConfigError as e:
        assert _names_key(e, key), str(e)
        return
    use(cfg)
