#!/usr/bin/env bash
# A C++ compiler for tests/engine/test_compiled_decode.py (torch.compile's C++ backend builds the compiled
# decode step; without g++ those tests would skip). Run by `make test` before pytest: installed from
# Debian's packages when missing and run as root, otherwise it stops and says what to install.
set -euo pipefail
. "$(dirname "$0")/apt.sh"
command -v g++ >/dev/null 2>&1 && exit 0
lmserve_apt_install "the compiled-decode tests' C++ compiler" g++
command -v g++ >/dev/null || _lmserve_apt_fail "g++ still not on PATH after apt-get install"
