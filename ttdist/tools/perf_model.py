"""An analytical model of one DLRM training step of ttdist (TT + TorchRec tables under DMP).

Inputs
------
* a **compute profile** measured on single ranks (``Profile``): per-id times of the TT lookup
  (forward; backward with the in-kernel update of owned cores), per-element time of the
  replicated cores' step (gradient gather + optimizer over every replicated core element), of
  fbgemm's TBE for the plain tables, per-id input preparation, per-sample dense (MLP +
  interaction + loss) forward and backward, per-step optimizer and loop overhead — pooled over
  the 1-rank entries of a ``benchmarks/scaling.py`` JSON (``Profile.from_scaling``);
* the **plan** (which table on which rank; TT tables table-, row-, column-wise or data-parallel,
  TorchRec tables table-, column- or row-wise) and the byte count of every collective:
  ``ttdist.tools.comm_volume`` for the TT collection (its formula, section (a)-(e)),
  ``torchrec_ebc_volume`` below for TorchRec's tables, the DDP all-reduce of the dense
  parameters, and the training loop's 16-byte flag all-reduce;
* a **link** model: bandwidth beta (bytes/s per GPU, one direction) and latency alpha (s).

Symbols: W ranks, G GPUs per node, B samples per rank, L = 1 id per sample and feature
(Criteo), F_tt / F_eb TT / plain features, ids_r the ids rank r looks up, S_r the bytes rank r
hands to a collective (``comm_volume``'s convention), S = max_r S_r.

Ids per rank (uniform hashing of ids over rows, which the synthetic data's scrambled power law
approximates): a table-/column-wise unit on rank r looks up all W*B ids of its feature; a
row-wise TT table gives rank r the fraction rows_r / N of its W*B ids, rows_r being the rows of
rank r's G_1 slice (``shard_layout.table_shards``: ranks past ceil(p_1 / ceil(p_1/W)) hold no
rows, so at W > p_1 the ids concentrate on p_1 ranks); a data-parallel TT table gives every rank
only its own B ids (no all-to-all); a TorchRec row-wise table gives every rank B ids per feature.
Replicated core elements per rank (the same on every rank), E_rep = sum over TT tables of the
cores ``shard_layout.replicated_cores`` names: G_2..G_d of row-/column-wise tables, G_1..G_d of
data-parallel ones (nothing for table-wise); batch-independent.

Per-rank compute of the pieces (a_* from the profile):
    prep_tt,r = a_prep_tt * B * F_tt           fwd_tt,r = a_fwd_tt * ids_tt,r     bwd_tt,r = a_bwd_tt * ids_tt,r
    replica_step = a_rep * E_rep   (dense gradient gather + optimizer over every replicated element)
    prep_eb,r = a_prep_eb * B * F_eb           fwd_eb,r = a_fwd_eb * ids_eb,r     bwd_eb,r = a_bwd_eb * ids_eb,r
    glue = m_glue * B (KeyedTensor assembly, feature selection)  dense_fwd = m_fwd * B    dense_bwd = m_bwd * B
    opt = c_opt     other = c_other
A profile taken from a scaling JSON (``Profile.from_scaling``) instead charges rank r's TT lookups
what the TT kernel's cost model (``ttdist.distributed.tt_costs``, this host's calibration of the
profile's device) gives its shards: the kernel multiplies a prefix shared by several ids out once
per batch, so a row-wise shard's ids (a slice of G_1: few distinct prefixes) or a larger batch
cost less per id. Its coefficients are scaled per direction so that at the profile's own shape
(every TT table whole on one rank, the profile's batch) it gives exactly a_fwd_tt * ids and
a_bwd_tt * ids (``Profile.tt_kernel``).
Step time: the pipeline is synchronous (every collective is a barrier), so the critical path is
    T = sum over pieces p of  X_p  +  sum over collectives c of  t_c,
    X_p = max_r x_p,r                         (own cores / GPUs per rank), or
    X_p = max(max_r x_p,r, sum_r x_p,r / cores)   (W ranks sharing `cores` CPU cores: oversubscribed)
in the order: prep_tt, prep_eb, [TT index a2a + check all-reduce, TBE index a2a], fwd_tt + fwd_eb,
[TT pooled a2a fwd, TBE pooled a2a fwd / row-wise reduce-scatter], glue, dense_fwd, other, [flag
all-reduce], dense_bwd, [TBE and TT pooled a2a bwd / row-wise all-gather], bwd_eb + bwd_tt,
replica_step, [TT replica all-reduce: 4 E_rep bytes, one call], [DDP all-reduce], opt. The TT and
TorchRec lookups are one piece, x_r = fwd_tt,r + fwd_eb,r (bwd alike): no collective separates
them on a rank (``MixedEmbeddingBagCollection.forward`` starts both index all-to-alls before
either lookup; the pooled all-to-alls are asynchronous, awaited after both lookups forward and
launched before either lookup backward), so a rank with few TT ids may take more TorchRec ids.
A data-parallel TT table thus costs a_fwd + a_bwd per local id, a_rep per core element and
one all-reduce of its cores whose size does not depend on B or W (ring: 2 (W-1)/W * bytes / beta). No overlap of communication with compute (ttdist runs the plain
DMP forward, not TorchRec's pipelined train loop), so T is an upper bound for pipelined runs.

Collective time (S as above, n the number of calls of that collective per step):
    GPU presets, all-to-all:   t = n (W-1) alpha + S (W-1)/W / beta_intra                      (W <= G)
                               t = n (W-1) alpha_inter + max(S (G-1)/W / beta_intra,
                                                              S (W-G)/W / beta_inter)          (W > G)
        (per-peer latency serialised: a conservative upper bound; the bytes to ranks on other
        nodes cross the inter-node link, the rest NVLink/PCIe, both at once)
    GPU presets, all-reduce:   t = 2 (W-1)/W * S / beta + 2 ceil(log2 W) alpha   (ring bandwidth,
        tree latency as NCCL picks for small messages); beta = beta_intra (W <= G), else
        min(beta_intra, G beta_inter): one ring per NIC, G NICs per node (NVIDIA/nccl issue 412;
        ``ttdist.distributed.planner.all_reduce_bus_bandwidth``, which the planner prices too);
        alpha of the inter-node link when W > G
    CPU (gloo, fitted):        t = n alpha_kind + S / beta_kind, alpha/beta fitted per world size
        by least squares on a micro-benchmark of all_to_all_single / all_reduce run in the same
        job (benchmarks/scaling.py), since loopback gloo has no datasheet; or (``validate``)
        fitted to the collectives timed inside the training steps of other plans at the same W
        (``in_step_links``): on this 2-vCPU VM an in-step call costs ~1 ms more than the
        micro-benchmark's.
    TorchRec row-wise: reduce-scatter of S (forward) and all-gather to W times its input
        (backward) timed as all-to-alls of those bytes (a ring moves (W-1)/W of them).
    W = 1: no collective except DDP's (gloo/NCCL all-reduce on one rank), taken as 0 on GPU
        and as the fitted alpha on CPU.
    Host work of a communicating dist step (fitted links only): every TT group other than
        data-parallel and every TorchRec sharding type has three dist steps per training step
        (index all-to-all, pooled all-to-all forward, its backward); beyond its collective and
        beyond what the same step costs at W = 1 (already in prep / glue), each one does host
        work only when it communicates: splits, packing and unpacking the buffers, building the
        received KeyedJaggedTensor, bucketizing ids and summing the W partial sums (row-wise):
            t_host = steps * h_step + S * h_byte   (S: the bytes it hands to its collectives)
        added to input_a2a / output_a2a_fwd / output_a2a_bwd. ``validate`` fits h_step, h_byte
        (``in_step_dist_host``) on the OTHER placements' entries at the same W, as the links:
        the exclusive time of their dist-step labels minus the 1-rank entry's (same placement and
        mode, scaled to the batch per rank). On the 2-vCPU VM about 0.7 ms per step and 0.16 ns
        per byte; row-wise, with TT and TorchRec dist steps both and twice the pooled bytes (the
        [B, W*D] partial sums), gets the most of it. Not known on GPU presets (0 there).

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

Validation also compares, per entry, the pieces whose work is the same for every placement
(``PLACEMENT_INDEPENDENT``: dense forward and backward on the same samples per rank) with the
other placements' median at the same mode and W (``placement_independent_check``): a piece
more than DISTURBED_RATIO times that median is a disturbed measurement of a shared machine, not
a cost of the placement, and is reported as such (the error is still counted).

Co-located ranks (``validate``, CPU): W ranks sharing one host slow each other's compute (caches,
memory bandwidth, clocks) beyond the ``cores`` term; every compute time of the 1-rank profile is
multiplied by the measured / modelled MLP forward + backward of the OTHER placements at the same
W and mode (median; ``colocated_slowdown``), the same leave-one-placement-out as the links.

What the model does not know: GPU kernel times (the shipped predictions use CPU-measured
profiles, and a what-if that divides them by an ASSUMED factor — see
``benchmarks/results/perf_model_predictions.json``'s assumptions), contention on shared links
beyond the per-GPU NIC, the output-size term of row-wise lookups ([W*B, D] partial sums written
and read per rank, not only per id), stragglers.

CLI:
    python -m ttdist.tools.perf_model --validate benchmarks/results/scaling_cpu.json
    python -m ttdist.tools.perf_model --predict [--profile PROFILE_JSON ...] [--batch-per-gpu B] [--what-if-speedup X]
(PROFILE_JSON: ``benchmarks/scaling.py --worlds 1`` of one config; defaults in DEFAULT_PROFILES.)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

if TYPE_CHECKING:
    from torchrec.distributed.planner import Topology

    from ttdist.distributed.tt_costs import TTKernelCalibration

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
    # host work of a communicating dist step beyond its collective and beyond what it costs at
    # W = 1 (``dist_host_points``): t = steps * dist_host_s_per_step + bytes * dist_host_s_per_byte
    dist_host_s_per_step: float = 0.0
    dist_host_s_per_byte: float = 0.0

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


def all_to_all_call_latency(world: int, cluster: Cluster) -> float:
    """Seconds ``all_to_all_time`` charges one all-to-all call of ``world`` ranks on a preset
    beyond its bytes: the per-peer latency serialised, (W-1) alpha, of the intra-node link when
    the W ranks fit in a node, else of the inter-node link; 0 at W = 1."""
    return (world - 1) * (cluster.intra if world <= cluster.gpus_per_node else cluster.inter).latency


def all_to_all_time(nbytes: float, calls: int, world: int, cluster: Cluster | FittedLinks) -> float:
    """Time of ``calls`` all-to-alls moving at most ``nbytes`` per rank in all (module docstring)."""
    if world == 1 or calls == 0:
        return 0.0
    if isinstance(cluster, FittedLinks):
        return calls * cluster.a2a_alpha + nbytes / cluster.a2a_beta
    g = cluster.gpus_per_node
    latency = calls * all_to_all_call_latency(world, cluster)
    if world <= g:
        return latency + nbytes * (world - 1) / world / cluster.intra.bandwidth
    return latency + max(nbytes * (g - 1) / world / cluster.intra.bandwidth,
                         nbytes * (world - g) / world / cluster.inter.bandwidth)


def all_reduce_time(nbytes: float, calls: int, world: int, cluster: Cluster | FittedLinks) -> float:
    if calls == 0:
        return 0.0
    if isinstance(cluster, FittedLinks):
        return calls * cluster.ar_alpha + nbytes / cluster.ar_beta
    if world == 1:
        return 0.0
    from ttdist.distributed.planner import all_reduce_bus_bandwidth

    g = cluster.gpus_per_node
    bus = all_reduce_bus_bandwidth(world, g, cluster.intra.bandwidth, cluster.inter.bandwidth)
    latency = (cluster.intra if world <= g else cluster.inter).latency
    return 2 * (world - 1) / world * nbytes / bus + calls * 2 * math.ceil(math.log2(world)) * latency


# ---------------------------------------------------------------------------------------------
# Compute profile
# ---------------------------------------------------------------------------------------------


@dataclass
class Profile:
    """Measured single-rank times (see the module docstring); ``source`` says where from."""

    tt_prep_s_per_id: float = 0.0
    tt_fwd_s_per_id: float = 0.0
    tt_bwd_s_per_id: float = 0.0
    tt_replica_s_per_element: float = 0.0
    ebc_prep_s_per_id: float = 0.0
    ebc_fwd_s_per_id: float = 0.0
    ebc_bwd_s_per_id: float = 0.0
    dense_fwd_s_per_sample: float = 0.0
    dense_bwd_s_per_sample: float = 0.0
    glue_s_per_sample: float = 0.0
    optimizer_s_per_step: float = 0.0
    other_s_per_step: float = 0.0
    source: str = ""
    # the TT kernel's cost model fitted to tt_fwd/bwd_s_per_id (module docstring); None: a flat cost per id
    tt_kernel: Optional[TTKernelCalibration] = None

    @staticmethod
    def from_summaries(summaries: Sequence[Mapping[str, Any]], source: str = "",
                       replicated_elements: Optional[Sequence[float]] = None) -> "Profile":
        """From per-rank step summaries of the benchmark scripts (labels_s, counts), pooled:
        every coefficient is the summed time over the summed count.

        ``replicated_elements``: per summary, the replicated core elements of its rank
        (``replicated_core_elements``); the replicated cores' step (label ``tt/fused_update``)
        is timed per element of them. Only exclusive (non-collective) time enters.
        """
        reps = list(replicated_elements) if replicated_elements is not None else [0.0] * len(summaries)
        tot: dict[str, float] = {}

        def add(key: str, value: float) -> None:
            tot[key] = tot.get(key, 0.0) + value

        for s, rep in zip(summaries, reps, strict=True):
            lab, cnt = s["labels_s"], s["counts"]
            for mod in ("tt", "ebc"):
                add(f"{mod}_ids", cnt.get(f"{mod}/ids", 0.0))
                add(f"{mod}_ids_in", cnt.get(f"{mod}/ids_in", 0.0))
                add(f"{mod}_prep", sum(v for k, v in lab.items() if k.startswith(f"{mod}/input_dist")))
                add(f"{mod}_fwd", lab.get(f"{mod}/lookup_fwd", 0.0))
                add(f"{mod}_bwd", lab.get(f"{mod}/lookup_bwd", 0.0))
                add("glue", sum(v for k, v in lab.items() if k.startswith((f"{mod}/output_dist", f"{mod}/output_a2a_bwd"))))
            replica_step = lab.get("tt/fused_update", 0.0) + lab.get("tt/replica_allreduce", 0.0)
            if rep:
                add("replica", replica_step)
                add("replica_elements", rep)
            else:  # no replicated core: the step's empty call is lookup backward time
                add("tt_bwd", replica_step)
            add("glue", lab.get("emb_glue", 0.0))
            add("samples", s["batch_per_rank"])
            add("dense_fwd", lab.get("dense_fwd", 0.0))
            add("dense_bwd", lab.get("dense_bwd", 0.0))
            add("opt", lab.get("dense_optimizer", 0.0))
            add("other", lab.get("other", 0.0))
        n = len(summaries)

        def per(num: str, den: str) -> float:
            return tot.get(num, 0.0) / tot[den] if tot.get(den) else 0.0

        return Profile(per("tt_prep", "tt_ids_in"), per("tt_fwd", "tt_ids"), per("tt_bwd", "tt_ids"),
                       per("replica", "replica_elements"),
                       per("ebc_prep", "ebc_ids_in"), per("ebc_fwd", "ebc_ids"), per("ebc_bwd", "ebc_ids"),
                       per("dense_fwd", "samples"), per("dense_bwd", "samples"), per("glue", "samples"),
                       tot["opt"] / n, tot["other"] / n, source)

    @staticmethod
    def from_scaling(data: Mapping[str, Any], spec: "ModelSpec", mode: str = "weak", source: str = "") -> "Profile":
        """Pooled over the 1-rank entries of ``mode`` of a scaling JSON (every placement it ran), with
        this host's TT kernel calibration of the run's device fitted to it (``fitted_tt_kernel``)."""
        from ttdist.distributed import tt_costs

        entries = [e for e in data["entries"] if e["world_size"] == 1 and e["mode"] == mode]
        if not entries:
            raise ValueError(f"{source or 'the scaling JSON'} has no 1-rank {mode} entry to take a profile from; "
                             "run benchmarks/scaling.py with --worlds including 1")
        summaries, reps = [], []
        for e in entries:
            rep = replicated_core_elements(spec, Plan.from_summary(spec, e["plan"], 1))
            summaries += e["rank_summaries"]
            reps += [rep] * len(e["rank_summaries"])
        placements = ", ".join(e["placement"] for e in entries)
        profile = Profile.from_summaries(summaries, f"{source}: 1-rank {mode} entries ({placements}), pooled", reps)
        if spec.tt_configs:
            runs = [(Plan.from_summary(spec, e["plan"], 1), e["batch_per_rank"]) for e in entries]
            profile.tt_kernel = fitted_tt_kernel(profile, spec, runs, tt_costs.calibration(data["setup"]["device"]))
        return profile


def fitted_tt_kernel(profile: Profile, spec: "ModelSpec", runs: Sequence[tuple["Plan", int]],
                     calibration: TTKernelCalibration) -> TTKernelCalibration:
    """``calibration`` with its forward and backward coefficients scaled so that over ``runs``
    (the profile's 1-rank runs: plan, batch) it charges the TT lookups what ``profile`` does,
    tt_fwd_s_per_id and tt_bwd_s_per_id per id (the replicated cores' step stays
    tt_replica_s_per_element: ``update_per_param`` is left as it is)."""
    ids = fwd = bwd = 0.0
    for plan, batch in runs:
        f, b = tt_lookup_seconds(spec, plan, batch, calibration)
        ids, fwd, bwd = ids + sum(ids_per_rank(spec, plan, batch)[0]), fwd + sum(f), bwd + sum(b)
    return calibration.scaled(profile.tt_fwd_s_per_id * ids / fwd, profile.tt_bwd_s_per_id * ids / bwd, 1.0,
                              source=f"{calibration.source}, scaled to the profile {profile.source}")


def scaled_profile(profile: Profile, speedup: float, why: str = "ASSUMED, not measured") -> Profile:
    """Every compute time divided by ``speedup`` (a what-if, e.g. GPU kernels vs one CPU thread,
    or a measured slowdown: ``speedup`` < 1); ``why`` goes into the profile's source."""
    values = {f.name: getattr(profile, f.name) / speedup for f in dataclasses.fields(profile)
              if isinstance(getattr(profile, f.name), float)}
    kernel = profile.tt_kernel and profile.tt_kernel.scaled(1 / speedup, 1 / speedup, 1 / speedup)
    return dataclasses.replace(profile, **values, tt_kernel=kernel,
                               source=f"{profile.source}, every time / {speedup:g} ({why})")


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
    """Where every table lives. ``tt``: {table: ParameterSharding}; TorchRec tables:
    ``eb_units`` one (feature, dim, rank) per table-wise feature, ``eb_column_wise`` one
    (feature, shard dim, rank) per column-wise shard, ``eb_row_wise`` one (feature, dim) per
    row-wise feature (TorchRec runs one input and one output dist per sharding type),
    ``eb_data_parallel`` one (features, dim, rows) per data-parallel table (every rank looks up
    its own samples; DDP all-reduces the table's gradient)."""

    world_size: int
    tt: dict
    eb_units: list = field(default_factory=list)
    eb_column_wise: list = field(default_factory=list)
    eb_row_wise: list = field(default_factory=list)
    eb_data_parallel: list = field(default_factory=list)

    def eb_groups(self) -> list[str]:
        """The TorchRec sharding types present (one KJTAllToAll each)."""
        return [k for k, units in (("table_wise", self.eb_units), ("column_wise", self.eb_column_wise),
                                   ("row_wise", self.eb_row_wise)) if units]

    @staticmethod
    def synthetic(spec: ModelSpec, world_size: int, tt_sharding: str) -> "Plan":
        """TT tables all ``tt_sharding`` (table_wise: table i on rank i mod W, the best spread;
        row_wise / data_parallel: every rank); TorchRec tables table-wise, greedily on the
        least-loaded rank counting table-wise TT tables too."""
        from torchrec.distributed.types import ParameterSharding

        from ttdist.distributed.embeddingbag import TT_COMPUTE_KERNEL

        if tt_sharding not in SYNTHETIC_TT_SHARDINGS:
            raise ValueError(f"synthetic plans are {' / '.join(SYNTHETIC_TT_SHARDINGS)}, got {tt_sharding!r}")
        tt = {}
        load = [0] * world_size
        for i, c in enumerate(spec.tt_configs):
            ranks = [i % world_size] if tt_sharding == "table_wise" else list(range(world_size))
            if tt_sharding == "table_wise":
                load[ranks[0]] += 1
            tt[c.name] = ParameterSharding(sharding_type=tt_sharding, compute_kernel=TT_COMPUTE_KERNEL, ranks=ranks)
        units = []
        for c in spec.eb_configs:
            r = min(range(world_size), key=lambda k: (load[k], k))
            load[r] += 1
            units += [(f, c.embedding_dim, r) for f in c.feature_names]
        return Plan(world_size, tt, units)

    @staticmethod
    def from_summary(spec: ModelSpec, summary: Mapping[str, Mapping[str, Any]], world_size: int) -> "Plan":
        """From ``summarize_plan`` (the plan a run used, as the benchmarks store it)."""
        from torch.distributed._shard.sharding_spec import EnumerableShardingSpec, ShardMetadata
        from torchrec.distributed.types import ParameterSharding

        tt, units, column_wise, row_wise, data_parallel = {}, [], [], [], []
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
                column_wise += [(f, s["sizes"][1], s["rank"]) for f in c.feature_names for s in shards]
            elif p["sharding_type"] == "row_wise":
                row_wise += [(f, c.embedding_dim) for f in c.feature_names]
            elif p["sharding_type"] == "data_parallel":
                data_parallel.append((len(c.feature_names), c.embedding_dim, c.num_embeddings))
            else:
                raise NotImplementedError(f"TorchRec {p['sharding_type']} tables are not modelled (table {c.name}); "
                                          "ttdist plans TorchRec tables table-, column-, row-wise or data-parallel")
        return Plan(world_size, tt, units, column_wise, row_wise, data_parallel)

    def sharding_counts(self) -> dict[str, dict[str, int]]:
        """How many TT / TorchRec tables (features) each sharding type holds."""
        tt: dict[str, int] = {}
        for ps in self.tt.values():
            tt[ps.sharding_type] = tt.get(ps.sharding_type, 0) + 1
        eb = {"table_wise": len(self.eb_units), "column_wise_shards": len(self.eb_column_wise),
              "row_wise": len(self.eb_row_wise), "data_parallel": len(self.eb_data_parallel)}
        return {"tt": tt, "torchrec": eb}


SYNTHETIC_TT_SHARDINGS = ("table_wise", "row_wise", "data_parallel")


def torchrec_lookup_s_per_id(cfg, batch_per_rank: int, topology: Topology) -> float:
    """Seconds TorchRec's planner estimator charges one id of a TorchRec table on ``topology``:
    forward + backward compute of the table-wise options, pooled over ``cfg``'s TorchRec tables
    as ``Profile``'s ebc_fwd_s_per_id + ebc_bwd_s_per_id are (the model built on meta)."""
    import torch
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
    from torchrec.distributed.planner.shard_estimators import EmbeddingPerfEstimator

    from ttdist.model import build_model, build_sharders, plan_constraints

    constraints = plan_constraints(cfg, topology.compute_device)
    enumerator = EmbeddingEnumerator(topology, batch_per_rank, constraints,
                                     estimator=[EmbeddingPerfEstimator(topology, constraints)])
    sharders = [s for s in build_sharders(cfg) if isinstance(s, EmbeddingBagCollectionSharder)]
    options = [o for o in enumerator.enumerate(build_model(cfg, torch.device("meta")), sharders)
               if o.sharding_type == "table_wise"]
    seconds = sum(s.perf.fwd_compute + s.perf.bwd_compute for o in options for s in o.shards) / 1e3
    return seconds / sum(topology.world_size * o.batch_size * sum(o.input_lengths) for o in options)


def planner_topology(cfg, world_size: int, batch_per_rank: int, profile: Profile,
                     links: Optional[Cluster] = None) -> Topology:
    """The ``Topology`` ``planner_plan`` plans on: W GPUs on the links of the preset ``links``, so
    that the planner prices a collective on the links ``step_time`` charges it on: its GPUs per
    node as local_world_size (TorchRec's default puts all W on one host, and its to_sharding_plan
    then fails at W = 512 with "Invalid device string: 'cuda:-28'"), its intra- / inter-node
    bandwidths as intra_host_bw / inter_host_bw (bytes/s -> TorchRec's bytes/ms; with TorchRec's
    defaults, 600 / 12.5 GiB/s, it charged row-wise's pooled all-to-all across nodes 2x what the
    presets' 25 GB/s InfiniBand does). At W = 1 nothing is communicated and ``step_time`` charges
    no collective, but the estimators still charge a table-wise table's pooled output bytes /
    intra_host_bw (a data-parallel one nothing), which tipped the W = 1 plan with the bandwidth;
    so at W = 1 every bandwidth is infinite, whatever ``links`` (which may then be None), and the
    W = 1 plan depends on no link. And the HBM bandwidth at which TorchRec's estimator charges a
    TorchRec table's lookup what the predictions do, ``profile``'s ebc_fwd_s_per_id +
    ebc_bwd_s_per_id per id: at its default bandwidth (a GPU's) it charges 190-270x less than the
    Criteo CPU profiles, and the planner then stacks the TorchRec tables on a few ranks. Its
    compute estimate of the fused kernel on cuda is bytes / hbm_mem_bw, so one ratio sets it.

    TorchRec's own link model stays: an all-to-all costs bytes / intra_host_bw if its W ranks fit
    in a node, else bytes / inter_host_bw (``step_time``: the (W-1)/W of the bytes that leave a
    rank, split over both links). Every all-reduce (a TT table's replicated cores, a data-parallel
    TorchRec table's gradient) is priced at ``all_reduce_bus_bandwidth`` (``planner.BusBandwidths``),
    as ``step_time`` charges it. The Topology has no
    per-message latency: ``planner_plan`` gives ``make_planner`` a price per call instead."""
    from torchrec.distributed.planner import Topology
    from torchrec.distributed.planner.constants import HBM_MEM_BW

    from ttdist.distributed.planner import bus_topology

    if world_size == 1:
        intra = inter = math.inf
    elif links is None:
        raise ValueError(f"planner_topology needs the links of {world_size} GPUs (a PRESETS cluster)")
    else:
        intra, inter = links.intra.bandwidth / 1e3, links.inter.bandwidth / 1e3
    charged = torchrec_lookup_s_per_id(cfg, batch_per_rank, Topology(world_size=1, compute_device="cuda"))
    assumed = profile.ebc_fwd_s_per_id + profile.ebc_bwd_s_per_id
    return bus_topology(world_size, "cuda", intra, inter,
                        local_world_size=1 if world_size == 1 else min(world_size, links.gpus_per_node),
                        hbm_mem_bw=HBM_MEM_BW * charged / assumed)


def planner_plan(cfg, spec: ModelSpec, world_size: int, batch_per_rank: int, profile: Profile,
                 cpu_speedup: float = 1.0, links: Optional[Cluster] = None) -> Plan:
    """What ttdist's planner picks for ``cfg``'s model on ``world_size`` GPUs connected by
    ``links`` (a PRESETS cluster; ignored, may be None, at W = 1): ``make_planner`` on
    ``planner_topology`` and the training's constraints (``ttdist.model.plan_constraints``); the
    model is built on meta.

    It plans with the compute costs the predictions charge, ``scaled_profile(profile,
    cpu_speedup)``: its TorchRec lookups cost that profile's per id (``planner_topology``), its TT
    shards what that profile's TT kernel cost model gives them (``Profile.tt_kernel``: this host's
    calibration fitted to the profile, / ``cpu_speedup``; ``step_time`` charges the same), on a
    GPU host too. Only a profile without a kernel (hand-made, ``from_summaries``) leaves the
    planner this host's raw CPU calibration (``tt_costs.calibration("cpu")``) / ``cpu_speedup``.

    It prices every collective call of a plan (``TTCollectivesPerfModel``: every sharding group's,
    TT and TorchRec) at what ``step_time`` charges one all-to-all call at this W on ``links``,
    ``all_to_all_call_latency``: (W-1) alpha, the per-peer latency serialised (0 at W = 1). The
    all-to-alls are nearly all of a plan's calls; its one replicated-core all-reduce, which
    ``step_time`` charges 2 ceil(log2 W) alpha, is priced as an all-to-all too (less at W < 7,
    more at W > 7: 63 alpha, not 12, at W = 64)."""
    import torch

    from ttdist.distributed import make_planner, tt_costs
    from ttdist.distributed.tt_costs import TTCostModel
    from ttdist.model import build_model, build_sharders, plan_constraints
    from ttdist.modules.optim import OptimType

    kernel = profile.tt_kernel or tt_costs.calibration("cpu")
    assumed = scaled_profile(dataclasses.replace(profile, tt_kernel=kernel), cpu_speedup)
    latency_s = all_to_all_call_latency(world_size, links) if world_size > 1 else 0.0
    planner = make_planner(planner_topology(cfg, world_size, batch_per_rank, assumed, links),
                           batch_size=batch_per_rank,
                           constraints=plan_constraints(cfg, "cuda"),
                           optimizer=OptimType.parse(cfg.optim.embedding_optimizer),
                           cost_model=TTCostModel(assumed.tt_kernel), collective_latency_ms=latency_s * 1e3)
    model = build_model(cfg, torch.device("meta"))
    return Plan.from_summary(spec, summarize_plan(planner.plan(model, build_sharders(cfg))), world_size)


def replicated_core_elements(spec: ModelSpec, plan: Plan) -> int:
    """Core elements every rank holds a replica of (G_2..G_d of row-/column-wise TT tables, all
    cores of data-parallel ones): what the replicated cores' step reads and updates per step."""
    from ttdist.distributed.shard_layout import replicated_cores

    return sum(math.prod(c.tt_shape().core_shapes[k]) for c in spec.tt_configs
               for k in replicated_cores(plan.tt[c.name].sharding_type, c.tt_shape().d))


def torchrec_ebc_volume(units: Sequence[tuple], world_size: int, rank: int, batch: int,
                        row_wise: Sequence[tuple] = (), column_wise: Sequence[tuple] = (), pooling: float = 1.0,
                        values_bytes: int = 8, lengths_bytes: int = 4, emb_bytes: int = 4) -> dict:
    """Bytes rank ``rank`` hands to TorchRec's EBC collectives per step (unweighted).

    Table-wise units and column-wise units U (feature, D_u, rank), each kind its own KJTAllToAll
    and PooledEmbeddingsAllToAll, as comm_volume (a)-(b):
        index   8 W * 3 (splits) + e_l B |U| + e_v L B |U|
        pooled  forward e_o W B sum_{u on rank} D_u,  backward e_o B sum_u D_u
    Row-wise features F_rw (feature, D): a second KJTAllToAll of bucketised ids, then
    TorchRec's reduce-scatter of the partial sums forward and all-gather backward:
        index   8 W * 3 + e_l W B |F_rw| + e_v L B |F_rw|
        reduce-scatter forward e_o W B sum D,   all-gather backward e_o B sum D
    Nothing at W = 1.
    """
    keys = ("index_all_to_all", "pooled_all_to_all_forward", "pooled_all_to_all_backward",
            "pooled_reduce_scatter_forward", "pooled_all_gather_backward")
    out = dict.fromkeys(keys, 0)
    if world_size == 1:
        return out
    w, m = world_size, len(row_wise)
    for group in (g for g in (units, column_wise) if g):
        n = len(group)
        out["index_all_to_all"] += 8 * w * 3 + lengths_bytes * batch * n + values_bytes * pooling * batch * n
        out["pooled_all_to_all_forward"] += emb_bytes * w * batch * sum(d for _, d, r in group if r == rank)
        out["pooled_all_to_all_backward"] += emb_bytes * batch * sum(d for _, d, _ in group)
    if row_wise:
        out["index_all_to_all"] += 8 * w * 3 + lengths_bytes * w * batch * m + values_bytes * pooling * batch * m
        out["pooled_reduce_scatter_forward"] = emb_bytes * w * batch * sum(d for _, d in row_wise)
        out["pooled_all_gather_backward"] = emb_bytes * batch * sum(d for _, d in row_wise)
    return out


def collective_bytes(spec: ModelSpec, plan: Plan, rank: int, batch: int, layout: Optional[tuple] = None
                     ) -> dict[str, float]:
    """Per-step bytes rank ``rank`` hands to each collective (flat keys, as ``counted_bytes``).
    ``layout``: ``comm_volume.plan_layout`` of the TT tables, when the caller has it."""
    from ttdist.tools.comm_volume import comm_volume

    w = plan.world_size
    out: dict[str, float] = {}
    if spec.tt_configs:
        v = comm_volume((spec.tt_configs, plan.tt), batch, 1.0, world_size=w, rank=rank,
                        dense_bytes=spec.dense_param_bytes, layout=layout)
        for g in GROUPS:
            out[f"tt.index_all_to_all.{g}"] = v["index_all_to_all"][g]["total"]
            out[f"tt.pooled_all_to_all_forward.{g}"] = v["pooled_all_to_all_forward"][g]
            out[f"tt.pooled_all_to_all_backward.{g}"] = v["pooled_all_to_all_backward"][g]
        out["tt.replicated_grad_all_reduce"] = v["replicated_grad_all_reduce"]
        out["tt.input_check_all_reduce"] = v["input_check_all_reduce"]
    e = torchrec_ebc_volume(plan.eb_units, w, rank, batch, plan.eb_row_wise, plan.eb_column_wise)
    for k, b in e.items():
        out[f"ebc.{k}"] = b
    out["ddp_all_reduce"] = spec.dense_param_bytes
    # TorchRec wraps the data-parallel tables' lookup in a DDP of its own, which all-reduces at
    # W = 1 too (as the MLPs' DDP does)
    out["ebc.data_parallel_grad_all_reduce"] = 4 * sum(d * n for _, d, n in plan.eb_data_parallel)
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
        elif kind == "ebc_dp_all_reduce":
            add("ebc.data_parallel_grad_all_reduce", b)
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


def tt_table_shards(config, plan: Plan) -> list:
    """The shards (``shard_layout.table_shards``) of TT table ``config`` under ``plan``."""
    from ttdist.distributed.shard_layout import table_shards

    ps = plan.tt[config.name]
    spec_ranks = ([s.placement.rank() for s in ps.sharding_spec.shards]
                  if ps.sharding_spec is not None and ps.sharding_type == "column_wise" else None)
    return table_shards(config.name, config.tt_shape(), ps.sharding_type, ps.ranks or [], plan.world_size, spec_ranks)


def tt_lookup_seconds(spec: ModelSpec, plan: Plan, batch: int, calibration: TTKernelCalibration
                      ) -> tuple[list[float], list[float]]:
    """(forward, backward) seconds of each rank's TT lookups per step: the kernel cost model
    (``TTCostModel.shard_costs``) of every shard on its rank, the ids uniform over rows."""
    from ttdist.distributed.tt_costs import TTCostModel

    model = TTCostModel(calibration)
    fwd, bwd = [0.0] * plan.world_size, [0.0] * plan.world_size
    for c in spec.tt_configs:
        for cost in model.shard_costs(c.tt_shape(), plan.tt[c.name].sharding_type, tt_table_shards(c, plan), batch,
                                      len(c.feature_names), plan.world_size):
            fwd[cost.rank] += cost.fwd_seconds
            bwd[cost.rank] += cost.bwd_seconds
    return fwd, bwd


def ids_per_rank(spec: ModelSpec, plan: Plan, batch: int) -> tuple[list[float], list[float]]:
    """(TT ids, TorchRec ids) each rank looks up per step (module docstring, uniform rows)."""
    w = plan.world_size
    tt, eb = [0.0] * w, [0.0] * w
    for c in spec.tt_configs:
        ps = plan.tt[c.name]
        shape = c.tt_shape()
        nf = len(c.feature_names)
        shards = tt_table_shards(c, plan)
        if ps.sharding_type == "row_wise":
            for s in shards:
                tt[s.rank] += nf * w * batch * s.local_shape(shape).num_embeddings / c.num_embeddings
        elif ps.sharding_type == "data_parallel":
            for r in range(w):
                tt[r] += nf * batch
        else:
            for s in shards:
                tt[s.rank] += nf * w * batch
    for _, _, r in plan.eb_units + plan.eb_column_wise:
        eb[r] += w * batch
    for r in range(w):
        eb[r] += (len(plan.eb_row_wise) + sum(nf for nf, _, _ in plan.eb_data_parallel)) * batch
    return tt, eb


def step_time(profile: Profile, spec: ModelSpec, plan: Plan, batch: int, links: Cluster | FittedLinks,
              cores: Optional[int] = None, calls: Optional[Mapping[str, int]] = None) -> dict:
    """Predicted step time and its pieces (module docstring). ``cores``: CPU cores the W ranks
    share (None: one device each). ``calls``: collective calls per step (default: ttdist's)."""
    from ttdist.distributed.planner import INDEX_ALL_TO_ALL_CALLS
    from ttdist.tools.comm_volume import plan_layout

    w = plan.world_size
    p = profile
    tt_ids, eb_ids = ids_per_rank(spec, plan, batch)
    tt_fwd, tt_bwd = (tt_lookup_seconds(spec, plan, batch, p.tt_kernel) if p.tt_kernel else
                      ([p.tt_fwd_s_per_id * x for x in tt_ids], [p.tt_bwd_s_per_id * x for x in tt_ids]))
    f_tt = sum(len(c.feature_names) for c in spec.tt_configs)
    f_eb = sum(len(c.feature_names) for c in spec.eb_configs)
    replicas = replicated_core_elements(spec, plan)
    dp_elements = sum(d * n for _, d, n in plan.eb_data_parallel)

    def piece(per_rank: Sequence[float]) -> float:
        worst = max(per_rank)
        return max(worst, sum(per_rank) / cores) if cores else worst

    def uniform(x: float) -> float:
        return piece([x] * w)

    layout = plan_layout(spec.tt_configs, plan.tt, w) if spec.tt_configs else None
    per_rank_bytes = [collective_bytes(spec, plan, r, batch, layout) for r in range(w)]
    byts = {k: max(b[k] for b in per_rank_bytes) for k in per_rank_bytes[0]}
    tt_groups = {("row_wise" if ps.sharding_type == "row_wise" else "table_column_wise")
                 for ps in plan.tt.values() if ps.sharding_type != "data_parallel"}
    eb_groups = plan.eb_groups()
    default_calls = {"tt_index": INDEX_ALL_TO_ALL_CALLS * len(tt_groups), "tt_pooled": len(tt_groups),
                     "tt_check": int(byts.get("tt.input_check_all_reduce", 0) > 0),
                     "tt_replica": int(byts.get("tt.replicated_grad_all_reduce", 0) > 0),
                     "eb_index": INDEX_ALL_TO_ALL_CALLS * len(eb_groups), "eb_pooled": len(set(eb_groups) - {"row_wise"}),
                     "eb_row_wise": int("row_wise" in eb_groups), "flag": int(w > 1),
                     "ddp": max(1, math.ceil(spec.dense_param_bytes / 25e6)),
                     "eb_dp": math.ceil(byts["ebc.data_parallel_grad_all_reduce"] / 25e6)}
    n = {**default_calls, **(calls or {})}

    def tt_sum(prefix: str) -> float:
        return sum(byts.get(f"{prefix}.{g}", 0) for g in GROUPS)

    a2a = lambda b, c: all_to_all_time(b, c, w, links)  # noqa: E731
    ar = lambda b, c: all_reduce_time(b, c, w, links)  # noqa: E731

    def host(nbytes: float, steps: int) -> float:
        """Host work of ``steps`` communicating dist steps handing ``nbytes`` to their collectives,
        beyond the collectives (fitted links only; 0 at W = 1, where no dist step communicates)."""
        if w == 1 or not isinstance(links, FittedLinks):
            return 0.0
        return steps * links.dist_host_s_per_step + nbytes * links.dist_host_s_per_byte

    n_tt, n_eb = len(tt_groups), len(eb_groups)
    parts = {
        "input_a2a": uniform(p.tt_prep_s_per_id * batch * f_tt) + uniform(p.ebc_prep_s_per_id * batch * f_eb)
        + a2a(tt_sum("tt.index_all_to_all"), n["tt_index"])
        + ar(byts.get("tt.input_check_all_reduce", 0), n["tt_check"] * (w > 1))
        + a2a(byts["ebc.index_all_to_all"], n["eb_index"])
        + host(tt_sum("tt.index_all_to_all"), n_tt) + host(byts["ebc.index_all_to_all"], n_eb),
        # the TT and TorchRec lookups of a rank run back to back, no collective between them
        "lookup_fwd": piece([x + p.ebc_fwd_s_per_id * y for x, y in zip(tt_fwd, eb_ids)]),
        # TorchRec's row-wise reduce-scatter moves (W-1)/W of its input over a ring, as an all-to-all
        "output_a2a_fwd": a2a(tt_sum("tt.pooled_all_to_all_forward"), n["tt_pooled"])
        + a2a(byts["ebc.pooled_all_to_all_forward"], n["eb_pooled"])
        + a2a(byts["ebc.pooled_reduce_scatter_forward"], n["eb_row_wise"])
        + host(tt_sum("tt.pooled_all_to_all_forward"), n_tt)
        + host(byts["ebc.pooled_all_to_all_forward"] + byts["ebc.pooled_reduce_scatter_forward"], n_eb),
        "emb_glue": uniform(p.glue_s_per_sample * batch),
        "dense_fwd": uniform(p.dense_fwd_s_per_sample * batch),
        "dense_bwd": uniform(p.dense_bwd_s_per_sample * batch),
        # ... and its all-gather (W-1)/W of its W-times-larger output
        "output_a2a_bwd": a2a(tt_sum("tt.pooled_all_to_all_backward"), n["tt_pooled"])
        + a2a(byts["ebc.pooled_all_to_all_backward"], n["eb_pooled"])
        + a2a(w * byts["ebc.pooled_all_gather_backward"], n["eb_row_wise"])
        + host(tt_sum("tt.pooled_all_to_all_backward"), n_tt)
        + host(byts["ebc.pooled_all_to_all_backward"] + w * byts["ebc.pooled_all_gather_backward"], n_eb),
        "lookup_bwd_update": piece([x + p.ebc_bwd_s_per_id * y for x, y in zip(tt_bwd, eb_ids)])
        + uniform(p.tt_replica_s_per_element * replicas),
        "allreduce": ar(byts.get("tt.replicated_grad_all_reduce", 0), n["tt_replica"])
        + ar(byts["ddp_all_reduce"], n["ddp"]) + ar(byts["ebc.data_parallel_grad_all_reduce"], n["eb_dp"]),
        # data-parallel TorchRec tables: the fused tables' update on whole tables (TableOptimizer)
        "dense_optimizer": uniform(p.optimizer_s_per_step + p.tt_replica_s_per_element * dp_elements),
        "other": uniform(p.other_s_per_step) + ar(16 * w, n["flag"]),
    }
    return {"step_time_s": sum(parts.values()), "breakdown_s": parts, "max_rank_bytes": byts,
            "tt_ids_per_rank_max": max(tt_ids), "ebc_ids_per_rank_max": max(eb_ids),
            "replicated_core_elements": replicas}


def weak_scaling(profile: Profile, spec: ModelSpec, batch: int, plans: Mapping[int, Plan], links: Cluster) -> list[dict]:
    """Predicted step time and efficiency T(1)/T(W) at fixed ``batch`` per rank, one point per
    plan of ``plans`` ({W: Plan}, which must hold W = 1)."""
    if 1 not in plans:
        raise ValueError("weak_scaling needs the 1-rank plan (its step time is the efficiency's reference)")
    t1 = step_time(profile, spec, plans[1], batch, links)["step_time_s"]
    out = []
    for w in sorted(plans):
        r = step_time(profile, spec, plans[w], batch, links)
        out.append({"world_size": w, "step_time_s": r["step_time_s"], "efficiency": t1 / r["step_time_s"],
                    "samples_per_s": w * batch / r["step_time_s"], "breakdown_s": r["breakdown_s"],
                    "tt_ids_per_rank_max": r["tt_ids_per_rank_max"], "plan": plans[w].sharding_counts()})
    return out


# ---------------------------------------------------------------------------------------------
# Validation against benchmarks/scaling.py and predictions at GPU scale
# ---------------------------------------------------------------------------------------------


def _config_of(setup: Mapping[str, Any], extra: Sequence[str] = ()):
    from ttdist.config import load_config

    return load_config(setup["config"], list(setup["overrides"]) + list(extra))


def fit_calls_bytes(calls: Sequence[float], nbytes: Sequence[float], seconds: Sequence[float]) -> tuple[float, float]:
    """Least squares t = calls * alpha + bytes / beta with alpha, 1/beta >= 0: (alpha, beta)."""
    sxx = sum(c * c for c in calls)
    syy = sum(b * b for b in nbytes)
    sxy = sum(c * b for c, b in zip(calls, nbytes))
    sxt = sum(c * t for c, t in zip(calls, seconds))
    syt = sum(b * t for b, t in zip(nbytes, seconds))
    det = sxx * syy - sxy * sxy
    collinear = abs(det) <= 1e-9 * sxx * syy  # one point, or bytes in proportion to calls
    alpha, slope = ((sxt * syy - syt * sxy) / det, (syt * sxx - sxt * sxy) / det) if not collinear else (-1.0, -1.0)
    if alpha < 0 or slope < 0:  # the better one-term fit on the boundary
        fits = [(sxt / sxx if sxx else 0.0, 0.0), (0.0, syt / syy if syy else 0.0)]
        alpha, slope = min(fits, key=lambda f: sum((t - f[0] * c - f[1] * b) ** 2
                                                   for c, b, t in zip(calls, nbytes, seconds)))
    return max(alpha, 0.0), 1.0 / max(slope, 1e-15)


IN_STEP_KINDS = {"all_to_all_single": "all_to_all_single", "all_reduce": "all_reduce", "ddp_all_reduce": "all_reduce"}


def in_step_links(entries: Sequence[Mapping[str, Any]]) -> FittedLinks:
    """alpha/beta per kind fitted to the collectives timed inside these entries' training steps.

    One point per collective record (calls and bytes per step, the largest bytes over the ranks
    as S): its time on the rank that spent the least in it — the last to arrive waits least, so
    that time is the collective's own cost, not another rank's lateness (which the model puts in
    the compute pieces' max over ranks)."""
    points: dict[str, list[tuple[float, float, float]]] = {"all_to_all_single": [], "all_reduce": []}
    for e in entries:
        summaries = e["rank_summaries"]
        for key in summaries[0]["collectives"]:
            kind = IN_STEP_KINDS.get(key.split("|")[1])
            records = [s["collectives"][key] for s in summaries if key in s["collectives"]]
            if kind is None or len(records) != len(summaries):
                continue
            points[kind].append((records[0]["calls"], max(r["bytes"] for r in records),
                                 min(r["seconds"] for r in records)))
    if not points["all_to_all_single"] or not points["all_reduce"]:
        raise ValueError("in_step_links needs entries with both all-to-alls and all-reduces in their steps (W > 1)")
    (a2a_alpha, a2a_beta), (ar_alpha, ar_beta) = (fit_calls_bytes(*zip(*points[k]))
                                                  for k in ("all_to_all_single", "all_reduce"))
    return FittedLinks(a2a_alpha, a2a_beta, ar_alpha, ar_beta)


# Pieces whose work does not depend on where the embedding tables live (same MLPs, interaction
# and loss on the same B samples per rank, whatever the placement): the model predicts them equal
# for every placement of one (mode, W); a measured one far from the other placements' is a
# disturbed measurement (a shared machine), not a cost of that placement.
PLACEMENT_INDEPENDENT = ("dense_fwd", "dense_bwd")
DISTURBED_RATIO = 1.4


def placement_independent_check(entry: Mapping[str, Any], entries: Sequence[Mapping[str, Any]],
                                ratio: float = DISTURBED_RATIO) -> dict:
    """Per PLACEMENT_INDEPENDENT piece of ``entry``: its measured time (rank mean), the median of
    the other placements' entries of the same mode and W, and their ratio; ``disturbed`` names
    the pieces more than ``ratio`` times that median. Empty when no other placement ran."""
    others = [o for o in entries if o["world_size"] == entry["world_size"] and o["mode"] == entry["mode"]
              and o["placement"] != entry["placement"]]
    if not others:
        return {"pieces": {}, "disturbed": []}
    pieces = {}
    for k in PLACEMENT_INDEPENDENT:
        ref = sorted(o["breakdown_s"][k] for o in others)
        median = (ref[(len(ref) - 1) // 2] + ref[len(ref) // 2]) / 2
        pieces[k] = {"measured_s": entry["breakdown_s"][k], "other_placements_median_s": median,
                     "ratio": entry["breakdown_s"][k] / median}
    return {"pieces": pieces, "disturbed": [k for k, v in pieces.items() if v["ratio"] > ratio]}


# The dist steps' exclusive labels (benchmarks/_common.py): one call each per step.
DIST_STEP_LABELS = ("tt/input_dist@", "tt/output_dist@", "tt/output_a2a_bwd@",
                    "ebc/input_dist", "ebc/output_dist", "ebc/output_a2a_bwd")


def dist_host_points(entry: Mapping[str, Any], one_rank: Optional[Mapping[str, Any]]
                     ) -> list[tuple[float, float, float]]:
    """(steps, bytes, seconds) per communicating dist step of a W > 1 entry: the exclusive (non-
    collective) time of its label, rank mean, minus that label's time in ``one_rank`` (the same
    placement and mode at W = 1, scaled to this batch per rank), which the profile already holds
    as prep / glue; bytes: what the step hands to its collectives (largest over the ranks).

    This is the host work a dist step does only when it communicates: splits, packing the
    buffers, building the received KeyedJaggedTensor, bucketizing ids (row-wise), summing the W
    partial sums (row-wise). Steps without a collective (data-parallel groups) are left out."""
    summaries = entry["rank_summaries"]
    base = {}
    if one_rank is not None:
        s1 = one_rank["rank_summaries"][0]
        base = {k: v * entry["batch_per_rank"] / one_rank["batch_per_rank"] for k, v in s1["labels_s"].items()}
    points = []
    for label in summaries[0]["labels_s"]:
        if not label.startswith(DIST_STEP_LABELS):
            continue
        records = [k for k in summaries[0]["collectives"] if k.split("|")[0] == label]
        if not records:
            continue
        nbytes = max(sum(s["collectives"].get(k, {}).get("bytes", 0) for k in records) for s in summaries)
        seconds = sum(s["labels_s"].get(label, 0.0) for s in summaries) / len(summaries) - base.get(label, 0.0)
        points.append((1.0, float(nbytes), seconds))
    return points


def in_step_dist_host(entries: Sequence[Mapping[str, Any]], all_entries: Sequence[Mapping[str, Any]]
                      ) -> tuple[float, float]:
    """(s per dist step, s per byte) fitted (``fit_calls_bytes``) to ``dist_host_points`` of
    ``entries`` (W > 1), their 1-rank baselines taken from ``all_entries``."""
    points = []
    for e in entries:
        one = next((o for o in all_entries if o["world_size"] == 1 and o["placement"] == e["placement"]
                    and o["mode"] == e["mode"]), None)
        points += dist_host_points(e, one)
    if not points:
        return 0.0, 0.0
    per_step, beta = fit_calls_bytes(*zip(*points))
    return per_step, (1.0 / beta if beta < 1e15 else 0.0)


def colocated_slowdown(entries: Sequence[Mapping[str, Any]], profile: Profile, spec: "ModelSpec",
                       cores: Optional[int]) -> float:
    """Median over ``entries`` (W > 1) of measured / modelled PLACEMENT_INDEPENDENT time (the
    MLPs' forward and backward, the same work in every placement): how much W ranks sharing one
    host's cores, caches and memory bandwidth slow each other's compute beyond the 1-rank
    profile (the model's ``cores`` term already covers W > cores)."""
    ratios = []
    for e in entries:
        plan = Plan.from_summary(spec, e["plan"], e["world_size"])
        modelled = step_time(profile, spec, plan, e["batch_per_rank"], FittedLinks.from_json(e["links"]),
                             cores=cores)["breakdown_s"]
        ratios.append(sum(e["breakdown_s"][k] for k in PLACEMENT_INDEPENDENT)
                      / sum(modelled[k] for k in PLACEMENT_INDEPENDENT))
    return statistics.median(ratios) if ratios else 1.0


def validate(scaling_json: str | Path) -> dict:
    """Predicted vs measured bytes (exact) and step times of every entry of a scaling JSON.

    Bytes: ``collective_bytes`` from the entry's plan, per rank, vs the counted bytes.
    Times: ``step_time`` with the profile pooled over the JSON's 1-rank entries of the same mode
    (every placement), the cores shared by the ranks, and two link models: ``in_step_links`` fitted on the
    OTHER placements' entries at the same W (leave-one-placement-out: the predicted plan's own
    collectives are never fitted), and the micro-benchmark's fit (reported beside it).
    """
    data = json.loads(Path(scaling_json).read_text())
    setup = data["setup"]
    cores = setup["cpu_cores"] if setup["device"] == "cpu" else None
    spec = ModelSpec.from_config(_config_of(setup))
    entries = data["entries"]
    profiles = {m: Profile.from_scaling(data, spec, m, str(scaling_json)) for m in sorted({e["mode"] for e in entries})}
    rows = []
    for e in sorted(entries, key=lambda e: (e["placement"], e["mode"], e["world_size"])):
        w = e["world_size"]
        plan = Plan.from_summary(spec, e["plan"], w)
        mismatches = []
        for r, counted in enumerate(e["bytes_per_rank"]):
            predicted = collective_bytes(spec, plan, r, e["batch_per_rank"])
            for k in (set(predicted) | set(counted)) - set(NOT_MODELLED):
                c = counted.get(k, {}).get("counted", 0)
                if c != predicted.get(k, 0):
                    mismatches.append({"rank": r, "collective": k, "counted": c, "predicted": predicted.get(k, 0)})
        others = [o for o in entries if o["world_size"] == w and o["placement"] != e["placement"]]
        link_models = {"micro_benchmark": FittedLinks.from_json(e["links"])}
        profile, slowdown = profiles[e["mode"]], 1.0
        if w > 1 and others:
            per_step, per_byte = in_step_dist_host(others, entries)
            link_models["in_step_other_placements"] = dataclasses.replace(
                in_step_links(others), dist_host_s_per_step=per_step, dist_host_s_per_byte=per_byte)
            slowdown = colocated_slowdown([o for o in others if o["mode"] == e["mode"]], profile, spec, cores)
            profile = scaled_profile(profile, 1.0 / slowdown, f"{w} co-located ranks, fitted on the other placements")
        preds = {name: step_time(profile if name != "micro_benchmark" else profiles[e["mode"]], spec, plan,
                                 e["batch_per_rank"], links, cores=cores)
                 for name, links in link_models.items()}
        pred = preds.get("in_step_other_placements", preds["micro_benchmark"])
        rows.append({"placement": e["placement"], "mode": e["mode"], "world_size": w,
                     "plan": plan.sharding_counts(),
                     "measured_step_s": e["step_time_s"], "predicted_step_s": pred["step_time_s"],
                     "relative_error": pred["step_time_s"] / e["step_time_s"] - 1,
                     "predicted_step_s_by_links": {k: v["step_time_s"] for k, v in preds.items()},
                     "links": {k: asdict(v) for k, v in link_models.items()},
                     "colocated_compute_slowdown": slowdown,
                     "repeat_step_times_s": e.get("repeat_step_times_s"),
                     "measured_breakdown_s": e["breakdown_s"], "predicted_breakdown_s": pred["breakdown_s"],
                     "bytes_equal": not mismatches, "byte_mismatches": mismatches,
                     "placement_independent": placement_independent_check(e, entries)})
    at_2 = {f"{r['placement']} {r['mode']}": abs(r["relative_error"]) for r in rows if r["world_size"] == 2}
    micro_2 = {f"{r['placement']} {r['mode']}": abs(r["predicted_step_s_by_links"]["micro_benchmark"]
                                                    / r["measured_step_s"] - 1) for r in rows if r["world_size"] == 2}
    return {"scaling_json": str(scaling_json), "command": data.get("command"), "rows": rows,
            "bytes_all_equal": all(r["bytes_equal"] for r in rows),
            "abs_relative_error_w2": at_2, "max_abs_relative_error_w2": max(at_2.values(), default=None),
            "abs_relative_error_w2_micro_benchmark_links": micro_2,
            "disturbed_measurements": [f"{r['placement']} {r['mode']} W={r['world_size']}: {k} "
                                       f"{r['placement_independent']['pieces'][k]['ratio']:.2f}x the other placements'"
                                       for r in rows for k in r["placement_independent"]["disturbed"]],
            "profiles": {m: asdict(p) for m, p in profiles.items()},
            "note": ("Profile: pooled over the 1-rank entries of the same mode (all placements), so the 1-rank rows "
                     "are nearly in-sample. W > 1: links = alpha/beta per kind fitted to the collectives timed inside "
                     "the steps of the OTHER placements at the same W (per record the time of the rank that waited "
                     "least), so a row's own collectives are never fitted; the micro-benchmark's fit is reported "
                     "beside it (predicted_step_s_by_links), without the dist-step host term. The dist steps' host "
                     "work beyond W = 1 (per step and per byte) is fitted the same way, on the OTHER placements' "
                     "exclusive dist-step times (links.in_step_other_placements.dist_host_*). Every compute time of "
                     "the profile is multiplied by colocated_compute_slowdown: measured / modelled MLP forward + "
                     "backward (the same work in every placement) of the OTHER placements at the same W and mode, "
                     "median (ranks sharing the host slow each other's compute). "
                     "disturbed_measurements: entries whose placement-independent dense work is > "
                     f"{DISTURBED_RATIO:g}x the other placements' median (a disturbed run; the error still counts). "
                     "Entries: each (placement, mode, W)'s fastest of the scaling run's interleaved repeats."),
            "load_average": [setup.get("load_average_before"), setup.get("load_average_after")]}


def print_validation(v: dict) -> None:
    print(f"validation against {v['scaling_json']} (load average before/after the run: {v['load_average']})")
    print(f"{'placement':<10}{'mode':<8}{'W':>3}{'measured ms':>13}{'predicted ms':>14}{'error':>9}"
          f"{'bytes equal':>13}  TT plan")
    for r in v["rows"]:
        print(f"{r['placement']:<10}{r['mode']:<8}{r['world_size']:>3}{r['measured_step_s'] * 1e3:>13.1f}"
              f"{r['predicted_step_s'] * 1e3:>14.1f}{r['relative_error'] * 100:>8.1f}%"
              f"{str(r['bytes_equal']):>13}  {r['plan']['tt']}")
    if v["max_abs_relative_error_w2"] is not None:
        print(f"step time |error| at W = 2: max {v['max_abs_relative_error_w2'] * 100:.1f}% ("
              + ", ".join(f"{k} {e * 100:.1f}%" for k, e in v["abs_relative_error_w2"].items()) + ")")
        print("  with the micro-benchmark's links instead: "
              + ", ".join(f"{k} {e * 100:.1f}%" for k, e in v["abs_relative_error_w2_micro_benchmark_links"].items()))
    for r in v["rows"]:
        check = r.get("placement_independent") or {}
        for k in check.get("disturbed", []):
            c = check["pieces"][k]
            print(f"DISTURBED: {r['placement']} {r['mode']} W={r['world_size']}: {k} measured "
                  f"{c['measured_s'] * 1e3:.1f} ms, {c['ratio']:.2f}x the other placements' median "
                  f"{c['other_placements_median_s'] * 1e3:.1f} ms (placement-independent work: re-measure)")
    print(f"bytes: counted == predicted on every rank of every entry: {v['bytes_all_equal']}")
    print(v["note"])


PLAN_KINDS = ("row_wise", "table_wise", "data_parallel", "planner")


def config_predictions(profile_json: str | Path, batch_per_gpu: int, worlds: Sequence[int], presets: Sequence[str],
                       scale: Optional[float] = None, what_if_speedup: Optional[float] = None) -> dict:
    """Weak-scaling predictions of the model a profile JSON ran (its config and overrides), for
    every plan kind of PLAN_KINDS (all TT tables one sharding type, or the planner's plan, planned
    on that preset's links) and every preset cluster; with ``what_if_speedup``, again with every
    compute time divided by it (and the planner's plans planned again with those costs).
    ``planner_plans``: {preset: {W: the planner's sharding counts}}."""
    data = json.loads(Path(profile_json).read_text())
    setup = data["setup"]
    extra = [f"data.cardinality_scale={scale}"] if scale else []
    cfg = _config_of(setup, extra)
    spec = ModelSpec.from_config(cfg)
    profile = Profile.from_scaling(data, spec, "weak", str(profile_json))
    all_worlds = sorted({1, *worlds})

    def plans_at(speedup: float) -> tuple[dict[str, dict[int, Plan]], dict[str, dict[int, Plan]]]:
        """The synthetic kinds' plans, and the planner's per preset, planned on that preset's links
        (``planner_topology``); its W = 1 plan, which depends on no link, once for all presets."""
        synthetic = {kind: {w: Plan.synthetic(spec, w, kind) for w in all_worlds}
                     for kind in PLAN_KINDS if kind != "planner"}
        one = {1: planner_plan(cfg, spec, 1, batch_per_gpu, profile, speedup)}
        planner = {name: one | {w: planner_plan(cfg, spec, w, batch_per_gpu, profile, speedup, PRESETS[name])
                                for w in all_worlds if w != 1} for name in presets}
        return synthetic, planner

    def predictions(prof: Profile, plans: tuple[Mapping[str, Mapping[int, Plan]], Mapping[str, Mapping[int, Plan]]]
                    ) -> dict:
        synthetic, planner = plans
        return {f"{name}/{kind}": weak_scaling(prof, spec, batch_per_gpu,
                                               planner[name] if kind == "planner" else synthetic[kind], PRESETS[name])
                for name in presets for kind in PLAN_KINDS}

    def planner_counts(plans: tuple[Mapping, Mapping[str, Mapping[int, Plan]]]) -> dict:
        return {name: {w: p.sharding_counts() for w, p in per_world.items()} for name, per_world in plans[1].items()}

    plans = plans_at(1.0)

    core_bytes = 4 * sum(c.tt_shape().num_parameters for c in spec.tt_configs)
    out = {"config": setup["config"], "overrides": list(setup["overrides"]) + extra, "profile_json": str(profile_json),
           "profile_setup": {k: setup.get(k) for k in ("device", "batch_per_rank", "steps", "load_average_before",
                                                       "load_average_after")} | {"command": data.get("command")},
           "profile": asdict(profile),
           "model": {"tt_tables": [c.name for c in spec.tt_configs],
                     "tt_shapes": {c.name: {"p": list(c.tt_shape().p), "q": list(c.tt_shape().q),
                                            "ranks": list(c.tt_shape().ranks)} for c in spec.tt_configs},
                     "tt_core_bytes": core_bytes, "torchrec_tables": len(spec.eb_configs),
                     "dense_param_bytes": spec.dense_param_bytes},
           "planner_plans": planner_counts(plans), "predictions": predictions(profile, plans)}
    if what_if_speedup:
        fast, fast_profile = plans_at(what_if_speedup), scaled_profile(profile, what_if_speedup)
        out["what_if"] = {"compute_speedup": what_if_speedup, "profile": asdict(fast_profile),
                          "planner_plans": planner_counts(fast), "predictions": predictions(fast_profile, fast)}
    return out


def predict(profile_jsons: Sequence[str | Path], batch_per_gpu: int, worlds: Sequence[int] = (1, 8, 64, 512),
            presets: Sequence[str] = tuple(PRESETS), scale: Optional[float] = None,
            what_if_speedup: Optional[float] = None) -> dict:
    """``config_predictions`` of every profile JSON (one per model config), with the assumptions."""
    configs = {Path(json.loads(Path(p).read_text())["setup"]["config"]).stem:
               config_predictions(p, batch_per_gpu, worlds, presets, scale, what_if_speedup) for p in profile_jsons}
    assumptions = [
        f"Weak scaling: {batch_per_gpu} samples per GPU at every W; efficiency = T(1)/T(W) of the same plan kind.",
        "Compute: per-id / per-sample / per-element times measured on one CPU rank (1 thread) of each config's model "
        "(profile_json, pooled over its tw/rw/dp 1-rank runs); a TT shard costs what this host's TT kernel cost model "
        "(ttdist.distributed.tt_costs: shared prefixes multiplied out once per batch) gives its ids, scaled to equal "
        "the measured per-id times at the profile's shape (every table whole, its batch per rank); "
        + (f"the what-if divides every one by {what_if_speedup:g} (ASSUMED GPU-speed compute, not measured)."
           if what_if_speedup else "no GPU-speed what-if."),
        "Links: " + "; ".join(f"{n}: intra {c.intra.bandwidth / 1e9:g} GB/s {c.intra.latency * 1e6:g} us, inter "
                              f"{c.inter.bandwidth / 1e9:g} GB/s {c.inter.latency * 1e6:g} us, {c.gpus_per_node} GPU(s) "
                              "per node" for n, c in PRESETS.items() if n in presets) + " (module docstring: sources).",
        "Plans: row_wise / table_wise / data_parallel put every TT table on that sharding type (TorchRec tables "
        "table-wise, least-loaded rank); planner = ttdist.distributed.make_planner with Topology(world_size=W, "
        "compute_device='cuda') on each preset's links (planned per preset: local_world_size = min(W, its GPUs per "
        "node), intra_host_bw / inter_host_bw = its intra- / inter-node bandwidth; at W = 1, where nothing is "
        "communicated, infinite bandwidths, one plan for every preset; otherwise TorchRec's link model for an "
        "all-to-all (one link's bandwidth), the predictions' for a TT all-reduce (intra_host_bw within a node, "
        "min(intra_host_bw, inter_host_bw x local_world_size) across nodes); and every collective "
        "call of the plan's sharding groups, TT and TorchRec, priced at what the predictions charge one all-to-all "
        "call at that W, (W-1) x the per-message latency, the all-reduces too) and the "
        "training's constraints, at the same per-GPU batch, "
        "planning with the compute costs of its prediction set (measured, or the what-if's): its TT kernel costs are "
        "the profile's fitted TT kernel cost model above, divided by the same factor as that set's compute (1, or the "
        "what-if's), and the Topology's hbm_mem_bw is set so that TorchRec's estimator charges a TorchRec table's "
        "lookup the profile's ebc_fwd + ebc_bwd per id divided by that factor (planner_plan, planner_topology).",
        "Ids hash uniformly over rows (row-wise shards get ids in proportion to their rows); 1 id per sample and feature.",
        "No overlap of communication with compute (an upper bound for pipelined training); no stragglers, no link "
        "contention beyond the per-GPU NIC.",
    ]
    return {"batch_per_gpu": batch_per_gpu, "worlds": sorted({1, *worlds}), "what_if_speedup": what_if_speedup,
            "presets": {n: {"intra": asdict(c.intra), "inter": asdict(c.inter), "gpus_per_node": c.gpus_per_node}
                        for n, c in PRESETS.items() if n in presets},
            "assumptions": assumptions, "configs": configs}


def efficiency_table(pred: dict, worlds: Sequence[int] = (64, 512)) -> list[dict]:
    """One row per (config, preset/plan kind): efficiency at ``worlds``, measured and what-if compute."""
    rows = []
    for name, c in pred["configs"].items():
        for key, pts in c["predictions"].items():
            row = {"config": name, "preset/plan": key}
            for w in worlds:
                row[f"E{w}"] = next(p["efficiency"] for p in pts if p["world_size"] == w)
                if "what_if" in c:
                    row[f"E{w}_what_if"] = next(p["efficiency"] for p in c["what_if"]["predictions"][key]
                                                if p["world_size"] == w)
            rows.append(row)
    return rows


def print_predictions(pred: dict) -> None:
    print("assumptions:")
    for a in pred["assumptions"]:
        print(f"  - {a}")
    worlds = pred["worlds"]
    for name, c in pred["configs"].items():
        print(f"\n{name} ({c['config']}; TT cores {c['model']['tt_core_bytes'] / 2**20:.1f} MiB; profile {c['profile_json']})")
        for label, part in (("measured CPU compute", c), (f"what-if compute / {pred['what_if_speedup']:g} (ASSUMED)",
                                                           c.get("what_if"))):
            if not part:
                continue
            preds = part["predictions"]
            print(f"  {label}; the planner's TT plan per preset: " + "; ".join(
                f"{preset}: " + ", ".join(f"W={w}: {p['tt']}" for w, p in plans.items())
                for preset, plans in part["planner_plans"].items()))
            print(f"  {'preset/plan':<26}" + "".join(f"{'W=' + str(w):>22}" for w in worlds))
            for key, pts in preds.items():
                print(f"  {key:<26}" + "".join(f"{p['step_time_s'] * 1e3:>10.2f} ms E={p['efficiency']:<6.3f}" for p in pts))


def plot_predictions(pred: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs, presets = list(pred["configs"]), list(pred["presets"])
    fig, axes = plt.subplots(len(configs), len(presets), figsize=(4 * len(presets), 3.6 * len(configs)),
                             sharey=True, squeeze=False)
    colors = dict(zip(PLAN_KINDS, ("tab:orange", "tab:blue", "tab:green", "tab:red")))
    for i, name in enumerate(configs):
        c = pred["configs"][name]
        for j, preset in enumerate(presets):
            ax = axes[i, j]
            for kind in PLAN_KINDS:
                pts = c["predictions"][f"{preset}/{kind}"]
                ax.plot([p["world_size"] for p in pts], [p["efficiency"] for p in pts], "o-", color=colors[kind],
                        label=f"TT {kind} (CPU compute)")
                if "what_if" in c:
                    pts = c["what_if"]["predictions"][f"{preset}/{kind}"]
                    ax.plot([p["world_size"] for p in pts], [p["efficiency"] for p in pts], "s--", color=colors[kind],
                            alpha=0.6, label=f"TT {kind}, compute / {pred['what_if_speedup']:g} (assumed)")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{name}, {preset}", fontsize=10)
            ax.set_xlabel("GPUs")
            ax.grid(alpha=0.3, which="both")
        axes[i, 0].set_ylabel("predicted weak-scaling efficiency")
    axes[0, 0].legend(fontsize=6)
    fig.suptitle(f"ttdist.tools.perf_model, {pred['batch_per_gpu']} samples/GPU; compute profiles measured on one "
                 "CPU rank", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


DEFAULT_PROFILES = ("benchmarks/results/perf_model_profile_criteo_kaggle.json",
                    "benchmarks/results/perf_model_profile_criteo_terabyte.json")


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m ttdist.tools.perf_model", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--validate", metavar="SCALING_JSON", help="predicted vs measured bytes and step times")
    p.add_argument("--validation-out", default=None, help="write the validation JSON here")
    p.add_argument("--predict", action="store_true", help="weak-scaling predictions at --worlds GPUs")
    p.add_argument("--profile", action="append", default=None,
                   help="a scaling JSON with 1-rank entries of one config's model (repeatable; default: "
                        + ", ".join(DEFAULT_PROFILES) + ")")
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
    v = None
    if args.validate:
        v = validate(args.validate)
        print_validation(v)
        if args.validation_out:
            Path(args.validation_out).write_text(json.dumps(v, indent=2))
            print(f"wrote {args.validation_out}")
    if args.predict:
        pred = predict(args.profile or DEFAULT_PROFILES, args.batch_per_gpu, [int(x) for x in args.worlds.split(",")],
                       scale=args.scale, what_if_speedup=args.what_if_speedup)
        pred["efficiency"] = efficiency_table(pred)
        if v is not None:
            pred["validation"] = {k: v[k] for k in ("scaling_json", "bytes_all_equal", "abs_relative_error_w2",
                                                    "max_abs_relative_error_w2", "disturbed_measurements",
                                                    "load_average")}
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(pred, indent=2))
        png = out.with_suffix(".png")
        plot_predictions(pred, png)
        print_predictions(pred)
        print(f"wrote {out} and {png}")


if __name__ == "__main__":
    main()
