"""An analytical model of one DLRM training step of ttdist (TT + TorchRec tables under DMP).

Inputs
------
* a **compute profile** measured on single ranks (``Profile``): per-id times of the TT lookup
  (forward; backward + fused update), of fbgemm's TBE for the plain tables, per-id input
  preparation, per-sample dense (MLP + interaction + loss) forward and backward, per-step
  optimizer and loop overhead — read from ``benchmarks/results/e2e_*.json`` or from the
  1-rank entry of ``benchmarks/results/scaling_*.json``;
* the **plan** (which table on which rank, TT tables table-wise or row-wise) and the byte
  count of every collective: ``ttdist.tools.comm_volume`` for the TT collection (its
  formula, section (a)-(e)), ``torchrec_ebc_volume`` below for TorchRec's table-/column-wise
  tables, the DDP all-reduce of the dense parameters, and the training loop's 16-byte flag
  all-reduce;
* a **link** model: bandwidth beta (bytes/s per GPU, one direction) and latency alpha (s).

Symbols: W ranks, G GPUs per node, B samples per rank, L = 1 id per sample and feature
(Criteo), F_tt / F_eb TT / plain features, ids_r the ids rank r looks up, S_r the bytes rank r
hands to a collective (``comm_volume``'s convention), S = max_r S_r.

Ids per rank (uniform hashing of ids over rows, which the synthetic data's scrambled power law
approximates): a table-/column-wise unit on rank r looks up all W*B ids of its feature; a
row-wise TT table gives rank r the fraction rows_r / N of its W*B ids, rows_r being the rows of
rank r's G_1 slice (``shard_layout.table_shards``: ranks past ceil(p_1 / ceil(p_1/W)) hold no
rows, so at W > p_1 the ids concentrate on p_1 ranks).

Per-rank compute of the pieces (a_* from the profile):
    prep_tt,r = a_prep_tt * B * F_tt           fwd_tt,r = a_fwd_tt * ids_tt,r     bwd_tt,r = a_bwd_tt * ids_tt,r
    prep_eb,r = a_prep_eb * B * F_eb           fwd_eb,r = a_fwd_eb * ids_eb,r     bwd_eb,r = a_bwd_eb * ids_eb,r
    glue = m_glue * B (KeyedTensor assembly, feature selection)  dense_fwd = m_fwd * B    dense_bwd = m_bwd * B
    opt = c_opt     other = c_other
Step time: the pipeline is synchronous (every collective is a barrier), so the critical path is
    T = sum over pieces p of  X_p  +  sum over collectives c of  t_c,
    X_p = max_r x_p,r                         (own cores / GPUs per rank), or
    X_p = max(max_r x_p,r, sum_r x_p,r / cores)   (W ranks sharing `cores` CPU cores: oversubscribed)
in the order: prep_tt, [TT index a2a + check all-reduce], fwd_tt, [TT pooled a2a fwd], prep_eb,
[TBE index a2a], fwd_eb, [TBE pooled a2a fwd], glue, dense_fwd, other, [flag all-reduce], dense_bwd,
[TBE pooled a2a bwd], bwd_eb, [TT pooled a2a bwd], bwd_tt, [TT replica all-reduce],
[DDP all-reduce], opt. No overlap of communication with compute (ttdist runs the plain
DMP forward, not TorchRec's pipelined train loop), so T is an upper bound for pipelined runs.

Collective time (S as above, n the number of calls of that collective per step):
    GPU presets, all-to-all:   t = n (W-1) alpha + S (W-1)/W / beta_intra                      (W <= G)
                               t = n (W-1) alpha_inter + max(S (G-1)/W / beta_intra,
                                                              S (W-G)/W / beta_inter)          (W > G)
        (per-peer latency serialised: a conservative upper bound; the bytes to ranks on other
        nodes cross the inter-node link, the rest NVLink/PCIe, both at once)
    GPU presets, all-reduce:   t = 2 (W-1)/W * S / beta + 2 ceil(log2 W) alpha   (ring bandwidth,
        tree latency as NCCL picks for small messages; beta, alpha of the inter-node link when W > G)
    CPU (gloo, fitted):        t = n alpha_kind + S / beta_kind, alpha/beta fitted per world size
        by least squares on a micro-benchmark of all_to_all_single / all_reduce run in the same
        job (benchmarks/scaling.py), since loopback gloo has no datasheet.
    W = 1: no collective except DDP's (gloo/NCCL all-reduce on one rank), taken as 0 on GPU
        and as the fitted alpha on CPU.

Efficiency: weak scaling (fixed B per rank) E(W) = T(1) / T(W); strong scaling (fixed global
batch B_g) E(W) = T(1, B_g) / (W T(W, B_g / W)). Both equal throughput(W) / (W throughput(1)),
so E(1) = 1.

Link presets (bandwidth per GPU, one direction; latency per message):
    nvlink      450 GB/s, 2 us   H100 SXM NVLink 4: 900 GB/s bidirectional per GPU (NVIDIA H100
                                  datasheet), 2 us a typical NCCL small-message latency.
    pcie_gen4    25 GB/s, 5 us   PCIe 4.0 x16: 32 GB/s raw per direction, ~25 GB/s achieved.
    ib_hdr       25 GB/s, 5 us   InfiniBand HDR 200 Gb/s = 25 GB/s per NIC, one NIC per GPU
                                  (DGX A100/H100 layout), ~5 us MPI/NCCL latency.
Clusters: ``nvlink+ib`` (8 GPUs per node on NVLink, nodes on HDR), ``pcie+ib`` (8 per node on
PCIe Gen4, nodes on HDR), ``ib`` (every GPU talks over HDR). All-to-alls across nodes use
the inter-node link, as above.

What the model does not know: GPU kernel times (the shipped predictions use the CPU-measured
profile unless given a GPU one — see ``benchmarks/results/perf_model_predictions.json``'s
notes), contention on shared links beyond the per-GPU NIC, the output-size term of row-wise
lookups ([W*B, D] partial sums written and read per rank, not only per id), stragglers.

CLI:
    python -m ttdist.tools.perf_model --validate benchmarks/results/scaling_cpu.json
    python -m ttdist.tools.perf_model --predict [--profile benchmarks/results/e2e_cpu.json] [--batch-per-gpu B]
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

GROUPS = ("table_column_wise", "row_wise")
# The training loop's own check (ttdist.train.train_step: one small int64 all-reduce of per-rank
# "input bad / loss bad" flags when W > 1) is counted by the benchmarks but is not a collective of
# the model: it is reported, left out of the equality check, and timed as one latency-bound call.
NOT_MODELLED = ("train_loop_flag_all_reduce",)


# ---------------------------------------------------------------------------------------------
# Links
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Link:
    name: str
    bandwidth: float  # bytes/s per GPU, one direction
    latency: float  # s per message


NVLINK = Link("nvlink", 450e9, 2e-6)
PCIE_GEN4 = Link("pcie_gen4", 25e9, 5e-6)
IB_HDR = Link("ib_hdr", 25e9, 5e-6)


@dataclass(frozen=True)
class Cluster:
    name: str
    intra: Link
    inter: Link
    gpus_per_node: int


PRESETS = {
    "nvlink+ib": Cluster("nvlink+ib", NVLINK, IB_HDR, 8),
    "pcie+ib": Cluster("pcie+ib", PCIE_GEN4, IB_HDR, 8),
    "ib": Cluster("ib", IB_HDR, IB_HDR, 1),
}


@dataclass(frozen=True)
class FittedLinks:
    """CPU/gloo collectives at one world size: t = alpha + bytes / beta per call, per kind."""

    a2a_alpha: float
    a2a_beta: float
    ar_alpha: float
    ar_beta: float

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> "FittedLinks":
        return FittedLinks(d["all_to_all_single"]["alpha_s"], d["all_to_all_single"]["beta_bytes_per_s"],
                           d["all_reduce"]["alpha_s"], d["all_reduce"]["beta_bytes_per_s"])


def fit_alpha_beta(sizes: Sequence[float], seconds: Sequence[float]) -> dict:
    """Least-squares t = alpha + bytes / beta (alpha, 1/beta clipped at >= 0)."""
    n = len(sizes)
    mx, my = sum(sizes) / n, sum(seconds) / n
    sxx = sum((x - mx) ** 2 for x in sizes)
    slope = sum((x - mx) * (y - my) for x, y in zip(sizes, seconds)) / sxx if sxx else 0.0
    slope = max(slope, 1e-15)
    alpha = max(my - slope * mx, 0.0)
    return {"alpha_s": alpha, "beta_bytes_per_s": 1.0 / slope}


def all_to_all_time(nbytes: float, calls: int, world: int, cluster: Cluster | FittedLinks) -> float:
    """Time of ``calls`` all-to-alls moving at most ``nbytes`` per rank in all (module docstring)."""
    if world == 1 or calls == 0:
        return 0.0
    if isinstance(cluster, FittedLinks):
        return calls * cluster.a2a_alpha + nbytes / cluster.a2a_beta
    g = cluster.gpus_per_node
    if world <= g:
        return calls * (world - 1) * cluster.intra.latency + nbytes * (world - 1) / world / cluster.intra.bandwidth
    return calls * (world - 1) * cluster.inter.latency + max(nbytes * (g - 1) / world / cluster.intra.bandwidth,
                                                            nbytes * (world - g) / world / cluster.inter.bandwidth)


def all_reduce_time(nbytes: float, calls: int, world: int, cluster: Cluster | FittedLinks) -> float:
    if calls == 0:
        return 0.0
    if isinstance(cluster, FittedLinks):
        return calls * cluster.ar_alpha + nbytes / cluster.ar_beta
    if world == 1:
        return 0.0
    link = cluster.intra if world <= cluster.gpus_per_node else cluster.inter
    return 2 * (world - 1) / world * nbytes / link.bandwidth + calls * 2 * math.ceil(math.log2(world)) * link.latency


# ---------------------------------------------------------------------------------------------
# Compute profile
# ---------------------------------------------------------------------------------------------


@dataclass
class Profile:
    """Measured single-rank times (see the module docstring); ``source`` says where from."""

    tt_prep_s_per_id: float = 0.0
    tt_fwd_s_per_id: float = 0.0
    tt_bwd_s_per_id: float = 0.0
    ebc_prep_s_per_id: float = 0.0
    ebc_fwd_s_per_id: float = 0.0
    ebc_bwd_s_per_id: float = 0.0
    dense_fwd_s_per_sample: float = 0.0
    dense_bwd_s_per_sample: float = 0.0
    glue_s_per_sample: float = 0.0
    optimizer_s_per_step: float = 0.0
    other_s_per_step: float = 0.0
    source: str = ""

    @staticmethod
    def from_summaries(summaries: Sequence[Mapping[str, Any]], source: str = "") -> "Profile":
        """From the per-rank step summaries the benchmark scripts write (labels_s, counts).

        Only exclusive (non-collective) time enters: a rank's compute, not its waits.
        """
        tot: dict[str, float] = {}

        def add(key: str, value: float) -> None:
            tot[key] = tot.get(key, 0.0) + value

        for s in summaries:
            lab, cnt = s["labels_s"], s["counts"]
            for mod in ("tt", "ebc"):
                add(f"{mod}_ids", cnt.get(f"{mod}/ids", 0.0))
                add(f"{mod}_ids_in", cnt.get(f"{mod}/ids_in", 0.0))
                add(f"{mod}_prep", sum(v for k, v in lab.items() if k.startswith(f"{mod}/input_dist")))
                add(f"{mod}_fwd", lab.get(f"{mod}/lookup_fwd", 0.0))
                add(f"{mod}_bwd", sum(lab.get(f"{mod}/{k}", 0.0)
                                      for k in ("lookup_bwd", "fused_update", "replica_allreduce")))
                add("glue", sum(v for k, v in lab.items() if k.startswith((f"{mod}/output_dist", f"{mod}/output_a2a_bwd"))))
            add("glue", lab.get("emb_glue", 0.0))
            add("samples", s["batch_per_rank"])
            add("dense_fwd", lab.get("dense_fwd", 0.0))
            add("dense_bwd", lab.get("dense_bwd", 0.0))
            add("opt", lab.get("dense_optimizer", 0.0))
            add("other", lab.get("other", 0.0))
        n = len(summaries)

        def per(num: str, den: str) -> float:
            return tot[num] / tot[den] if tot.get(den) else 0.0

        return Profile(per("tt_prep", "tt_ids_in"), per("tt_fwd", "tt_ids"), per("tt_bwd", "tt_ids"),
                       per("ebc_prep", "ebc_ids_in"), per("ebc_fwd", "ebc_ids"), per("ebc_bwd", "ebc_ids"),
                       per("dense_fwd", "samples"), per("dense_bwd", "samples"), per("glue", "samples"),
                       tot["opt"] / n, tot["other"] / n, source)

    @staticmethod
    def from_json(path: str | Path) -> "Profile":
        """From an e2e JSON (its TT run) or a scaling JSON (its 1-rank weak entry of the first placement)."""
        data = json.loads(Path(path).read_text())
        if data.get("benchmark") == "e2e":
            return Profile.from_summaries(data["runs"]["tt"]["rank_summaries"], f"{path}: runs.tt")
        entry = next(e for e in data["entries"] if e["world_size"] == 1 and e["mode"] == "weak")
        return Profile.from_summaries(entry["rank_summaries"], f"{path}: world_size 1, {entry['placement']}, weak")


# ---------------------------------------------------------------------------------------------
# Plans and byte counts
# ---------------------------------------------------------------------------------------------


@dataclass
class ModelSpec:
    """Tables and dense parameters of a DLRM (from a ttdist Config)."""

    tt_configs: list  # TTEmbeddingBagConfig
    eb_configs: list  # EmbeddingBagConfig (TorchRec tables)
    dense_param_bytes: int

    @staticmethod
    def from_config(cfg) -> "ModelSpec":
        from torchrec.datasets.criteo import INT_FEATURE_COUNT

        from ttdist.model import table_configs
        from ttdist.modules.collection import TTEmbeddingBagConfig

        tables = table_configs(cfg)
        tt = [c for c in tables if isinstance(c, TTEmbeddingBagConfig)]
        eb = [c for c in tables if not isinstance(c, TTEmbeddingBagConfig)]
        return ModelSpec(tt, eb, dlrm_dense_param_bytes(cfg.model.dense_arch_layer_sizes, cfg.model.over_arch_layer_sizes,
                                                        cfg.model.embedding_dim, len(tables), INT_FEATURE_COUNT))


def dlrm_dense_param_bytes(dense_sizes: Sequence[int], over_sizes: Sequence[int], dim: int, num_features: int,
                           dense_in: int = 13, element_size: int = 4) -> int:
    """Parameters of TorchRec DLRM's MLPs: bottom dense_in -> dense_sizes; top (D + F(F+1)/2) -> over_sizes."""
    def mlp(inp: int, sizes: Sequence[int]) -> int:
        total = 0
        for out in sizes:
            total += inp * out + out
            inp = out
        return total

    interaction = dim + num_features * (num_features + 1) // 2
    return element_size * (mlp(dense_in, dense_sizes) + mlp(interaction, over_sizes))


