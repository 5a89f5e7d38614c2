"""Plan the 26 Criteo Kaggle tables (the largest as TT, the rest plain TorchRec tables) and print the plan.

TorchRec's EmbeddingShardingPlanner (``ttdist.distributed.make_planner``: TT tables get their
real core bytes and the calibrated kernel cost, plain tables TorchRec's estimates) plans a
``MixedEmbeddingBagCollection`` built on the meta device, so nothing is allocated, on a CPU
topology; no process group needed. The TT kernel is timed once (``tt_costs``, ~0.5 s) on this
machine with the current thread count (``OMP_NUM_THREADS=1``: as each rank of launch/local.sh).

    .venv/bin/python benchmarks/criteo_plan.py                      # 4 ranks, 7 TT tables, ranks [32, 32], dim 16
    .venv/bin/python benchmarks/criteo_plan.py --world-size 8 --tt-tables 3 --dim 64 --force cat_2=row_wise
    .venv/bin/python benchmarks/criteo_plan.py --yaml plan.yaml     # also save it (ttdist.plan.load_plan reads it)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/criteo_plan.py --configs   # the app's plans of configs/demo,
        # criteo_kaggle, criteo_terabyte at 2, 8, 64 ranks -> benchmarks/results/planner_plans.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

import torch
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import Topology
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from ttdist.data.config import CRITEO_KAGGLE_CARDINALITIES
from ttdist.distributed import TTEmbeddingBagCollectionSharder, make_planner, tt_constraints
from ttdist.modules.collection import MixedEmbeddingBagCollection, TTEmbeddingBagConfig
from ttdist.modules.optim import OptimType
from ttdist.distributed.links import LinkModel
from ttdist.distributed.plan_bytes import format_plan, lookup_load_per_rank, plan_bytes_per_rank
from ttdist.distributed.tt_costs import cost_model
from ttdist.plan import save_plan

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("demo", "criteo_kaggle", "criteo_terabyte")
WORLD_SIZES = (2, 8, 64)
# None: TorchRec's default CPU topology (GPU bandwidths, calls free); "gloo": what the app measured
# on this 2-core machine (``links measured for the planner`` in its log; ttdist.distributed.links).
LINKS = {"torchrec_default": None, "gloo": LinkModel(latency_ms=0.5, bytes_per_ms=741_000.0)}


def criteo_tables(num_tt: int = 7, tt_ranks: Sequence[int] = (32, 32), dim: int = 16) -> list:
    """Table ``cat_i`` (feature ``cat_i``) per Criteo Kaggle feature; the ``num_tt`` largest are TT."""
    largest = sorted(range(len(CRITEO_KAGGLE_CARDINALITIES)), key=lambda i: -CRITEO_KAGGLE_CARDINALITIES[i])[:num_tt]
    tables = []
    for i, rows in enumerate(CRITEO_KAGGLE_CARDINALITIES):
        kw = dict(name=f"cat_{i}", num_embeddings=rows, embedding_dim=dim, feature_names=[f"cat_{i}"])
        tables.append(TTEmbeddingBagConfig(tt_ranks=list(tt_ranks), **kw) if i in largest else EmbeddingBagConfig(**kw))
    return tables


def criteo_plan(world_size: int = 4, num_tt: int = 7, tt_ranks: Sequence[int] = (32, 32), dim: int = 16,
                batch_size: int = 512, force: Optional[dict[str, str]] = None,
                optimizer: OptimType = OptimType.EXACT_SGD):
    """(model on meta, ShardingPlan, planner, Topology); ``force``: {TT table: sharding type}."""
    model = MixedEmbeddingBagCollection(criteo_tables(num_tt, tt_ranks, dim), device=torch.device("meta"))
    topology = Topology(world_size=world_size, compute_device="cpu")
    planner = make_planner(topology, batch_size=batch_size, constraints=tt_constraints(force or {}),
                           optimizer=optimizer)
    sharders = [TTEmbeddingBagCollectionSharder(fused_params={"optimizer": optimizer}), EmbeddingBagCollectionSharder()]
    return model, planner.plan(model, sharders), planner, topology


def config_plan(name: str, world_size: int, links: Optional[LinkModel] = None):
    """The plan ttdist's app makes for ``configs/<name>.yaml`` on ``world_size`` CPU ranks
    (``session.build_plan`` without the process group, so with ``links`` given rather than
    measured; None: TorchRec's default bandwidths, calls free): (model on meta, plan, config)."""
    from ttdist.config import load_config
    from ttdist.model import build_model, build_sharders, plan_constraints

    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    model = build_model(cfg, torch.device("meta"))
    topology = links.topology(world_size, "cpu") if links else Topology(world_size=world_size, compute_device="cpu")
    planner = make_planner(topology, batch_size=cfg.data.batch_size // world_size,
                           constraints=plan_constraints(cfg, "cpu"),
                           optimizer=OptimType.parse(cfg.optim.embedding_optimizer),
                           collective_latency_ms=links.latency_ms if links else 0.0)
    return model, planner.plan(model, build_sharders(cfg)), cfg


def config_plans(out: Path) -> None:
    """Prints and writes (``out``, JSON) the plans of ``CONFIGS`` at ``WORLD_SIZES`` ranks."""
    model_cost = cost_model("cpu")
    results = {"calibration": asdict(model_cost.calibration), "compute_device": "cpu",
               "batch": "the config's data.batch_size, split over the ranks",
               "links": {k: asdict(v) if v else "TorchRec's default CPU topology, calls free" for k, v in LINKS.items()},
               "plans": []}
    for (name, world), (links_name, links) in itertools.product(itertools.product(CONFIGS, WORLD_SIZES), LINKS.items()):
        start = time.perf_counter()
        model, plan, cfg = config_plan(name, world, links)
        seconds = time.perf_counter() - start
        optimizer, batch = OptimType.parse(cfg.optim.embedding_optimizer), cfg.data.batch_size // world
        print(f"\n== configs/{name}.yaml, {world} CPU ranks, batch {batch} per rank, links {links_name} "
              f"(planned in {seconds:.1f} s)")
        print(format_plan(plan, model, world, optimizer, batch, model_cost))
        tables = {name_: {"sharding_type": ps.sharding_type, "kernel": ps.compute_kernel, "ranks": ps.ranks}
                  for module in plan.plan.values() for name_, ps in module.items()}
        tt = {k: v for k, v in tables.items() if v["kernel"] == "customized_kernel"}
        load = lookup_load_per_rank(plan, model, world, batch, model_cost)
        nbytes = [sum(b[r] for b in plan_bytes_per_rank(plan, model, world, optimizer).values()) for r in range(world)]
        results["plans"].append({
            "config": f"configs/{name}.yaml", "world_size": world, "links": links_name, "batch_per_rank": batch,
            "tt_sharding_types": {st: sum(v["sharding_type"] == st for v in tt.values())
                                  for st in sorted({v["sharding_type"] for v in tt.values()})},
            "tables": tables, "tt_ids_per_rank": load["tt_ids"], "dense_ids_per_rank": load["dense_ids"],
            "tt_ms_per_rank": [round(x, 4) for x in load["tt_ms"]], "bytes_per_rank": nbytes})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nwritten to {out}")


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=4)
    parser.add_argument("--tt-tables", type=int, default=7, help="how many of the largest tables are TT")
    parser.add_argument("--tt-ranks", type=int, nargs="+", default=[32, 32])
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=512, help="per rank")
    parser.add_argument("--force", nargs="*", default=[], metavar="TABLE=SHARDING_TYPE",
                        help="sharding type of TT tables, e.g. cat_2=row_wise")
    parser.add_argument("--yaml", help="also save the plan here")
    parser.add_argument("--configs", action="store_true",
                        help=f"plan configs/{{{','.join(CONFIGS)}}}.yaml at {WORLD_SIZES} ranks instead")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "planner_plans.json"))
    args = parser.parse_args(argv)
    logging.getLogger("torchrec").setLevel(logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    if args.configs:
        config_plans(Path(args.out))
        return
    force = dict(item.split("=", 1) for item in args.force)
    model, plan, _, topology = criteo_plan(args.world_size, args.tt_tables, args.tt_ranks, args.dim, args.batch_size,
                                           force)
    print(format_plan(plan, model, topology, batch_per_rank=args.batch_size, cost_model=cost_model("cpu")))
    if args.yaml:
        save_plan(plan, args.yaml)
        print(f"saved to {args.yaml}")


if __name__ == "__main__":
    main()
