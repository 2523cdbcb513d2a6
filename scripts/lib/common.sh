# Shared by scripts/demo, scripts/run-tests and scripts/bench: install what
# the build and the test harness need (Debian 12 packages), and configure
# the build directory.  Sourced, not run.

MCUFLASHD_PACKAGES="meson ninja-build pkg-config gcc libc6-dev
  libsystemd-dev libudev-dev libusb-1.0-0-dev libsocketcan-dev libjson-c-dev libevent-dev zlib1g-dev
  libgit2-dev libbz2-dev
  umockdev libumockdev-dev gir1.2-umockdev-1.0 dbus-daemon libglib2.0-bin
  python3-gi python3-dbus python3-dbusmock python3-serial python3-pytest
  libcmocka-dev scdoc libxml2-utils systemd git can-utils dfu-util
  gcc-arm-none-eabi binutils-arm-none-eabi"

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
