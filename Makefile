# Thin wrappers over the `lca` command line (pipeline/cli.py); every target installs what it needs first.
PYTHON   ?= python3
VENV     ?= .venv
LCA      := $(VENV)/bin/lca
WORKFLOW ?= workflows/digits-fc.toml
STORE    ?= runs/$(basename $(notdir $(WORKFLOW))).zarr
OUT      ?= reports/$(basename $(notdir $(STORE)))
DATA_DIR ?= data
WORKERS  ?=
SCHEDULER ?=
DASHBOARD ?=
NAME     ?=
BENCH_ARGS ?=
PYTEST_ARGS ?=

.PHONY: install data train lca report bench test test-browser clean interventions

install: $(VENV)/.installed

# torch 2.13.0's CPU build is on disk on CPU machines; installing it first keeps pip from fetching a CUDA build.
$(VENV)/.installed: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(VENV)/bin/python -m pip install -q torch==2.13.0; fi
	$(VENV)/bin/python -m pip install -q -e '.[test,bench,lightning,hf]'
	touch $@

data: install $(DATA_DIR)/fashion-mnist/.complete

$(DATA_DIR)/fashion-mnist/.complete:
	$(LCA) data fashion-mnist --dest $(DATA_DIR)/fashion-mnist

train: install
	$(LCA) train $(WORKFLOW) --store $(STORE)

lca: install
	$(LCA) run $(WORKFLOW) --store $(STORE) $(if $(WORKERS),--workers $(WORKERS)) $(if $(SCHEDULER),--scheduler $(SCHEDULER)) $(if $(DASHBOARD),--dashboard-address $(DASHBOARD)) $(if $(NAME),--name $(NAME))

report: install
	$(LCA) report $(STORE) --out $(OUT)

bench: install
	$(LCA) bench $(BENCH_ARGS)

# The README's interventions table (issue 12): digits-fc as recorded, with its last layer frozen from step 100,
# with its last layer at momentum 0.5, and with the IV_TOP units its LCA ranks as IV_SELECT frozen from step 0
# (`lca guide`; no digits-fc unit hurts in total, so the default is the moving units that did least); all
# from one seed and minibatch order. Existing stores are reused (resumed), so a rerun only redoes what is missing.
IV_DIR ?= runs/interventions
IV_OUT ?= docs/results/interventions
IV_WORKERS ?= 1
IV_TOP ?= 10
IV_SELECT ?= negligible
interventions: install
	$(LCA) run workflows/digits-fc.toml --store $(IV_DIR)/baseline.zarr --workers $(IV_WORKERS)
	$(LCA) run workflows/digits-fc-freeze-last.toml --store $(IV_DIR)/freeze-last.zarr --workers $(IV_WORKERS)
	$(LCA) run workflows/digits-fc-momentum-last.toml --store $(IV_DIR)/momentum-last.zarr --workers $(IV_WORKERS)
	test -e $(IV_DIR)/guided.zarr || $(LCA) guide $(IV_DIR)/baseline.zarr --out $(IV_DIR)/guided.zarr \
		--select $(IV_SELECT) --top $(IV_TOP) --workflow-out $(IV_DIR)/guided.toml
	$(LCA) compute $(IV_DIR)/guided.zarr --workers $(IV_WORKERS)
	$(LCA) compare $(IV_DIR)/baseline.zarr $(IV_DIR)/freeze-last.zarr $(IV_DIR)/momentum-last.zarr \
		$(IV_DIR)/guided.zarr --label baseline --label "last layer frozen from step 100" \
		--label "last layer at momentum 0.5" --label "LCA-guided: $(IV_TOP) $(IV_SELECT) units frozen" --out $(IV_OUT)
	$(LCA) report $(IV_DIR)/baseline.zarr --out $(IV_OUT)/baseline-report

test: install data
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

# The HTML report in a real headless browser. Not part of `make test`: installing Debian's chromium took
# 73 s (apt-get install, 398 MB) on the development machine, more than this feature's share of CI time;
# test_html_report_opens_in_headless_chromium runs inside `make test` wherever chromium is present.
test-browser: install
	command -v chromium >/dev/null 2>&1 || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium)
	$(VENV)/bin/python -m pytest -q tests/test_ecosystem.py -k "html or chromium" $(PYTEST_ARGS)

clean:
	rm -rf runs reports bench-out .pytest_cache
