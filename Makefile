# segops developer entry points. `make test` and `make demo` work on a fresh machine from a clean clone:
# they create .venv (installing torch==2.13.0, the CPU wheel, when the venv has no torch), build, run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0
export MAX_JOBS ?= 2
SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh') setup.py
PYTEST_ARGS ?=
# Test and benchmark peers: scikit-image ships the real photos (astronaut, coffee) the lattice tests and benchmarks
# use; pydensecrf2 is the dense-CRF inference reference; torchmetrics holds the mIoU definitions. `make test`
# requires them (SEGOPS_TEST_REQUIRE_OPTIONAL=1); a bare `pytest` without them skips those tests with a reason.
TEST_DEPS := pytest hypothesis expecttest numpy pillow tqdm pyyaml scikit-image pydensecrf2 torchmetrics

.PHONY: venv build test fuzz demo bench info clean sanitize tsan scale docs

# Depends on this Makefile so that a change of TEST_DEPS reaches existing venvs.
$(VENV)/.deps: Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q ninja setuptools wheel $(TEST_DEPS)
	touch $@

venv: $(VENV)/.deps

# The extension is compiled once, in place, by build_ext --inplace with ninja (later builds recompile only the
# changed sources). The editable install only registers the package and the `segops` command:
# SEGOPS_NO_BUILD_EXT=1 keeps it from compiling everything a second time in a throw-away folder.
$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PY) setup.py -q build_ext --inplace
	touch $@

$(VENV)/.installed: $(VENV)/.deps pyproject.toml
	SEGOPS_NO_BUILD_EXT=1 $(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(VENV)/.built $(VENV)/.installed

test: build
	SEGOPS_TEST_REQUIRE_OPTIONAL=1 $(PY) -m pytest -q $(PYTEST_ARGS) tests

# Fuzz the public API (tests/test_fuzz.py) with the "fuzz" hypothesis profile: 3000 examples per test, or
# FUZZ_EXAMPLES per test when given (`make fuzz FUZZ_EXAMPLES=500`); prints per-test statistics.
FUZZ_EXAMPLES ?=
fuzz: build
	SEGOPS_HYPOTHESIS_PROFILE=fuzz SEGOPS_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) \
	  $(PY) -m pytest -q $(PYTEST_ARGS) --hypothesis-show-statistics tests/test_fuzz.py

demo: build
	$(VENV)/bin/segops demo

bench: build
	$(VENV)/bin/segops bench losses

info: build
	$(VENV)/bin/segops info

sanitize: venv
	bash scripts/sanitize.sh

# ThreadSanitizer over the OpenMP lattice construction (2 threads), in a staged tree (README, "Thread safety").
tsan: venv
	bash scripts/tsan.sh --selftest

# The losses at 4096 x 4096 on the CPU: time, peak RSS, lattice size, crop checks (README, "Scale").
SCALE_ARGS ?=
scale: build
	$(PY) scripts/scale_check.py $(SCALE_ARGS)

# The documentation site (mkdocs + material + mkdocstrings), strict: a warning fails the build. Output: build/site.
DOCS_DEPS := mkdocs==1.6.1 mkdocs-material==9.8.2 mkdocstrings==1.0.8 mkdocstrings-python==2.0.11
$(VENV)/.docs-deps: $(VENV)/.deps
	$(PIP) install -q $(DOCS_DEPS)
	touch $@

docs: $(VENV)/.docs-deps
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

clean:
	rm -rf build dist *.egg-info segops/_C*.so $(VENV)/.built $(VENV)/.installed
