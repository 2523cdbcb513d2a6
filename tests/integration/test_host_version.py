"""The host version (Manager.HostVersion), end to end with the real daemon:
read from a real git checkout that belongs to another user and whose config
asks for programs (core.fsmonitor, a clean filter) — the version is right and
no program ran; klippy's own software_version while Klipper runs; a FIFO in
.git neither hangs the daemon nor its answers; klippy/.version only if it is
a version the checkout's owner could read."""

import os
import subprocess
import time

import pytest

TAG = "v0.13.0"
NOBODY = 65534
GIT_ENV = dict(os.environ, HOME="/nonexistent", GIT_CONFIG_NOSYSTEM="1",
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.com",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.com")


def git(checkout, *args):
    return subprocess.run(["git", "-c", "safe.directory=*", "-c", "init.defaultBranch=master",
                           "-C", checkout] + list(args), env=GIT_ENV, check=True,
                          stdout=subprocess.PIPE, universal_newlines=True).stdout.strip()


def make_repo(checkout):
    """A Klipper-like checkout: tag v0.13.0 and two commits after it."""
    git(checkout, "init", "-q")
    with open(os.path.join(checkout, "klippy", "klippy.py"), "w") as f:
        f.write("# one\n")
    git(checkout, "add", "klippy/klippy.py")
    git(checkout, "commit", "-q", "-m", "one")
    git(checkout, "tag", TAG)
    for n in ("two", "three"):
        with open(os.path.join(checkout, "klippy", "klippy.py"), "a") as f:
            f.write("# %s\n" % n)
        git(checkout, "commit", "-q", "-a", "-m", n)


@pytest.fixture
def git_checkout(klipper_host):
    if subprocess.run(["git", "--version"], stdout=subprocess.DEVNULL).returncode != 0:
        pytest.skip("git is not installed")
    # klippy/.version says something else: the repository must win.
    klipper_host.set_version("v0.12.0-1-g0000000")
    make_repo(klipper_host.checkout)
    return klipper_host.checkout


def test_foreign_checkout_config_runs_nothing(git_checkout, testbed, daemon, dbus_client,
                                              manager_props, wait_for, tmp_path):
    checkout = git_checkout
    clean = git(checkout, "describe", "--always", "--tags", "--long")
    assert clean.startswith(TAG + "-2-g")

    # The checkout's owner asks for programs: an fsmonitor hook and a clean
    # filter on the tracked file that is about to change.
    markers = tmp_path / "markers"
    markers.mkdir()
    markers.chmod(0o777)
    hook = tmp_path / "hook.sh"
    hook.write_text("#!/bin/sh\ntouch %s/\"$1\"\ncat\n" % markers)
    hook.chmod(0o755)
    git(checkout, "config", "core.fsmonitor", "%s fsmonitor" % hook)
    git(checkout, "config", "filter.x.clean", "%s clean" % hook)
    git(checkout, "config", "filter.x.smudge", "%s smudge" % hook)
    with open(os.path.join(checkout, ".gitattributes"), "w") as f:
        f.write("*.py filter=x\n")
    git(checkout, "add", ".gitattributes")
    git(checkout, "commit", "-q", "-m", "attributes")
    clean = git(checkout, "describe", "--always", "--tags", "--long")
    assert clean.startswith(TAG + "-3-g")
    with open(os.path.join(checkout, "klippy", "klippy.py"), "a") as f:
        f.write("# local change\n")
    # An untracked file does not count for --dirty; the tracked change does.
    with open(os.path.join(checkout, "untracked.txt"), "w") as f:
        f.write("x\n")
    for name in os.listdir(str(markers)):
        os.unlink(os.path.join(str(markers), name))

    owned_by_other = os.geteuid() == 0
    if owned_by_other:
        subprocess.run(["chown", "-R", "%d:%d" % (NOBODY, NOBODY), checkout], check=True)
    index = os.path.join(checkout, ".git", "index")
    index_before = os.stat(index)

    testbed.add_klipper_usb(serial="E66138935F4A2B2C", mcu="rp2040", version=clean)
    daemon()
    wait_for(lambda: manager_props()["HostVersion"] != "", timeout=15, what="HostVersion")
    assert manager_props()["HostVersion"] == clean + "-dirty"

    # The MCU built from the same commit (clean) matches the dirty host.
    def matched():
        p = dbus_client.mcu_props(dbus_client.get_mcu("E66138935F4A2B2C"))
        return p if p["State"] == "application" else None
    props = wait_for(matched, timeout=15, what="the MCU identified")
    assert props["VersionMatchesHost"] == "yes"

    # Nothing ran, nothing was written.
    assert os.listdir(str(markers)) == []
    index_after = os.stat(index)
    assert (index_after.st_uid, index_after.st_mtime_ns, index_after.st_ino) == \
        (index_before.st_uid, index_before.st_mtime_ns, index_before.st_ino)
    if owned_by_other:
        for root, dirs, files in os.walk(os.path.join(checkout, ".git")):
            for name in dirs + files:
                assert os.lstat(os.path.join(root, name)).st_uid == NOBODY, name

    # The hooks are real: git itself runs them, and prints the same version.
    assert git(checkout, "describe", "--always", "--tags", "--long", "--dirty") == \
        clean + "-dirty"
    assert sorted(os.listdir(str(markers))) != []


