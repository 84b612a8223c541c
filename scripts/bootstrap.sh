# Sourced by run.sh and test.sh: find uv (install it with pip when missing), then install the
# locked environment. Sets UV to the command that runs uv.
set -euo pipefail
if command -v uv >/dev/null 2>&1; then
  UV=(uv)
elif python3 -m uv --version >/dev/null 2>&1; then
  UV=(python3 -m uv)
else
  echo "uv not found: installing it with pip" >&2
  python3 -m pip install --quiet uv || python3 -m pip install --quiet --user uv
  UV=(python3 -m uv)
fi
# --frozen: exactly the committed uv.lock; --compile-bytecode: imports stay fast even where
# PYTHONDONTWRITEBYTECODE is set.
# SYNC_EXTRAS (set by test.sh): optional groups to install too, e.g. (--extra ray).
"${UV[@]}" sync --frozen --compile-bytecode --quiet ${SYNC_EXTRAS[@]+"${SYNC_EXTRAS[@]}"}
