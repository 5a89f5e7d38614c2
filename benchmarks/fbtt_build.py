"""FBTT-Embedding (facebookresearch/FBTT-Embedding), built against the installed torch, as a baseline.

FBTT's source is not part of ttdist: put a checkout in third_party/FBTT-Embedding (git-ignored),
  git clone https://github.com/facebookresearch/FBTT-Embedding third_party/FBTT-Embedding
and the CUDA benchmarks build and time it beside ttdist. Imports no ttdist (builds in parallel
with ttdist's own extension).

  python benchmarks/fbtt_build.py     # build only (build/fbtt), prints the module path
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parent.parent
DEFAULT_FBTT = REPO / "third_party" / "FBTT-Embedding"
FBTT_FILES = ("tt_embeddings.cpp", "tt_embeddings_cuda.cu", "tt_cuda_utils.cuh", "hashtbl_cuda_utils.cuh",
              "tt_embeddings_ops.py")


def load_fbtt(source: Path, build_dir: Path) -> ModuleType:
    """FBTT-Embedding's ``tt_embeddings_ops`` module, its CUDA extension JIT-built from ``source``.

    FBTT predates torch 2 and CUDA 12: in a copy under ``build_dir`` its include of the removed
    THC headers becomes ATen's equivalent, and its CUB calls lose the ``debug_synchronous``
    argument that CUB no longer takes; the sources are otherwise FBTT's own.
    """
    import torch
    from torch.utils.cpp_extension import load

    src = build_dir / "src"
    src.mkdir(parents=True, exist_ok=True)
    for name in FBTT_FILES:
        text = (source / name).read_text()
        text = text.replace("#include <THC/THCAtomics.cuh>", "#include <ATen/cuda/Atomic.cuh>")
        text = re.sub(r"(getCurrentCUDAStream\(\)),\s*false\)\)", r"\1))", text)
        if not (src / name).exists() or (src / name).read_text() != text:
            (src / name).write_text(text)
    major, minor = torch.cuda.get_device_capability()
    module = load(name="tt_embeddings", sources=[str(src / "tt_embeddings.cpp"), str(src / "tt_embeddings_cuda.cu")],
                  build_directory=str(build_dir), extra_cflags=["-O3"],
                  extra_cuda_cflags=["-O3", "--expt-relaxed-constexpr", "-D__CUDA_NO_HALF_OPERATORS__",
                                     f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}"],
                  verbose=False)
    sys.modules["tt_embeddings"] = module
    sys.path.insert(0, str(src))
    import tt_embeddings_ops

    return tt_embeddings_ops


if __name__ == "__main__":
    print(load_fbtt(DEFAULT_FBTT, REPO / "build" / "fbtt").__file__)
