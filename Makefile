.DEFAULT_GOAL := help
.PHONY: help run test lint bench deb

help: ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-6s %s\n", $$1, $$2}'

run: ## run synwatch in the foreground on the embedded default
	./scripts/run

test: ## the whole suite (as root: real namespaces, real kernel lines)
	./scripts/test

lint: ## ruff and mypy --strict
	./scripts/lint

bench: ## benchmarks: synwatch vs grep vs fail2ban-regex
	./scripts/bench

deb: ## dist/synwatch_VERSION_ARCH.deb (dpkg-deb; a venv in /opt/synwatch)
	./scripts/build-deb
