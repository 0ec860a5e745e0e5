# Sourced by .ci/browser.sh and .ci/services.sh: install Debian packages for the test run.
#     lmserve_apt_install WHAT PACKAGE...
# Only as root and only where apt-get exists; otherwise it fails saying exactly what to install.
# The package lists are refreshed at most once per test run: `make test` and the platform tests
# (which start .ci/services.sh from pytest) are separate processes, so "once" is a stamp file
# rather than an environment variable (LMSERVE_APT_UPDATED, set by a caller, is honoured too).

_LMSERVE_APT_STAMP=${TMPDIR:-/tmp}/lmserve-apt-updated

_lmserve_apt_fail() {
    echo "=================================================================" >&2
    echo "lmserve tests: $*" >&2
    echo "=================================================================" >&2
    exit 1
}

lmserve_apt_install() {
    local what=$1; shift
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        _lmserve_apt_fail "$what: not installed, and this is not root with apt-get to install it. Install it, then rerun:  sudo apt-get install $*"
    fi
    echo "lmserve tests: installing $* (apt-get, for $what)" >&2
    export DEBIAN_FRONTEND=noninteractive
    # a refresh in the last hour counts as this run's (the stamp is this script's, not apt's)
    if [ -z "${LMSERVE_APT_UPDATED:-}" ] && [ -z "$(find "$_LMSERVE_APT_STAMP" -mmin -60 2>/dev/null)" ]; then
        apt-get update -qq >/dev/null || _lmserve_apt_fail "apt-get update failed"
        touch "$_LMSERVE_APT_STAMP"
    fi
    export LMSERVE_APT_UPDATED=1
    apt-get install -y -qq "$@" >/dev/null || _lmserve_apt_fail "apt-get install $* failed"
}
