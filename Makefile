# The two commands of the README: `make demo` and `make test`. Each creates ./.venv and builds
# the op library when missing, so each works alone on a fresh machine. Where `nvidia-smi -L`
# lists GPUs they install the CUDA stack (requirements-cuda.txt) and the demo runs one NCCL rank
# per GPU; elsewhere the CPU stack and 2 gloo ranks.
PY      := .venv/bin/python
GPUS    := $(shell nvidia-smi -L 2>/dev/null | grep -c '^GPU ')
STACK   := $(if $(filter-out 0,$(GPUS)),cuda,cpu)
RANKS   := $(if $(filter-out 0,$(GPUS)),$(GPUS),2)
VENV    := .venv/.installed-$(STACK)
SOURCES := setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.cu csrc/*/*.h csrc/*/*.cuh csrc/*/*.inc)

.PHONY: demo test test-fast bench build compile-cuda gpu-check clean

$(VENV): requirements.txt requirements-$(STACK).txt
	python3 -m venv .venv
	rm -f .venv/.installed-*
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-$(STACK).txt
	# torchrec's metadata pulls the CUDA fbgemm-gpu; the stack above already has its fbgemm.
	$(PY) -m pip install -q --no-deps torchrec==1.8.0
	# Make the repository importable from every process (torchrun workers included).
	echo "$(CURDIR)" > $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/ttdist-repo.pth
	touch $@

build/.ext-stamp: $(VENV) $(SOURCES)
	$(PY) setup.py -q build_ext --inplace
	mkdir -p build && touch $@

build: build/.ext-stamp

demo: build
	bash launch/local.sh $(RANKS) configs/demo.yaml
	@$(PY) -c "import json; s = json.load(open('runs/demo/summary.json')); \
	print(f\"demo: eval AUC {s['auc']:.4f}, TT compression {s['compression_ratio']:.1f}x, \
	{s['samples_per_s']:.0f} samples/s on {s['world_size']} ranks\")"

test: build compile-cuda
	$(PY) -m pytest -q tests

test-fast: build
	$(PY) -m pytest -q -m "not slow" tests

bench: build
	$(PY) benchmarks/run_all.py --quick

compile-cuda:
	bash .ci/compile_cuda.sh

# Every GPU check in one command (benchmarks/gpu_check.py). A bare GPU machine has no ./.venv:
# there it runs on the machine's own python3 and torch and builds what it needs itself.
gpu-check:
	$(if $(wildcard $(PY)),$(PY),python3) benchmarks/gpu_check.py

clean:
	rm -rf build ttdist/_C*.so
