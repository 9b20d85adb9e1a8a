# The two commands of the README: `make demo` and `make test`. Both set themselves up.
.PHONY: test demo bench setup setup-demo services-start services-stop lint clean

setup:
	@scripts/bootstrap.sh dev

setup-demo:
	@scripts/bootstrap.sh demo

test: setup
	@scripts/test.sh

lint: setup
	.venv/bin/ruff check .
	.venv/bin/mypy

demo: setup-demo
	@LITELLM_LOCAL_MODEL_COST_MAP=True .venv/bin/farm demo

bench: setup
	@scripts/bench.sh

services-start:
	@scripts/services.sh start

services-stop:
	@scripts/services.sh stop

clean:
	scripts/services.sh stop || true
	rm -rf .build artifacts
