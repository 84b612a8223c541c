#!/usr/bin/env bash
# The main job: set up (uv + locked environment), then steps 01-07 on the default offline corpus
# with the CPU preset, ending with generated text. Extra arguments go to `next-speed run`
# (e.g. --preset tiny, --from decoder, --force).
cd "$(dirname "$0")"
source scripts/bootstrap.sh
exec "${UV[@]}" run --frozen next-speed run "$@"