@dataclass
class Plan:
    """Where every table lives. ``tt``: {table: ParameterSharding}; ``eb_units``: one
    (feature, dim, rank) per TorchRec table shard (table_wise: one; column_wise: one per shard)."""

    world_size: int
    tt: dict
    eb_units: list = field(default_factory=list)

    @staticmethod
    def synthetic(spec: ModelSpec, world_size: int, tt_sharding: str) -> "Plan":
        """TT tables all ``tt_sharding`` (table_wise: table i on rank i mod W, the best spread);
        TorchRec tables table-wise, greedily on the least-loaded rank counting TT tables too."""
        from torchrec.distributed.types import ParameterSharding

        from ttdist.distributed.embeddingbag import TT_COMPUTE_KERNEL

        tt = {}
        load = [0] * world_size
        for i, c in enumerate(spec.tt_configs):
            if tt_sharding == "table_wise":
                ranks = [i % world_size]
                load[ranks[0]] += 1
            elif tt_sharding == "row_wise":
                ranks = list(range(world_size))
            else:
                raise ValueError(f"synthetic plans are table_wise or row_wise, got {tt_sharding!r}")
            tt[c.name] = ParameterSharding(sharding_type=tt_sharding, compute_kernel=TT_COMPUTE_KERNEL, ranks=ranks)
        units = []
        for c in spec.eb_configs:
            r = min(range(world_size), key=lambda k: (load[k], k))
            load[r] += 1
            units += [(f, c.embedding_dim, r) for f in c.feature_names]
        return Plan(world_size, tt, units)

    @staticmethod
    def from_summary(spec: ModelSpec, summary: Mapping[str, Mapping[str, Any]], world_size: int) -> "Plan":
        """From ``benchmarks/_common.plan_summary`` (the plan a run used)."""
        from torch.distributed._shard.sharding_spec import EnumerableShardingSpec, ShardMetadata
        from torchrec.distributed.types import ParameterSharding

        tt, units = {}, []
        tt_names = {c.name for c in spec.tt_configs}
        for c in spec.eb_configs + spec.tt_configs:
            p = summary[c.name]
            shards = p.get("shards") or []
            if c.name in tt_names:
                sharding_spec = None
                if p["sharding_type"] == "column_wise":
                    sharding_spec = EnumerableShardingSpec([ShardMetadata(s["offsets"], s["sizes"], f"rank:{s['rank']}/cpu")
                                                            for s in shards])
                tt[c.name] = ParameterSharding(sharding_type=p["sharding_type"], compute_kernel=p["compute_kernel"],
                                               ranks=list(p["ranks"]), sharding_spec=sharding_spec)
            elif p["sharding_type"] == "table_wise":
                units += [(f, c.embedding_dim, p["ranks"][0]) for f in c.feature_names]
            elif p["sharding_type"] == "column_wise":
                units += [(f, s["sizes"][1], s["rank"]) for f in c.feature_names for s in shards]
            else:
                raise NotImplementedError(f"TorchRec {p['sharding_type']} tables are not modelled (table {c.name})")
        return Plan(world_size, tt, units)


