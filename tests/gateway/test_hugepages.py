"""The serving processes re-execute once with glibc asking for transparent huge pages (gateway/hugepages.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from gateway.hugepages import ENV, hugepage_environment

MADVISE = "always [madvise] never"


def test_asks_for_huge_pages_on_a_recent_glibc():
    assert hugepage_environment({}, system="Linux", libc=("glibc", "2.36"), thp_mode=MADVISE) == {
        "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    # other tunables are kept
    env = hugepage_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, system="Linux",
                               libc=("glibc", "2.39"), thp_mode="[always] madvise never")
    assert env == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"}


@pytest.mark.parametrize("environ, system, libc, mode", [
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, "Linux", ("glibc", "2.36"), MADVISE),  # already set: no loop
    ({ENV: "0"}, "Linux", ("glibc", "2.36"), MADVISE),  # turned off
    ({}, "Linux", ("glibc", "2.34"), MADVISE),  # glibc without the tunable
    ({}, "Linux", ("", ""), MADVISE),  # musl
    ({}, "Linux", ("glibc", "2.36"), "always madvise [never]"),  # THP off
    ({}, "Linux", ("glibc", "2.36"), None),  # no THP
    ({}, "Darwin", ("", ""), None),
])
def test_leaves_the_process_alone(environ, system, libc, mode):
    assert hugepage_environment(environ, system=system, libc=libc, thp_mode=mode) is None


def test_the_reexecuted_process_has_the_tunable(tmp_path):
    """A real re-exec: the child sees GLIBC_TUNABLES and runs its code exactly once."""
    script = tmp_path / "probe.py"
    script.write_text("import os, sys\n"
                      "from gateway.hugepages import reexec_with_hugepages\n"
                      "print('start', flush=True)\n"
                      "reexec_with_hugepages()\n"
                      "print(os.environ.get('GLIBC_TUNABLES', ''), sys.argv[1:])\n")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", ENV)}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    out = subprocess.run([sys.executable, str(script), "x", "y"], capture_output=True, text=True, env=env,
                         check=True).stdout.splitlines()
    expected = hugepage_environment({}, system="Linux", libc=tuple(os.confstr("CS_GNU_LIBC_VERSION").split()),
                                    thp_mode=_thp_mode())
    if expected is None:  # a machine where nothing is gained: the process goes on unchanged
        assert out == ["start", " ['x', 'y']"]
    else:
        assert out == ["start", "start", "glibc.malloc.hugetlb=1 ['x', 'y']"]


def _thp_mode():
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read()
    except OSError:
        return None
