#!/usr/bin/env bash
# Runs samkv's test suite on a fresh machine: fetches the models the tests use (with samkv's
# own command; verified by sha256), installs and starts what the tests need, then runs every
# test.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run --release --quiet -- model fetch smollm2 qwen2.5-coder-0.5b
# The OpenAI Python client that tests/openai_client.rs drives against `samkv serve`, pinned
# so that a new release cannot change what the test checks.
python3 -m pip install --quiet --disable-pip-version-check openai==3.63.0
if [ -f .ci/redis.sh ]; then bash .ci/redis.sh; fi
cargo test --release
