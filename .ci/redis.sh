#!/usr/bin/env bash
# Installs redis-server for the Redis store tests (tests/redis.rs start their own instance).
set -euo pipefail
if ! command -v redis-server >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y --no-install-recommends redis-server
fi
redis-server --version
