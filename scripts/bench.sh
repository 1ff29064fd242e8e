#!/usr/bin/env bash
# Builds in release mode, runs every benchmark (or those whose names start with the given prefixes:
# call, call_isolated, load, ctl, swap, startup (startup_100k), mutation (mutation_with_100k), fleet, network
# (in a network namespace of its own; needs root)), prints a
# table and writes target/bench/summary.json.
# --quick runs every group with tiny counts (numbers meaningless; .ci/run uses it so that a group that
# stops working fails CI) and writes target/bench/summary.quick.json instead.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo bench -p plughost-tests --bench plughost -- "$@"