def torchrec_ebc_volume(units: Sequence[tuple], world_size: int, rank: int, batch: int, pooling: float = 1.0,
                        values_bytes: int = 8, lengths_bytes: int = 4, emb_bytes: int = 4) -> dict:
    """Bytes rank ``rank`` hands to TorchRec's table-/column-wise EBC collectives per step.

    The same structure as comm_volume (a)-(b) for ttdist's table/column-wise group (TorchRec's
    KJTAllToAll and PooledEmbeddingsAllToAll, unweighted): with U the (feature, D_u, rank) units,
        index   8 W * 3 (splits) + e_l B |U| + e_v L B |U|
        pooled  forward e_o W B sum_{u on rank} D_u,  backward e_o B sum_u D_u
    and nothing at W = 1.
    """
    if world_size == 1 or not units:
        return {"index_all_to_all": 0, "pooled_all_to_all_forward": 0, "pooled_all_to_all_backward": 0}
    n = len(units)
    return {"index_all_to_all": 8 * world_size * 3 + lengths_bytes * batch * n + values_bytes * pooling * batch * n,
            "pooled_all_to_all_forward": emb_bytes * world_size * batch * sum(d for _, d, r in units if r == rank),
            "pooled_all_to_all_backward": emb_bytes * batch * sum(d for _, d, _ in units)}


