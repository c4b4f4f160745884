# The two commands of the README, on a fresh Debian 12 machine (as root, or with sudo):
#   make run    install what is missing, build, run evhub on examples/evhub.conf
#   make test   install what is missing, build, run every test (plain, ASan/UBSan, valgrind)

BUILD      ?= build
BUILD_SAN  ?= build-asan
BUILD_FUZZ ?= build-fuzz
CONFIG     ?= examples/evhub.conf
JOBS       ?= 2
# Each module's libraries (build) and its broker and tools (tests): one line each.
KAFKA_BUILD_PKGS    = librdkafka-dev
KAFKA_TEST_PKGS     = kcat
RABBITMQ_BUILD_PKGS = librabbitmq-dev
SIP_BUILD_PKGS      = libosip2-dev
SIP_TEST_PKGS       = sip-tester
RABBITMQ_TEST_PKGS  = rabbitmq-server amqp-tools
CLUSTER_BUILD_PKGS  = libnats-dev
CLUSTER_TEST_PKGS   = nats-server openssl
BUILD_PKGS  = build-essential cmake pkg-config libev-dev liblua5.4-dev libjson-c-dev \
              libinih-dev libcmocka-dev $(KAFKA_BUILD_PKGS) $(RABBITMQ_BUILD_PKGS) \
              $(CLUSTER_BUILD_PKGS) $(SIP_BUILD_PKGS)
TEST_PKGS   = python3 valgrind clang-format util-linux clang libclang-rt-14-dev \
              kamailio kamailio-extra-modules kamailio-lua-modules socat iproute2 \
              $(KAFKA_TEST_PKGS) $(RABBITMQ_TEST_PKGS) \
              $(CLUSTER_TEST_PKGS) $(SIP_TEST_PKGS)
# Node.js and npm (for the third-party netstring client test) come from Debian only when the
# machine has no node/npm of its own: a NodeSource nodejs bundles npm and conflicts with it.
NODE_PKGS   = nodejs npm
SUDO       := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: all deps test-deps build run test test-plain test-asan test-valgrind test-fuzz format format-check bench clean

all: build

# apt-get only what is missing; $(1): packages, $(2): also Node.js unless node and npm exist.
define install_missing
	@missing=""; for p in $(1); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$(2)" ] && { ! command -v node >/dev/null || ! command -v npm >/dev/null; }; then \
	  missing="$$missing $(NODE_PKGS)"; fi; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi
endef

deps:
	$(call install_missing,$(BUILD_PKGS),)

test-deps: deps
	$(call install_missing,$(TEST_PKGS),node)

build: deps
	cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=RelWithDebInfo
	cmake --build $(BUILD) -j $(JOBS)

run: build
	./$(BUILD)/evhub -f -c $(CONFIG)

test: test-deps format-check test-plain test-asan test-valgrind test-fuzz

test-plain: test-deps build
	cd $(BUILD) && ctest --output-on-failure -j $(JOBS)

test-asan: test-deps
	cmake -S . -B $(BUILD_SAN) -DCMAKE_BUILD_TYPE=Debug -DEVHUB_SANITIZE=ON
	cmake --build $(BUILD_SAN) -j $(JOBS)
	cd $(BUILD_SAN) && ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
	  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 ctest --output-on-failure -j $(JOBS)

# Unit tests under memcheck, then the integration tests with evhub itself under valgrind.
# Tests labelled "broker" (a real broker started by the test) run in the plain and ASan
# passes only: under valgrind they would test no memory handling the others do not.
test-valgrind: test-deps build
	cd $(BUILD) && ctest -T memcheck -L unit --output-on-failure \
	  --overwrite MemoryCheckCommandOptions="--leak-check=full --error-exitcode=1 --errors-for-leak-kinds=definite,indirect"
	cd $(BUILD) && EVHUB_WRAPPER="valgrind -q --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite,indirect" \
	  EVHUB_SLOW=1 ctest -L integration -LE broker --output-on-failure -j $(JOBS)

# The netstring reader under libFuzzer for a short run (clang only; longer runs by hand).
test-fuzz: test-deps
	CC=clang cmake -S . -B $(BUILD_FUZZ) -DCMAKE_BUILD_TYPE=Debug -DEVHUB_FUZZ=ON
	cmake --build $(BUILD_FUZZ) -j $(JOBS) --target fuzz_netstring fuzz_sip
	cd $(BUILD_FUZZ) && ctest -L fuzz --output-on-failure

format:
	clang-format -i hub/*.[ch] lua/*.[ch] transports/*.[ch] tests/unit/*.c tests/bench/*.[ch] tests/bench/raisebench/*.c tests/bench/kafka/*.c tests/bench/cluster/*.c tests/bench/bare/*.c tests/fuzz/*.c

format-check: test-deps
	clang-format --dry-run -Werror hub/*.[ch] lua/*.[ch] transports/*.[ch] tests/unit/*.c tests/bench/*.[ch] tests/bench/raisebench/*.c tests/bench/kafka/*.c tests/bench/cluster/*.c tests/bench/bare/*.c tests/fuzz/*.c

bench: build
	./$(BUILD)/tests/bench/evbench --evhub ./$(BUILD)/evhub
	./$(BUILD)/tests/bench/evbench --evhub ./$(BUILD)/evhub --bare ./$(BUILD)/tests/bench/bare/bareforward --pin
	python3 tests/bench/ctlbench.py --evhub ./$(BUILD)/evhub
	./$(BUILD)/tests/bench/raisebench/raisebench --evhub ./$(BUILD)/evhub
	EVHUB_BIN=./$(BUILD)/evhub python3 tests/bench/kafka/kafka_bench.py
	EVHUB_BIN=./$(BUILD)/evhub python3 tests/bench/cluster/cluster_bench.py

clean:
	rm -rf $(BUILD) $(BUILD_SAN) $(BUILD_FUZZ)
