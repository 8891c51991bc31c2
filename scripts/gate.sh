#!/usr/bin/env bash
# The one gate: installs what the tests need (mosquitto clients), then runs fmt, clippy with
# warnings denied, and every test. README.md gives this command; .ci/run runs it.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v mosquitto_pub >/dev/null 2>&1 || need_apt+=(mosquitto-clients)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "gate: installing ${need_apt[*]} (needed by the interop tests)"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}"
fi

# rust-toolchain.toml pins the toolchain (with rustfmt, clippy and the wasm32 target);
# rustup installs it on first use.
rustup show active-toolchain >/dev/null
rustup target add wasm32-unknown-unknown >/dev/null 2>&1 || rustup target add wasm32-unknown-unknown

echo "gate: cargo fmt --check"
cargo fmt --all --check
echo "gate: cargo clippy (warnings denied)"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "gate: build binaries used by the process tests, and the example consumers as wasm"
cargo build --workspace --bins --locked
cargo build --locked --profile wasm --target wasm32-unknown-unknown \
  -p threshold -p zscore -p flatline -p rate-of-change -p missing-data -p transform
echo "gate: tests"
if cargo nextest --version >/dev/null 2>&1; then
  # nextest does not run doctests; run them first so the summary printed last is the
  # nextest run over every test.
  cargo test --workspace --doc --locked --quiet
  cargo nextest run --workspace --locked --no-fail-fast
else
  cargo test --workspace --locked
fi