def collective_bytes(spec: ModelSpec, plan: Plan, rank: int, batch: int) -> dict[str, float]:
    """Per-step bytes rank ``rank`` hands to each collective (flat keys, as ``counted_bytes``)."""
    from ttdist.tools.comm_volume import comm_volume

    w = plan.world_size
    out: dict[str, float] = {}
    if spec.tt_configs:
        v = comm_volume((spec.tt_configs, plan.tt), batch, 1.0, world_size=w, rank=rank,
                        dense_bytes=spec.dense_param_bytes)
        for g in GROUPS:
            out[f"tt.index_all_to_all.{g}"] = v["index_all_to_all"][g]["total"]
            out[f"tt.pooled_all_to_all_forward.{g}"] = v["pooled_all_to_all_forward"][g]
            out[f"tt.pooled_all_to_all_backward.{g}"] = v["pooled_all_to_all_backward"][g]
        out["tt.replicated_grad_all_reduce"] = v["replicated_grad_all_reduce"]
        out["tt.input_check_all_reduce"] = v["input_check_all_reduce"]
    e = torchrec_ebc_volume(plan.eb_units, w, rank, batch)
    for k, b in e.items():
        out[f"ebc.{k}"] = b
    out["ddp_all_reduce"] = spec.dense_param_bytes
    return out


