# Interact Relay: every command sets itself up from Python 3.11+ and make; `make build` (the last step of `make test`)
# also needs python3.13, the Lambda runtime, on PATH or in pyenv (sam build runs the runtime's Python, without Docker).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SAM_VENV := .venv-sam
SAM := $(SAM_VENV)/bin/sam
# sam build needs the Lambda runtime's Python (python3.13 on PATH). Where pyenv is installed, select its
# newest 3.13.x for the build whatever PYENV_VERSION says; without pyenv this is empty and PATH decides.
SAM_PY_ENV := PYENV_VERSION=$$(pyenv versions --bare 2>/dev/null | grep -E '^3\.13(\.[0-9]+)?$$' | tail -1)
# Offline AWS settings so sam/cfn-lint never look for an account.
OFFLINE_AWS := AWS_DEFAULT_REGION=us-east-1 AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing SAM_CLI_TELEMETRY=0

.PHONY: setup sam-setup audit-setup lint types unit integration validate audit build test run serve invoke soak bench outage-cost clean

setup: $(VENV)/.stamp
$(VENV)/.stamp: requirements-dev.txt layers/deps/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

sam-setup: $(SAM_VENV)/.stamp
$(SAM_VENV)/.stamp: requirements-sam.txt
	$(PYTHON) -m venv $(SAM_VENV)
	$(SAM_VENV)/bin/pip install -q --upgrade pip
	$(SAM_VENV)/bin/pip install -q -r requirements-sam.txt
	touch $@

AUDIT_VENV := .venv-audit
audit-setup: $(AUDIT_VENV)/.stamp
$(AUDIT_VENV)/.stamp: requirements-audit.txt
	$(PYTHON) -m venv $(AUDIT_VENV)
	$(AUDIT_VENV)/bin/pip install -q --upgrade pip
	$(AUDIT_VENV)/bin/pip install -q -r requirements-audit.txt
	touch $@

# Security audits (checkov, bandit, cfn-lint serverless rules) live in their own venv: checkov pins
# versions that would fight the test tools.
# Each skip is justified where it applies: `# checkov:skip=` comments and cfn-lint `ignore_checks` Metadata in
# template.yaml; bandit findings are fixed or marked nosec in place.
# checkov runs offline (--skip-download); devtools/ is dev-only tooling and is held to medium severity and up.
AUDIT_BIN := $(AUDIT_VENV)/bin
audit: setup audit-setup
	$(OFFLINE_AWS) $(AUDIT_BIN)/cfn-lint --append-rules cfn_lint_serverless.rules -- template.yaml
	$(AUDIT_BIN)/checkov --quiet --compact --skip-download --framework cloudformation -f template.yaml
	$(AUDIT_BIN)/bandit -q -r functions relayctl
	$(AUDIT_BIN)/bandit -q -r devtools --severity-level medium

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

types: setup
	$(BIN)/mypy

unit: setup
	$(BIN)/pytest tests/unit -q

integration: setup
	$(BIN)/pytest tests/integration -q

validate: setup sam-setup
	$(OFFLINE_AWS) $(BIN)/cfn-lint template.yaml
	$(OFFLINE_AWS) $(SAM) validate --lint --template template.yaml

build: setup sam-setup
	@$(SAM_PY_ENV) python3.13 --version >/dev/null 2>&1 || { echo "make build: sam build needs python3.13 (the Lambda runtime) on PATH, or in pyenv (pyenv install 3.13); in make test, every check before it has passed" >&2; exit 1; }
	$(OFFLINE_AWS) $(SAM_PY_ENV) $(SAM) build --template template.yaml
	@# sam build ships sources only (it leaves out every *.pyc), and /var/task and /opt are read-only, so each cold
	@# start would compile the relay and its layer again (about 0.4 s locally for the layer's imports alone). Ship the
	@# runtime's bytecode instead, hash-based (the zip gives every file the same 1980 time): the relay's checked
	@# against its source (an edit in the Lambda console is not ignored), the layer's, which cannot be edited, as is.
	$(SAM_PY_ENV) python3.13 -m compileall -q -j 0 --invalidation-mode checked-hash .aws-sam/build/RelayFunction
	$(SAM_PY_ENV) python3.13 -m compileall -q -j 0 --invalidation-mode unchecked-hash .aws-sam/build/DepsLayer
	$(SAM_PY_ENV) python3.13 devtools/check_bytecode.py .aws-sam/build/RelayFunction/relay .aws-sam/build/DepsLayer
	@# Then run what was built as Lambda would: the function and its layer alone, in python3.13 (devtools/smoke_build.py).
	$(BIN)/python -m devtools.smoke_build --python "$$($(SAM_PY_ENV) python3.13 -c 'import sys; print(sys.executable)')" .aws-sam/build

test: lint types validate audit unit integration build

run: setup
	$(BIN)/python -m devtools.run_demo

serve: setup  # make serve RETRY_SECONDS=5: a record handed back comes again in 5 s (not the queue's 180)
	$(BIN)/python -m devtools.stack --serve $(if $(RETRY_SECONDS),--retry-seconds $(RETRY_SECONDS))

invoke: setup  # `sam local invoke -e` without Docker, against `make serve`'s stack: make invoke EVENT=events/<file>
	$(BIN)/python -m devtools.invoke $(EVENT)

soak: setup
	$(BIN)/python -m devtools.soak

bench: setup
	$(BIN)/python -m devtools.bench

outage-cost: setup  # what events cost while Edge fails (README, "While Edge fails"): about 2 minutes
	$(BIN)/python -m devtools.outage_cost

clean:
	rm -rf .aws-sam .pytest_cache .mypy_cache .ruff_cache .local
