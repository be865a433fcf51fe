# The two commands a new user needs: `make run` and `make test`.
CARGO ?= cargo
VMM := target/release/vmm

.PHONY: all build run test bench fuzz fmt clean

all: build

build:
	$(CARGO) build --release --bins

# Build everything and run the demo: hello, then a guest that keeps writing its memory while
# the collapse thread promotes it to 2 MiB pages. The VMM serves its page faults itself
# (--page-source zero), so each promotion moves its huge page in under a claim with
# UFFDIO_MOVE and holds the write lock only to revalidate (about a microsecond); the summary
# says how long, and how long writers of each extent waited.
run: build
	$(VMM) run --guest hello --vcpus 2 --memory 64M
	$(VMM) run --guest verify --vcpus 2 --memory 64M --arg mode=stress --arg passes=3 --page-source zero

# The whole suite: formatting, lints (host and guest code), unit and integration tests.
# The tests run the binary with fault injection compiled in (the `failpoints` feature); `make run`
# and release builds never have it.
TEST_FEATURES := --features vmm/failpoints,integration-tests/failpoints

test:
	$(CARGO) fmt --all -- --check
	cd guest/programs && $(CARGO) fmt -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy --workspace --all-targets $(TEST_FEATURES) -- -D warnings
	cd guest/programs && $(CARGO) clippy --release --target-dir ../../target/guest -- -D warnings
	$(CARGO) build --bins $(TEST_FEATURES)
	$(CARGO) test --workspace $(TEST_FEATURES)
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc -p vm-extents --no-deps
	@# The memory manager's example VMM, on its public API only (needs /dev/kvm).
	@if [ -e /dev/kvm ] || [ -n "$$VMM_REQUIRE_KVM" ]; then \
		$(CARGO) run -q -p vm-extents --example minimal_vmm; \
	else echo "no /dev/kvm: the example VMM is not run"; fi

# The default benchmark set: about 40 minutes on a nested 2-CPU KVM host (reclaim about five of
# them, resume about four; the collapse part
# runs each lock order twice, with the pipelined pool and with the ahead-0 baseline; estimated
# from its parts, 14 minutes for the collapse set before the baseline rows were added).
# SWEEP_VCPUS: the vCPU counts to sweep (as far as the host's CPUs go).
SWEEP_VCPUS ?= 1,2
bench: build
	mkdir -p target/bench
	$(VMM) bench faults --vcpus $(SWEEP_VCPUS) --mem-per-vcpu 32M --repeat 3 \
		--json target/bench/faults.json --plot target/bench/faults.svg
	$(VMM) bench faults --vcpus 1 --mem-per-vcpu 64M --repeat 3 --pin-cpus 0 \
		--modes kernel-4k,uffd-zero,uffd-image --json target/bench/faults-pinned.json
	$(VMM) bench collapse --vcpus $(SWEEP_VCPUS) --alloc-latency 0,5 --memory 64M --passes 6 \
		--repeat 3 --json target/bench/collapse.json --plot target/bench/collapse.svg
	$(VMM) bench reclaim --memory 64M --repeat 3 \
		--json target/bench/reclaim.json --plot target/bench/reclaim.svg
	$(VMM) bench resume --memory 1G --clones 1,2,4,8 \
		--json target/bench/resume.json --plot target/bench/resume.svg
	$(CARGO) run --release -p vm-extents --example map_lock_readers 1

# Fuzzing (nightly and cargo-fuzz: `cargo install cargo-fuzz`): each target for FUZZ_SECONDS, then
# its corpus minimised. `make test` replays fuzz/corpus and fuzz/artifacts on stable.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := elf image ucall options handshake snapshot

fuzz:
	cd fuzz && for t in $(FUZZ_TARGETS); do \
		$(CARGO) +nightly fuzz run $$t -- -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=4096 || exit 1; \
		$(CARGO) +nightly fuzz cmin $$t || exit 1; \
	done

fmt:
	$(CARGO) fmt --all
	cd guest/programs && $(CARGO) fmt

clean:
	$(CARGO) clean
