#!/usr/bin/env bash
# The main job: build everything (release) and run plughost in the foreground with the reference
# drivers (file-volume, process-compute) on the state dir ./state inside the project. Ctrl-C stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace
exec target/release/plughost run --state-dir "$PWD/state" --volume-driver file-volume --compute-driver process-compute "$@"
