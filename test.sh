#!/usr/bin/env bash
# The test suite: set up (uv + locked environment), then both tiers: unit tests with tiny
# random-init models and the integration tier with the real packaged models (-m integration).
# Extra arguments go to pytest (e.g. -m "not integration" for the unit tier alone).
cd "$(dirname "$0")"
source scripts/bootstrap.sh
exec "${UV[@]}" run --frozen pytest "$@"
