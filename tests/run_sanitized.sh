#!/usr/bin/env bash
# The CPU test suite under AddressSanitizer + UBSan. Every engine the tests build is compiled with
# AFS_SANITIZE=1, the model-independent afs._native module is rebuilt with the same sanitizers
# (installed into build/asan-site/, first on PYTHONPATH), and pytest runs with libasan preloaded,
# since the Python interpreter itself is not instrumented. Any sanitizer report fails the run: one
# in the pytest process aborts it; those of the binaries and Python children the tests start are
# collected after each test by tests/conftest.py.
#
#   tests/run_sanitized.sh                   # the whole suite, as .ci/run does (GPU tests skip)
#   tests/run_sanitized.sh -k tokenizer -x   # any pytest arguments
#
# Engines compile into $AFS_CACHE_DIR (else a fresh directory per run) under a build key ending in
# -asan, apart from ordinary builds. Needs g++ with libasan (or CXX naming a compiler that has it).
set -euo pipefail
cd "$(dirname "$0")/.."
site=build/asan-site
python -m pip install -q --no-deps --upgrade --target "$site" \
  -C cmake.define.AFS_SANITIZE=ON -C "build-dir=build/asan/{wheel_tag}" .
cxx=${CXX:-g++}
# libstdc++ too: ASan's __cxa_throw interceptor needs it loaded before the module that throws.
export LD_PRELOAD="$("$cxx" -print-file-name=libasan.so) $("$cxx" -print-file-name=libstdc++.so)"
# The pytest process: no leak check (CPython keeps its allocations at exit), exit status 86 on a
# report, and a 16 MB quarantine instead of 256 MB: the interpreter, torch and HF tokenizers free
# so much that the default quarantine makes the tokenizer tests 1.6x slower. conftest sets the
# options of the processes it starts. --capture=sys leaves file descriptor 2 alone, so that a
# report from inside pytest reaches the terminal before it exits.
export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:exitcode=86:quarantine_size_mb=16
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:exitcode=86
export AFS_TEST_SANITIZE=1 PYTHONPATH="$PWD/$site${PYTHONPATH:+:$PYTHONPATH}"
exec python -m pytest -q --capture=sys "$@"
