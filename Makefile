# The project's entry points. `make demo` and `make test` run the set-up first;
# it installs nothing when everything is already in place.
.PHONY: setup demo test lab lint format

setup:
	@scripts/setup.sh

demo: setup
	@scripts/demo.sh

test: setup
	.venv/bin/python -m pytest $(PYTEST_ARGS)

lab: setup
	@scripts/lab.sh

lint:
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

format:
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .
