# Shared by scripts/demo, scripts/run-tests and scripts/bench: install what
# the build and the test harness need (Debian 12 packages), and configure
# the build directory.  Sourced, not run.

MCUFLASHD_PACKAGES="meson ninja-build pkg-config gcc libc6-dev
  libsystemd-dev libudev-dev libusb-1.0-0-dev libsocketcan-dev libjson-c-dev libevent-dev zlib1g-dev
  libgit2-dev libbz2-dev
  umockdev libumockdev-dev gir1.2-umockdev-1.0 dbus-daemon libglib2.0-bin
  python3-gi python3-dbus python3-dbusmock python3-serial python3-pytest python3-pytest-timeout
  libcmocka-dev scdoc libxml2-utils systemd git can-utils dfu-util
  gcc-arm-none-eabi binutils-arm-none-eabi clang-14 libclang-rt-14-dev"

# Install the packages that are missing.  Needs root and Debian's apt.
ensure_packages() {
        missing=""
        for p in $MCUFLASHD_PACKAGES; do
                if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
                        missing="$missing $p"
                fi
        done
        [ -z "$missing" ] && return 0
        if [ "$(id -u)" != 0 ]; then
                echo "Missing packages:$missing" >&2
                echo "Install them (as root: apt-get install$missing) and run this again." >&2
                return 1
        fi
        echo "Installing:$missing"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq || return 1
        # shellcheck disable=SC2086
        apt-get install -y -qq --no-install-recommends $missing >/dev/null || return 1
}

# configure_build BUILDDIR [meson options…]
configure_build() {
        builddir=$1
        shift
        if [ -f "$builddir/build.ninja" ]; then
                meson configure "$builddir" "$@" >/dev/null
        else
                meson setup "$builddir" "$@"
        fi
}

# The libFuzzer build (tests/fuzz, scripts/fuzz): Debian's clang-14 with its
# fuzzer runtime (libclang-rt-14-dev).  FUZZ_CC names the compiler.
FUZZ_CC=${MCUFLASHD_FUZZ_CC:-clang-14}

# True when $FUZZ_CC can build and link a libFuzzer program.
fuzz_toolchain_available() {
        command -v "$FUZZ_CC" >/dev/null 2>&1 || return 1
        probe=$(mktemp -d "${TMPDIR:-/tmp}/mcuflashd-fuzz-probe.XXXXXX") || return 1
        printf '%s\n' '#include <stddef.h>' '#include <stdint.h>' \
                'int LLVMFuzzerTestOneInput(const uint8_t *d, size_t n) { (void) d; (void) n; return 0; }' \
                >"$probe/probe.c"
        ok=0
        "$FUZZ_CC" -fsanitize=fuzzer,address,undefined -o "$probe/probe" "$probe/probe.c" >/dev/null 2>&1 || ok=1
        rm -rf "$probe"
        return $ok
}

# configure_fuzz_build BUILDDIR: a clang build with -Dfuzz=true and ASan+UBSan.
configure_fuzz_build() {
        if [ -f "$1/build.ninja" ]; then
                meson configure "$1" -Dfuzz=true >/dev/null
        else
                CC=$FUZZ_CC meson setup "$1" -Dfuzz=true -Db_sanitize=address,undefined -Db_lundef=false
        fi
}

# build_fuzz_targets BUILDDIR TARGET…: only the fuzz targets (and the
# library they link), not the whole project a second time.
build_fuzz_targets() {
        dir=$1
        shift
        # shellcheck disable=SC2046
        set -- $(for t in "$@"; do printf 'tests/fuzz/fuzz-%s ' "$t"; done)
        ninja -C "$dir" "$@"
}

# The fuzz targets: tests/fuzz/fuzz-NAME.c → NAME (run from the top).
fuzz_targets() {
        for f in tests/fuzz/fuzz-*.c; do
                f=${f#tests/fuzz/fuzz-}
                printf '%s ' "${f%.c}"
        done
}