def counted_bytes(collectives: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Counted per-step bytes (benchmarks' ``"<label>|<kind>"`` records) under collective_bytes' keys.

    A record no key claims goes under ``unexpected`` (must be absent for the counts to match).
    """
    out: dict[str, float] = {}

    def add(key: str, b: float) -> None:
        out[key] = out.get(key, 0.0) + b

    for name, rec in collectives.items():
        label, kind = name.split("|")
        b = rec["bytes"]
        base, _, group = label.partition("@")
        if kind == "ddp_all_reduce":
            add("ddp_all_reduce", b)
        elif label == "other" and kind == "all_reduce":
            add("train_loop_flag_all_reduce", b)
        elif base == "tt/input_dist" and kind == "all_reduce" and not group:
            add("tt.input_check_all_reduce", b)
        elif base == "tt/input_dist" and kind == "all_to_all_single":
            add(f"tt.index_all_to_all.{group}", b)
        elif base == "tt/output_dist" and kind == "all_to_all_single":
            add(f"tt.pooled_all_to_all_forward.{group}", b)
        elif base == "tt/output_a2a_bwd" and kind == "all_to_all_single":
            add(f"tt.pooled_all_to_all_backward.{group}", b)
        elif base == "tt/replica_allreduce" and kind == "all_reduce":
            add("tt.replicated_grad_all_reduce", b)
        elif base == "ebc/input_dist" and kind == "all_to_all_single":
            add("ebc.index_all_to_all", b)
        elif base == "ebc/output_dist" and kind == "all_to_all_single":
            add("ebc.pooled_all_to_all_forward", b)
        elif base == "ebc/output_a2a_bwd" and kind == "all_to_all_single":
            add("ebc.pooled_all_to_all_backward", b)
        else:
            add(f"unexpected.{name}", b)
    return out


def compare_bytes(counted: Mapping[str, float], predicted: Mapping[str, float]) -> dict:
    """Counted vs predicted per collective; ``equal`` over the model's collectives (not NOT_MODELLED)."""
    keys = sorted(set(counted) | set(predicted))
    rows = {k: {"counted": counted.get(k, 0), "predicted": predicted.get(k) if k not in NOT_MODELLED else None}
            for k in keys}
    return {"equal": all(r["counted"] == (r["predicted"] or 0) for k, r in rows.items() if k not in NOT_MODELLED),
            "by_collective": rows}


def summarize_plan(sharding_plan) -> dict:
    """A TorchRec ``ShardingPlan`` as plain data: {table: sharding_type, ranks, compute_kernel, shards}."""
    out = {}
    for module_path, module_plan in sharding_plan.plan.items():
        for table, ps in module_plan.items():
            shards = [{"offsets": list(s.shard_offsets), "sizes": list(s.shard_sizes), "rank": s.placement.rank()}
                      for s in ps.sharding_spec.shards] if ps.sharding_spec is not None else []
            out[table] = {"module": module_path, "sharding_type": ps.sharding_type, "ranks": list(ps.ranks or []),
                          "compute_kernel": ps.compute_kernel, "shards": shards}
    return out


def predicted_bytes_for_dmp(dmp, cfg, batch: int) -> dict[str, float]:
    """``collective_bytes`` for a live DistributedModelParallel (its own plan, this rank)."""
    import torch.distributed as dist

    spec = ModelSpec.from_config(cfg)
    plan = Plan.from_summary(spec, summarize_plan(dmp.plan), dist.get_world_size())
    return collective_bytes(spec, plan, dist.get_rank(), batch)


# ---------------------------------------------------------------------------------------------
# Ids per rank and the step time
# ---------------------------------------------------------------------------------------------


def ids_per_rank(spec: ModelSpec, plan: Plan, batch: int) -> tuple[list[float], list[float]]:
    """(TT ids, TorchRec ids) each rank looks up per step (module docstring, uniform rows)."""
    from ttdist.distributed.shard_layout import table_shards

    w = plan.world_size
    tt, eb = [0.0] * w, [0.0] * w
    for c in spec.tt_configs:
        ps = plan.tt[c.name]
        shape = c.tt_shape()
        nf = len(c.feature_names)
        spec_ranks = ([s.placement.rank() for s in ps.sharding_spec.shards]
                      if ps.sharding_spec is not None and ps.sharding_type == "column_wise" else None)
        shards = table_shards(c.name, shape, ps.sharding_type, ps.ranks or [], w, spec_ranks)
        if ps.sharding_type == "row_wise":
            for s in shards:
                tt[s.rank] += nf * w * batch * s.local_shape(shape).num_embeddings / c.num_embeddings
        elif ps.sharding_type == "data_parallel":
            for r in range(w):
                tt[r] += nf * batch
        else:
            for s in shards:
                tt[s.rank] += nf * w * batch
    for _, _, r in plan.eb_units:
        eb[r] += w * batch
    return tt, eb


def step_time(profile: Profile, spec: ModelSpec, plan: Plan, batch: int, links: Cluster | FittedLinks,
              cores: Optional[int] = None, calls: Optional[Mapping[str, int]] = None) -> dict:
    """Predicted step time and its pieces (module docstring). ``cores``: CPU cores the W ranks
    share (None: one device each). ``calls``: collective calls per step (default: ttdist's)."""
    w = plan.world_size
    p = profile
    tt_ids, eb_ids = ids_per_rank(spec, plan, batch)
    f_tt = sum(len(c.feature_names) for c in spec.tt_configs)
    f_eb = sum(len(c.feature_names) for c in spec.eb_configs)

    def piece(per_rank: Sequence[float]) -> float:
        worst = max(per_rank)
        return max(worst, sum(per_rank) / cores) if cores else worst

    def uniform(x: float) -> float:
        return piece([x] * w)

    per_rank_bytes = [collective_bytes(spec, plan, r, batch) for r in range(w)]
    byts = {k: max(b[k] for b in per_rank_bytes) for k in per_rank_bytes[0]}
    has_tt, has_eb = bool(spec.tt_configs), bool(spec.eb_configs)
    tt_groups = {("row_wise" if ps.sharding_type == "row_wise" else "table_column_wise")
                 for ps in plan.tt.values() if ps.sharding_type != "data_parallel"}
    default_calls = {"tt_index": 3 * len(tt_groups), "tt_pooled": len(tt_groups), "tt_check": int(byts.get("tt.input_check_all_reduce", 0) > 0),
                     "tt_replica": int(byts.get("tt.replicated_grad_all_reduce", 0) > 0),
                     "eb_index": 3 * int(has_eb), "eb_pooled": int(has_eb), "flag": int(w > 1),
                     "ddp": max(1, math.ceil(spec.dense_param_bytes / 25e6))}
    n = {**default_calls, **(calls or {})}

    def tt_sum(prefix: str) -> float:
        return sum(byts.get(f"{prefix}.{g}", 0) for g in GROUPS)

    a2a = lambda b, c: all_to_all_time(b, c, w, links)  # noqa: E731
    ar = lambda b, c: all_reduce_time(b, c, w, links)  # noqa: E731
    parts = {
        "input_a2a": uniform(p.tt_prep_s_per_id * batch * f_tt) + uniform(p.ebc_prep_s_per_id * batch * f_eb)
        + a2a(tt_sum("tt.index_all_to_all"), n["tt_index"])
        + ar(byts.get("tt.input_check_all_reduce", 0), n["tt_check"] * (w > 1))
        + a2a(byts["ebc.index_all_to_all"], n["eb_index"]),
        "lookup_fwd": piece([p.tt_fwd_s_per_id * x for x in tt_ids]) + piece([p.ebc_fwd_s_per_id * x for x in eb_ids]),
        "output_a2a_fwd": a2a(tt_sum("tt.pooled_all_to_all_forward"), n["tt_pooled"])
        + a2a(byts["ebc.pooled_all_to_all_forward"], n["eb_pooled"]),
        "emb_glue": uniform(p.glue_s_per_sample * batch),
        "dense_fwd": uniform(p.dense_fwd_s_per_sample * batch),
        "dense_bwd": uniform(p.dense_bwd_s_per_sample * batch),
        "output_a2a_bwd": a2a(tt_sum("tt.pooled_all_to_all_backward"), n["tt_pooled"])
        + a2a(byts["ebc.pooled_all_to_all_backward"], n["eb_pooled"]),
        "lookup_bwd_update": piece([p.tt_bwd_s_per_id * x for x in tt_ids])
        + piece([p.ebc_bwd_s_per_id * x for x in eb_ids]),
        "allreduce": ar(byts.get("tt.replicated_grad_all_reduce", 0), n["tt_replica"])
        + ar(byts["ddp_all_reduce"], n["ddp"]),
        "dense_optimizer": uniform(p.optimizer_s_per_step),
        "other": uniform(p.other_s_per_step) + ar(16 * w, n["flag"]),
    }
    return {"step_time_s": sum(parts.values()), "breakdown_s": parts, "max_rank_bytes": byts,
            "tt_ids_per_rank_max": max(tt_ids), "ebc_ids_per_rank_max": max(eb_ids) if eb_ids else 0}


def weak_scaling(profile: Profile, spec: ModelSpec, batch: int, worlds: Sequence[int], tt_sharding: str,
                 links: Cluster) -> list[dict]:
    """Predicted step time and efficiency T(1)/T(W) at fixed ``batch`` per rank."""
    t1 = step_time(profile, spec, Plan.synthetic(spec, 1, tt_sharding), batch, links)["step_time_s"]
    out = []
    for w in worlds:
        r = step_time(profile, spec, Plan.synthetic(spec, w, tt_sharding), batch, links)
        out.append({"world_size": w, "step_time_s": r["step_time_s"], "efficiency": t1 / r["step_time_s"],
                    "samples_per_s": w * batch / r["step_time_s"], "breakdown_s": r["breakdown_s"],
                    "tt_ids_per_rank_max": r["tt_ids_per_rank_max"]})
    return out


# ---------------------------------------------------------------------------------------------
# Validation against benchmarks/scaling.py and predictions at GPU scale
# ---------------------------------------------------------------------------------------------


def _config_of(setup: Mapping[str, Any], extra: Sequence[str] = ()):
    from ttdist.config import load_config

    return load_config(setup["config"], list(setup["overrides"]) + list(extra))


def validate(scaling_json: str | Path) -> dict:
    """Predicted vs measured bytes (exact) and step times of every entry of a scaling JSON.

    Bytes: ``collective_bytes`` from the entry's plan, per rank, vs the counted bytes.
    Times: ``step_time`` with the profile of the 1-rank entry of the same placement and mode,
    the links fitted by that world size's micro-benchmark, and the machine's cores shared by
    the ranks. The 1-rank prediction is in-sample (its own profile).
    """
    data = json.loads(Path(scaling_json).read_text())
    setup = data["setup"]
    cores = setup["cpu_cores"] if setup["device"] == "cpu" else None
    spec = ModelSpec.from_config(_config_of(setup))
    rows = []
    for e in sorted(data["entries"], key=lambda e: (e["placement"], e["mode"], e["world_size"])):
        w = e["world_size"]
        plan = Plan.from_summary(spec, e["plan"], w)
        bytes_ok, mismatches = True, []
        for r, counted in enumerate(e["bytes_per_rank"]):
            predicted = collective_bytes(spec, plan, r, e["batch_per_rank"])
            for k in (set(predicted) | set(counted)) - set(NOT_MODELLED):
                c = counted.get(k, {}).get("counted", 0)
                if c != predicted.get(k, 0):
                    bytes_ok = False
                    mismatches.append({"rank": r, "collective": k, "counted": c, "predicted": predicted.get(k, 0)})
        base = next(b for b in data["entries"] if b["world_size"] == 1 and b["placement"] == e["placement"]
                    and b["mode"] == e["mode"])
        profile = Profile.from_summaries(base["rank_summaries"], "1-rank entry")
        links = FittedLinks.from_json(e["links"])
        pred = step_time(profile, spec, plan, e["batch_per_rank"], links, cores=cores)
        rows.append({"placement": e["placement"], "mode": e["mode"], "world_size": w,
                     "measured_step_s": e["step_time_s"], "predicted_step_s": pred["step_time_s"],
                     "relative_error": pred["step_time_s"] / e["step_time_s"] - 1,
                     "measured_breakdown_s": e["breakdown_s"], "predicted_breakdown_s": pred["breakdown_s"],
                     "bytes_equal": bytes_ok, "byte_mismatches": mismatches})
    in_range = [r for r in rows if 1 < r["world_size"] <= 4]
    return {"scaling_json": str(scaling_json), "rows": rows, "bytes_all_equal": all(r["bytes_equal"] for r in rows),
            "mean_abs_relative_error_w2_w4": (sum(abs(r["relative_error"]) for r in in_range) / len(in_range)
                                              if in_range else None),
            "max_abs_relative_error_w2_w4": max((abs(r["relative_error"]) for r in in_range), default=None),
            "note": ("W=1 is in-sample (the profile comes from it). W > cores: the ranks share the cores "
                     "(model: a piece takes max(slowest rank, total work / cores)). Links: alpha/beta fitted per W "
                     "by the scaling job's micro-benchmark."),
            "load_average": [setup.get("load_average_before"), setup.get("load_average_after")]}


def print_validation(v: dict) -> None:
    print(f"validation against {v['scaling_json']} (load average before/after the run: {v['load_average']})")
    print(f"{'placement':<10}{'mode':<8}{'W':>3}{'measured ms':>13}{'predicted ms':>14}{'error':>9}{'bytes equal':>13}")
    for r in v["rows"]:
        print(f"{r['placement']:<10}{r['mode']:<8}{r['world_size']:>3}{r['measured_step_s'] * 1e3:>13.1f}"
              f"{r['predicted_step_s'] * 1e3:>14.1f}{r['relative_error'] * 100:>8.0f}%{str(r['bytes_equal']):>13}")
    if v["mean_abs_relative_error_w2_w4"] is not None:
        print(f"step time error over W = 2..4: mean |error| {v['mean_abs_relative_error_w2_w4'] * 100:.0f}%, "
              f"max {v['max_abs_relative_error_w2_w4'] * 100:.0f}%")
    print(f"bytes: counted == predicted on every rank of every entry: {v['bytes_all_equal']}")
    print(v["note"])


def scaled_profile(profile: Profile, speedup: float) -> Profile:
    """Every compute time divided by ``speedup`` (a what-if, e.g. GPU kernels vs one CPU thread)."""
    values = {k: (v / speedup if isinstance(v, float) else v) for k, v in asdict(profile).items()}
    values["source"] = f"{profile.source}, every time / {speedup:g} (ASSUMED, not measured)"
    return Profile(**values)


def predict(profile_json: str | Path, batch_per_gpu: int, worlds: Sequence[int] = (1, 8, 64, 512),
            presets: Sequence[str] = tuple(PRESETS), scale: Optional[float] = None,
            what_if_speedup: Optional[float] = None) -> dict:
    """Weak-scaling predictions, TT table-wise vs row-wise, for every preset cluster.

    ``what_if_speedup``: also predict with every measured compute time divided by this factor
    (an assumption standing in for GPU kernels; labelled as such in the output).
    """
    data = json.loads(Path(profile_json).read_text())
    profile = Profile.from_json(profile_json)
    setup = data["setup"]
    extra = [f"data.cardinality_scale={scale}"] if scale else []
    cfg = _config_of(setup, extra)
    spec = ModelSpec.from_config(cfg)
    out = {"profile": asdict(profile), "profile_device": setup["device"], "batch_per_gpu": batch_per_gpu,
           "model": {"config": setup["config"], "overrides": list(setup["overrides"]) + extra,
                     "tt_tables": [c.name for c in spec.tt_configs], "tt_shapes": {c.name: list(c.tt_shape().p)
                                                                                   for c in spec.tt_configs},
                     "dense_param_bytes": spec.dense_param_bytes},
           "presets": {n: {"intra": asdict(c.intra), "inter": asdict(c.inter), "gpus_per_node": c.gpus_per_node}
                       for n, c in PRESETS.items() if n in presets},
           "predictions": {}}
    for name in presets:
        for sharding in ("table_wise", "row_wise"):
            out["predictions"][f"{name}/{sharding}"] = weak_scaling(profile, spec, batch_per_gpu, worlds, sharding,
                                                                    PRESETS[name])
    if what_if_speedup:
        fast = scaled_profile(profile, what_if_speedup)
        out["what_if"] = {"compute_speedup": what_if_speedup, "profile": asdict(fast),
                          "note": f"ASSUMPTION, not a measurement: every measured compute time divided by "
                                  f"{what_if_speedup:g} to show how the links weigh next to faster (GPU-like) "
                                  "compute. Byte counts are unchanged.",
                          "predictions": {f"{name}/{sh}": weak_scaling(fast, spec, batch_per_gpu, worlds, sh,
                                                                       PRESETS[name])
                                          for name in presets for sh in ("table_wise", "row_wise")}}
    out["notes"] = [
        "Weak scaling: batch_per_gpu samples per GPU; efficiency = T(1)/T(W).",
        f"Compute profile measured on {setup['device']} ({profile.source}); with a CPU profile the per-id and "
        "per-sample times are CPU times, so absolute step times are not GPU step times and communication weighs "
        "less than it would next to GPU kernels. Rerun with a GPU-measured e2e/scaling JSON for GPU numbers.",
        "table_wise: TT table i on GPU i mod W (the best spread); TorchRec tables greedily on the least-loaded GPU. "
        "A table-wise table's GPU looks up all W*B ids of its feature, so past W = #tables the busiest GPU's "
        "lookup work grows as W.",
        "row_wise: ids spread in proportion to each GPU's rows (uniform hashing); only ceil(p_1/ceil(p_1/W)) GPUs "
        "hold rows of a table, and the pooled all-to-all carries W*B partial sums per feature per GPU.",
        "No compute/communication overlap (an upper bound for pipelined training).",
    ]
    return out


def plot_predictions(pred: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = list(pred["presets"])
    fig, axes = plt.subplots(1, len(presets), figsize=(4 * len(presets), 3.8), sharey=True)
    for ax, name in zip(axes if len(presets) > 1 else [axes], presets):
        for color, sharding in zip(("tab:blue", "tab:orange"), ("table_wise", "row_wise")):
            pts = pred["predictions"][f"{name}/{sharding}"]
            ax.plot([p["world_size"] for p in pts], [p["efficiency"] for p in pts], "o-", color=color,
                    label=f"TT {sharding} (measured compute)")
            if "what_if" in pred:
                pts = pred["what_if"]["predictions"][f"{name}/{sharding}"]
                ax.plot([p["world_size"] for p in pts], [p["efficiency"] for p in pts], "s--", color=color, alpha=0.6,
                        label=f"TT {sharding}, compute / {pred['what_if']['compute_speedup']:g} (assumed)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("GPUs")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    (axes[0] if len(presets) > 1 else axes).set_ylabel("predicted weak-scaling efficiency")
    fig.suptitle(f"ttdist.tools.perf_model, {pred['batch_per_gpu']} samples/GPU, compute profile from "
                 f"{pred['profile_device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m ttdist.tools.perf_model", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--validate", metavar="SCALING_JSON", help="predicted vs measured bytes and step times")
    p.add_argument("--validation-out", default=None, help="write the validation JSON here")
    p.add_argument("--predict", action="store_true", help="weak-scaling predictions at --worlds GPUs")
    p.add_argument("--profile", default="benchmarks/results/scaling_cpu.json",
                   help="compute profile: a scaling JSON (its 1-rank entry) or an e2e JSON (its TT run)")
    p.add_argument("--batch-per-gpu", type=int, default=4096)
    p.add_argument("--worlds", default="1,8,64,512")
    p.add_argument("--scale", type=float, default=None, help="cardinality scale of the modelled tables "
                   "(default: the profile run's)")
    p.add_argument("--what-if-speedup", type=float, default=None,
                   help="also predict with every compute time divided by this (an assumption, labelled so)")
    p.add_argument("--out", default="benchmarks/results/perf_model_predictions.json")
    args = p.parse_args(argv)
    if not args.validate and not args.predict:
        p.error("give --validate SCALING_JSON and/or --predict")
    if args.validate:
        v = validate(args.validate)
        print_validation(v)
        if args.validation_out:
            Path(args.validation_out).write_text(json.dumps(v, indent=2))
            print(f"wrote {args.validation_out}")
    if args.predict:
        pred = predict(args.profile, args.batch_per_gpu, [int(x) for x in args.worlds.split(",")], scale=args.scale,
                       what_if_speedup=args.what_if_speedup)
        if args.validate:
            pred["validation"] = {k: v[k] for k in ("scaling_json", "bytes_all_equal", "mean_abs_relative_error_w2_w4",
                                                    "max_abs_relative_error_w2_w4", "load_average")}
            pred["validation"]["rows"] = [{k: r[k] for k in ("placement", "mode", "world_size", "measured_step_s",
                                                             "predicted_step_s", "relative_error", "bytes_equal")}
                                          for r in v["rows"]]
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(pred, indent=2))
        png = out.with_suffix(".png")
        plot_predictions(pred, png)
        print(f"\n{'preset/sharding':<24}" + "".join(f"{'W=' + str(w):>22}" for w in args.worlds.split(",")))
        for key, pts in pred["predictions"].items():
            print(f"{key:<24}" + "".join(f"{p['step_time_s'] * 1e3:>10.1f} ms E={p['efficiency']:<6.3f}" for p in pts))
        if "what_if" in pred:
            print(f"what-if (ASSUMED compute / {pred['what_if']['compute_speedup']:g}):")
            for key, pts in pred["what_if"]["predictions"].items():
                print(f"{key:<24}" + "".join(f"{p['step_time_s'] * 1e3:>10.2f} ms E={p['efficiency']:<6.3f}"
                                             for p in pts))
        print(f"wrote {out} and {png}")


if __name__ == "__main__":
    main()
