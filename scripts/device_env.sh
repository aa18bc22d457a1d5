# Sourced by the GPU scripts (from the repository root): compiled kernels, unbuffered output, and
# the wheels an offline GPU machine lacks installed from $MEGABLOCKS_WHEELS (default
# .device-wheels/, filled by scripts/fetch_device_wheels.sh) into $MEGABLOCKS_SITE.
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
WHEELS=${MEGABLOCKS_WHEELS:-.device-wheels}
SITE=${MEGABLOCKS_SITE:-/tmp/megablocks-site}
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target "$SITE" "$WHEELS"/*.whl
  export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
