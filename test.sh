#!/usr/bin/env bash
# The test suite: set up (uv + locked environment), then both tiers: unit tests with tiny
# random-init models and the integration tier with the real packaged models (-m integration).
# Extra arguments go to pytest (e.g. -m "not integration" for the unit tier alone).
cd "$(dirname "$0")"
# The tests run the Ray Data path of step 02 too: the optional `ray` group is installed here
# (the main job, run.sh, does without it).
SYNC_EXTRAS=(--extra ray)
source scripts/bootstrap.sh
# The web page's test drives a headless Chromium (Debian's chromium and chromium-driver): install
# them where this machine can (root with apt-get); elsewhere that one test is skipped, with the reason.
if ! { command -v chromium && command -v chromedriver; } >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian's chromium and chromium-driver for the browser test" >&2
    { apt-get install -y -q chromium chromium-driver || { apt-get update -q && apt-get install -y -q chromium chromium-driver; }; } \
      >/dev/null 2>&1 || echo "could not install chromium: the browser test will be skipped" >&2
  else
    echo "chromium or chromedriver not found (install Debian's chromium and chromium-driver): the browser test will be skipped" >&2
  fi
fi
# --durations: the 15 slowest tests are listed after every run, so a slow test is seen.
exec "${UV[@]}" run --frozen --extra ray pytest --durations=15 "$@"
