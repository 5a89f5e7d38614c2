"""The host emulator of the CUDA kernels catches warp-level bugs (issue 14): a warp shuffle over a
partial warp, and non-atomic updates of one address by several threads. Two mutations of the real
kernels that used to pass all its checks must now fail them; the real kernels pass (.ci/compile_cuda.sh
runs the full emulator in `make test`). So must two mutations of the saved preparation (tt_prepare):
a length that no longer tells other calls apart, and an op that writes into the saved buffer."""
from __future__ import annotations

import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)
SAVED_INDEX = "    pr->index = index_view(const_cast<int64_t*>(in.prepared), N);  // read only from here on\n"
TAGGED_LENGTH = "return index_words(pb.N) + static_cast<int64_t>(h % static_cast<uint64_t>(kPreparedTagRange));"
MUTATIONS = {  # name: (file in csrc/cuda, original, mutated, what the emulator reports)
    # prefix_grads: only the active items loop, so the shuffles of group_sum run on a partial warp
    "partial_warp": ("tt_device.cuh", "const int padded = (total + kWarp - 1) / kWarp * kWarp;",
                     "const int padded = total;", "a warp shuffle over a partial warp"),
    # group_sum: every lane adds the group's total, non-atomically, to the same place
    "every_lane_leader": ("tt_device.cuh", "*leader = (tid % parts) == 0;", "*leader = true;",
                          "update one address without atomics in one phase"),
    # prepared_words: no tag, so only N tells calls apart
    "untagged_preparation": ("tt_driver.cuh", TAGGED_LENGTH, "return index_words(pb.N);",
                             "a mismatched preparation was accepted"),
    # an op given a preparation overwrites a word of it
    "op_writes_preparation": ("tt_driver.cuh", SAVED_INDEX,
                              SAVED_INDEX + "    if (N > 1) ex.zero(pr->index.order, 8);\n",
                              "wrote into the saved preparation"),
}


def build_and_run(root: Path, name: str) -> subprocess.CompletedProcess:
    """Builds the mutated emulator and runs it until the check that must catch the mutation fails."""
    binary = root / "emulate"
    subprocess.run([NVCC, "-std=c++17", "-O0", "-o", str(binary), str(root / "tests/gpu/emulate_kernels.cu")],
                   check=True, capture_output=True, text=True, timeout=600)
    return subprocess.run([str(binary), "1", "4"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TTDIST_EMULATE_STOP_AT": MUTATIONS[name][3]})


@pytest.mark.slow
@pytest.mark.skipif(NVCC is None, reason="needs nvcc")
def test_emulator_fails_the_warp_and_preparation_mutations(tmp_path):
    roots = {}
    for name, (file, original, mutated, _) in MUTATIONS.items():
        root = tmp_path / name
        shutil.copytree(REPO / "csrc/cuda", root / "csrc/cuda")
        (root / "tests/gpu").mkdir(parents=True)
        shutil.copy(REPO / "tests/gpu/emulate_kernels.cu", root / "tests/gpu")
        source = root / "csrc/cuda" / file
        text = source.read_text()
        assert text.count(original) == 1, f"the code the mutation {name} changes moved: update this test"
        source.write_text(text.replace(original, mutated))
        roots[name] = root
    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(roots, pool.map(lambda kv: build_and_run(kv[1], kv[0]), roots.items())))
    for name, proc in results.items():
        assert proc.returncode != 0, f"mutation {name} passed the emulator:\n{proc.stdout[-1000:]}"
        assert MUTATIONS[name][3] in proc.stderr, f"mutation {name}: {proc.stderr[-2000:]}"
