# The two commands a new user needs: `make run` and `make test`.
CARGO ?= cargo
VMM := target/release/vmm

.PHONY: all build run test lint fmt clean guests

all: build

build:
	$(CARGO) build --release --bins

# Build everything and run the demo: hello, then a guest that keeps writing its memory while
# the collapse thread promotes it to 2 MiB pages (the summary says how much).
run: build
	$(VMM) run --guest hello --vcpus 2 --memory 64M
	$(VMM) run --guest verify --vcpus 2 --memory 64M --arg mode=stress --arg passes=3

# The whole suite: formatting, lints (host and guest code), unit and integration tests.
test:
	$(CARGO) fmt --all -- --check
	cd guest/programs && $(CARGO) fmt -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	cd guest/programs && $(CARGO) clippy --release --target-dir ../../target/guest -- -D warnings
	$(CARGO) build --bins
	$(CARGO) test --workspace

fmt:
	$(CARGO) fmt --all
	cd guest/programs && $(CARGO) fmt

clean:
	$(CARGO) clean