def test_no_tags_gives_the_abbreviated_commit(git_checkout, daemon, manager_props, wait_for):
    checkout = git_checkout
    git(checkout, "tag", "-d", TAG)
    expected = git(checkout, "describe", "--always", "--tags", "--long", "--dirty")
    assert "-" not in expected
    daemon()
    wait_for(lambda: manager_props()["HostVersion"] != "", timeout=15, what="HostVersion")
    assert manager_props()["HostVersion"] == expected


def test_rescan_rereads_the_checkout(git_checkout, daemon, dbus_client, manager_props, wait_for):
    checkout = git_checkout
    first = git(checkout, "describe", "--always", "--tags", "--long")
    daemon()
    wait_for(lambda: manager_props()["HostVersion"] == first, timeout=15, what="HostVersion")
    with open(os.path.join(checkout, "klippy", "klippy.py"), "a") as f:
        f.write("# four\n")
    git(checkout, "commit", "-q", "-a", "-m", "four")
    second = git(checkout, "describe", "--always", "--tags", "--long")
    assert second.startswith(TAG + "-3-g")
    dbus_client.call("/io/mcuflash1", "io.mcuflash1.Manager", "Rescan")
    wait_for(lambda: manager_props()["HostVersion"] == second, timeout=15, what="new HostVersion")


def test_klippy_version_wins_while_klipper_runs(klipper_checkout, klippy, daemon, manager_props,
                                                wait_for):
    klipper_checkout("v0.13.0-46-g8c72b4a5")
    server = klippy(software_version="v0.13.0-50-g1234abcd")
    daemon()
    wait_for(lambda: manager_props()["HostVersion"] == "v0.13.0-50-g1234abcd", timeout=15,
             what="klippy's version")
    server.stop()
    wait_for(lambda: manager_props()["HostVersion"] == "v0.13.0-46-g8c72b4a5", timeout=15,
             what="the checkout's version once Klipper stopped")
    server.restart()
    wait_for(lambda: manager_props()["HostVersion"] == "v0.13.0-50-g1234abcd", timeout=15,
             what="klippy's version again")


def test_fifo_in_git_does_not_hang(git_checkout, klipper_host, daemon, manager_props, wait_for):
    checkout = git_checkout
    klipper_host.set_version("v0.13.0-46-g8c72b4a5")
    index = os.path.join(checkout, ".git", "index")
    os.unlink(index)
    os.mkfifo(index)
    d = daemon()
    # The daemon answers while its reader waits on the FIFO…
    start = time.monotonic()
    assert manager_props()["HostVersion"] in ("", "v0.13.0-46-g8c72b4a5")
    assert time.monotonic() - start < 2
    # …gives up after its timeout and takes klippy/.version.
    wait_for(lambda: manager_props()["HostVersion"] == "v0.13.0-46-g8c72b4a5", timeout=30,
             what="the klippy/.version fallback")
    with open(d.log_path) as f:
        assert "took longer than 5000 ms, gave up" in f.read()


def test_version_file_must_be_a_version_its_owner_can_read(klipper_host, daemon, manager_props,
                                                           wait_for, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("v1secret\n")
    secret.chmod(0o600)
    version = os.path.join(klipper_host.checkout, "klippy", ".version")
    os.symlink(str(secret), version)
    if os.geteuid() == 0:
        os.chown(klipper_host.checkout, NOBODY, NOBODY)
    else:
        secret.write_text("root:$y$j9T$abc:19000:0:99999:7:::\n")
    d = daemon()

    def log():
        with open(d.log_path) as f:
            return f.read()
    wait_for(lambda: "klippy/.version" in log(), timeout=15, what="the .version warning")
    assert manager_props()["HostVersion"] == ""
    assert "secret" not in log() and "$y$" not in log()
