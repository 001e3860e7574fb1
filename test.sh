#!/usr/bin/env bash
# Runs the whole kadmq test suite: unit, property and integration tests of
# every crate in the workspace. Optional third-party clients used by interop
# tests are installed here when possible; when not, the tests that need them
# print why they are skipped.
set -euo pipefail
cd "$(dirname "$0")"

# A fresh clone builds once: incremental caches would only double the disk
# the build takes (set CARGO_INCREMENTAL=1 to keep them between local runs).
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}

if ! python3 -c "import paho.mqtt" 2>/dev/null; then
  if command -v pip >/dev/null 2>&1 && pip install --quiet 'paho-mqtt>=2,<3' 2>/dev/null; then
    echo "test.sh: installed paho-mqtt for the interop tests"
  else
    echo "test.sh: paho-mqtt is not available; the paho interop test will print 'skipped'"
  fi
fi

# The routing core is sans-IO by construction: it builds and passes its
# tests without the libp2p driver, and the simulator, which uses it so,
# pulls in no tokio, libp2p or rand. Checked first so the boundary cannot rot.
cargo test -p kadmq-dht --no-default-features --lib --locked
sim_deps=$(cargo tree -p kadmq-sim -e normal --locked)
if grep -E 'tokio|libp2p|rand' <<<"$sim_deps"; then
  echo "test.sh: kadmq-sim pulls in the crates above; the routing core must build without them" >&2
  exit 1
fi

cargo test --workspace --locked "$@"

# The patched XSalsa20 that libp2p-pnet encrypts with (vendor/README.md):
# its crate's known-answer and seek tests, the 4-block path included, and
# the one upstream leaves out by default (every split of 256 bytes into
# three calls at every offset: 1 s in release, 45 s in a debug build).
cargo test --release --manifest-path vendor/salsa20/Cargo.toml --target-dir target/vendor --locked --test mod -- --include-ignored

# The API docs build without a broken or private link.
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked --quiet
