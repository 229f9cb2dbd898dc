"""The rules every /dev/iommu ioctl shares (drivers/iommu/iommufd/main.c), checked
end to end: a real C client (tests/clients/iommufd_rules.c) against the real daemon,
with the kernel's errno for each rule.

Central validation (size word, minimum size, zero tail, unknown numbers, bad pointers),
copy-out, IOMMU_OPTION, IOMMU_DESTROY and object ids, one context per open, threads, and
a client killed in the middle of its ioctls.
"""

from __future__ import annotations

import csv
import signal
import subprocess
from pathlib import Path

import pytest
import trio
from clientkit import (
    CAP_SYS_RESOURCE,
    NOBODY,
    Step,
    cap_effective,
    config_daemon,
    mismatches,
    parse_steps,
    wait_until,
)
from harness import SHARED, run

from iommufd_cuse.transport import caller as caller_mod

ABI = SHARED / "abi"
OPEN_TO_ALL = '[nodes.iommu]\nmode = "0666"\n'


def node(daemon, name: str = "iommu") -> Path:
    return Path(daemon.dev_dir) / name


async def rules(
    daemon, cbuild, scenario: str, *, user: int | None = None, name: str = "iommu", prefix: tuple[str, ...] = ()
) -> dict[str, Step]:
    exe = cbuild("iommufd_rules")
    p = await run([*prefix, exe, node(daemon, name), scenario], user=user)
    return parse_steps(p.stdout)


def ioctl_table() -> list[dict[str, str]]:
    with (ABI / "iommufd_ioctl_table.tsv").open(newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return [r for r in rows if r["ioctl"] != "IOMMU_TEST_CMD"]  # only in test mode


def assert_kernel(steps: dict[str, Step], expected: dict[str, str]) -> None:
    problems = mismatches(steps, expected)
    assert not problems, "answers differ from the kernel's:\n" + "\n".join(problems)


# -- central validation ------------------------------------------------------------------


async def test_size_checks_of_every_ioctl(daemon, cbuild) -> None:
    """For every number of the table: size 0 and size min-1 are EINVAL, a non-zero byte
    past the struct is E2BIG, whatever the handler (implemented or not) would do."""
    steps = await rules(daemon, cbuild, "validation")
    table = ioctl_table()
    assert len(table) == 22
    expected = {}
    for row in table:
        name = row["ioctl"]
        # the client computed min and sizeof from include/iommufd-cuse/uapi.h
        assert steps[f"size0:{name}"].int("nr") == int(row["number"], 16), name
        assert steps[f"size0:{name}"].int("min") == int(row["min_size"]), name
        assert steps[f"size0:{name}"].int("sizeof") == int(row["sizeof"]), name
        expected[f"size0:{name}"] = "EINVAL"
        expected[f"below_min:{name}"] = "EINVAL"
        expected[f"tail_nonzero:{name}"] = "E2BIG"
    assert_kernel(steps, expected)


async def test_size_above_the_struct(daemon, cbuild) -> None:
    steps = await rules(daemon, cbuild, "validation")
    assert_kernel(
        steps,
        {
            "zero_tail:IOMMU_IOAS_ALLOC": "OK",
            "zero_tail_pages:IOMMU_OPTION": "OK",  # a 3-page struct whose tail is zero
            "tail_nonzero_far:IOMMU_OPTION": "E2BIG",  # its last byte set
            "tail_nonzero:destroy_existing": "E2BIG",
            "tail_unmapped:IOMMU_DESTROY": "EFAULT",  # the tail runs into a PROT_NONE page
            "struct_unmapped:IOMMU_IOAS_ALLOC": "EFAULT",  # size word readable, struct not
            "destroy_after_e2big": "OK",  # E2BIG came before the handler: the object was there
        },
    )
    assert steps["zero_tail:IOMMU_IOAS_ALLOC"]["id"] == "1"
    assert steps["zero_tail_pages:IOMMU_OPTION"]["val64"] == "1"


async def test_unknown_ioctl_numbers(daemon, cbuild) -> None:
    steps = await rules(daemon, cbuild, "validation")
    unknown = [n for n in steps if n.startswith("unknown:")]
    assert len(unknown) == 7
    # the reference kernel: _IO(';',0x7f) and _IO('Z',1) are ENOTTY
    assert_kernel(steps, dict.fromkeys(unknown, "ENOTTY"))


async def test_bad_pointers(daemon, cbuild) -> None:
    """EFAULT where the kernel reads the struct. Numbers outside the table's range go to
    the VFIO compatibility layer, which answers ENOTTY without reading anything; a
    number inside the range is looked up only after the size word was read."""
    steps = await rules(daemon, cbuild, "validation")
    assert_kernel(
        steps,
        {
            "efault:IOMMU_IOAS_ALLOC(NULL)": "EFAULT",
            "efault:IOMMU_IOAS_ALLOC(1)": "EFAULT",
            "efault:IOMMU_DESTROY(unmapped)": "EFAULT",
            "efault:IOMMU_OPTION(kernel)": "EFAULT",
            "efault:_IO('Z',0x81)(NULL)": "EFAULT",
            "enotty:_IO(';',0x7f)(NULL)": "ENOTTY",
            "enotty:_IO(';',0xff)(NULL)": "ENOTTY",
            "enotty:_IO('Z',1)(NULL)": "ENOTTY",
            "enotty:_IO(';',0x7f)(unmapped)": "ENOTTY",
        },
    )


async def test_unknown_flags(daemon, cbuild) -> None:
    steps = await rules(daemon, cbuild, "validation")
    assert_kernel(
        steps,
        {
            "flags:IOMMU_IOAS_ALLOC(1)": "EOPNOTSUPP",  # as the reference kernel
            "flags:IOMMU_IOAS_ALLOC(1<<31)": "EOPNOTSUPP",
            "alloc_after_failures": "OK",
        },
    )
    assert steps["flags:IOMMU_IOAS_ALLOC(1)"]["out_ioas_id"] == "0xdead"  # nothing written back
    # no failed call of the run left an object behind: the first id is still free
    assert steps["alloc_after_failures"]["id"] == "1"


async def test_copy_out_is_bounded(daemon, cbuild) -> None:
    """Copy-out writes min(size, struct) bytes and nothing on failure; IOVA_RANGES writes
    only as many ranges as the caller made room for."""
    steps = await rules(daemon, cbuild, "copyout")
    assert_kernel(
        steps,
        {
            "alloc_size16": "OK",
            "ranges_none": "EMSGSIZE",
            "ranges_room": "OK",
            "ranges_reserved": "EOPNOTSUPP",
            "ranges_unknown_id": "ENOENT",
            "alloc_failed_no_copyout": "EOPNOTSUPP",
            "option_failed_no_copyout": "EOPNOTSUPP",
        },
    )
    s = steps["alloc_size16"]
    assert (s["id"], s["size"], s["canary_intact"], s["tail_zero"]) == ("1", "16", "1", "1")
    # EMSGSIZE still reports the count and the alignment (as the reference kernel)
    s = steps["ranges_none"]
    assert (s["num_iovas"], s["alignment"], s["array_intact"]) == ("1", "0x1", "1")
    s = steps["ranges_room"]
    assert (s["num_iovas"], s["start"], s["last"], s["rest_intact"]) == ("1", "0x0", "0xffffffffffffffff", "1")
    assert steps["alloc_failed_no_copyout"]["out_ioas_id"] == "0x5a5a5a5a"
    assert steps["option_failed_no_copyout"]["val64"] == "0x1234"


# -- IOMMU_OPTION ---------------------------------------------------------------------------


@pytest.fixture
def root_capable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Root as on a normal machine. The sandbox these tests run in removes CAP_SYS_RESOURCE
    from every process's bounding set, so no client here can hold it; where root has it
    nothing is changed. Otherwise the daemon is told that uid-0 callers hold it (only that
    one capability; everything else about the call is real)."""
    if cap_effective() >> CAP_SYS_RESOURCE & 1:
        return
    real = caller_mod.Caller.capable

    def capable(self: caller_mod.Caller, cap: int) -> bool:
        if cap == CAP_SYS_RESOURCE and self.uid == 0:
            return True
        return real(self, cap)

    monkeypatch.setattr(caller_mod.Caller, "capable", capable)


async def test_option_rlimit_mode_and_huge_pages(daemon, cbuild, root_capable) -> None:
    steps = await rules(daemon, cbuild, "options")
    assert_kernel(
        steps,
        {
            "rlimit_get": "OK",
            "rlimit_get_object_id": "EOPNOTSUPP",  # a context-wide option takes no object
            "rlimit_set_1": "OK",  # root, no objects yet
            "rlimit_get_after_set_1": "OK",
            "rlimit_set_0": "OK",
            "rlimit_get_after_set_0": "OK",
            "rlimit_set_2": "EINVAL",
            "rlimit_bad_op": "EOPNOTSUPP",
            "unknown_option_2": "EOPNOTSUPP",
            "unknown_option_99": "EOPNOTSUPP",
            "rlimit_reserved": "EOPNOTSUPP",
            "alloc": "OK",
            "rlimit_set_1_with_object": "EBUSY",
            "rlimit_set_0_with_object": "EBUSY",
            "rlimit_set_2_with_object": "EBUSY",  # busy is decided before the value
            "rlimit_get_with_object": "OK",
            "huge_get": "OK",
            "huge_set_0": "OK",
            "huge_get_after_0": "OK",
            "huge_set_1": "OK",
            "huge_get_after_1": "OK",
            "huge_set_2": "EINVAL",
            "huge_bad_op": "EOPNOTSUPP",
            "huge_get_unknown_id": "ENOENT",
            "huge_set_unknown_id": "ENOENT",
            "huge_get_id_0": "ENOENT",
            "huge_reserved_unknown_id": "EOPNOTSUPP",  # __reserved before the lookup
            "destroy": "OK",
            "rlimit_set_1_after_destroy": "OK",
            "rlimit_get_final": "OK",
        },
    )
    values = {n: s["val64"] for n, s in steps.items() if s.outcome == "OK" and "get" in n}
    assert values == {
        "rlimit_get": "0",  # /dev/iommu accounts per user
        "rlimit_get_after_set_1": "1",
        "rlimit_get_after_set_0": "0",
        "rlimit_get_with_object": "0",
        "huge_get": "1",
        "huge_get_after_0": "0",
        "huge_get_after_1": "1",
        "rlimit_get_final": "1",
    }
    # a failed get writes nothing back
    assert steps["huge_get_unknown_id"]["val64"] == "9"


async def test_option_rlimit_mode_without_cap_sys_resource(cbuild) -> None:
    """Setting the accounting mode needs CAP_SYS_RESOURCE, the caller's (not the
    daemon's): a non-root client gets EPERM, before any other check of SET."""
    async with config_daemon(OPEN_TO_ALL) as d:
        steps = await rules(d, cbuild, "nonroot", user=NOBODY)
    assert steps["uid"]["euid"] == str(NOBODY)
    assert_kernel(
        steps,
        {
            "rlimit_get": "OK",
            "rlimit_set_1": "EPERM",
            "rlimit_set_0": "EPERM",
            "rlimit_set_2": "EPERM",
            "alloc": "OK",
            "rlimit_set_1_with_object": "EPERM",
            "huge_get": "OK",
            "huge_set_0": "OK",  # HUGE_PAGES needs no privilege
            "destroy": "OK",
        },
    )


async def test_option_rlimit_mode_from_a_user_namespace(cbuild) -> None:
    """A process that made its own user namespace holds every capability *there*, and
    its /proc status shows them all; the kernel's capable() asks the initial namespace,
    so it is still EPERM."""
    probe = subprocess.run(["unshare", "-Ur", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("user namespaces are not available here")
    async with config_daemon(OPEN_TO_ALL) as d:
        steps = await rules(d, cbuild, "nonroot", user=NOBODY, prefix=("unshare", "-Ur"))
    assert steps["uid"]["euid"] == "0"  # root inside its namespace, nobody outside
    problems = mismatches(
        steps,
        {
            "rlimit_set_1": "EPERM",
            "rlimit_set_0": "EPERM",
            "rlimit_set_1_with_object": "EPERM",
        },
    )
    assert not problems, (
        "DAEMON BUG: Caller.capable() trusts CapEff of /proc/<tid>/status, which shows the "
        "capabilities a process holds in its own user namespace; the kernel's capable() "
        "checks the initial user namespace:\n" + "\n".join(problems)
    )


@pytest.mark.parametrize("name, mode", [("iommu", "0"), ("vfio/vfio", "1")])
async def test_rlimit_mode_default_per_node(daemon, cbuild, name: str, mode: str) -> None:
    """/dev/iommu accounts per user; /dev/vfio/vfio per process, as VFIO type1 did."""
    steps = await rules(daemon, cbuild, "rlimit_get", name=name)
    assert steps["rlimit_get"].outcome == "OK"
    assert steps["rlimit_get"]["val64"] == mode


# -- IOMMU_DESTROY and object ids -------------------------------------------------------------


async def test_ids_start_at_1_lowest_free_reused(daemon, cbuild) -> None:
    steps = await rules(daemon, cbuild, "ids")
    assert_kernel(
        steps,
        {
            "destroy_0": "ENOENT",
            "destroy_99": "ENOENT",
            "destroy_max": "ENOENT",
            "destroy_4": "OK",
            "destroy_4_again": "ENOENT",
            "destroy_3_again": "ENOENT",
        },
    )
    ids = {n: s["id"] for n, s in steps.items() if n.startswith("alloc")}
    assert ids == {
        "alloc_a": "1",
        "alloc_b": "2",
        "alloc_c": "3",
        "alloc_reuses_2": "2",
        "alloc_next_4": "4",
        "alloc_reuses_1": "1",
        "alloc_empty_again": "1",
    }
    assert all(
        s.outcome == "OK"
        for n, s in steps.items()
        if "again" not in n and n not in ("destroy_0", "destroy_99", "destroy_max")
    )


# -- contexts: one per open file ---------------------------------------------------------------


async def test_two_processes_have_independent_contexts(daemon, cbuild) -> None:
    """Each open is its own context: ids start at 1 in both, neither sees the other's
    objects. A child that inherited the fd works in its parent's context."""
    steps = await rules(daemon, cbuild, "procs")
    assert_kernel(
        steps,
        {
            "A_destroy_other_2": "ENOENT",
            "A_get_other_2": "ENOENT",
            "P_destroy_1": "OK",
            "A_own_1_survives": "OK",
            "P_own_2_survives": "OK",
            "B_destroy_shared_1": "OK",
            "B_alloc_shared": "OK",
            "P_sees_B_object_1": "OK",
            "P_destroy_1_end": "OK",
            "P_destroy_2_end": "OK",
            "P_destroy_2_again": "ENOENT",
        },
    )
    ids = {n: s["id"] for n, s in steps.items() if "alloc" in n}
    assert ids == {
        "P_alloc_1": "1",
        "P_alloc_2": "2",
        "A_alloc_1": "1",
        "A_alloc_2": "2",
        "P_alloc_reuses_1": "1",
        "B_alloc_shared": "1",
    }
    await wait_until(lambda: not daemon.system.contexts, what="contexts released")


async def test_ioctls_from_other_threads(daemon, cbuild) -> None:
    """The struct is read in the calling thread (tid, not tgid); four threads share one fd."""
    steps = await rules(daemon, cbuild, "thread")
    assert steps["T_tid"]["is_main"] == "0"
    assert_kernel(steps, {"T_rlimit_get": "OK", "T_alloc": "OK", "T_ranges": "OK", "T_destroy": "OK"})
    assert steps["T_alloc"]["id"] == "1"
    assert steps["T_ranges"]["num_iovas"] == "1"
    assert steps["T_ranges"]["last"] == "0xffffffffffffffff"
    assert steps["threads_concurrent"]["failures"] == "0"
    assert steps["alloc_after_threads"]["id"] == "1"  # everything the threads made is gone


async def test_ioctls_after_the_thread_group_leader_exited(daemon, cbuild) -> None:
    steps = await rules(daemon, cbuild, "leader_gone")
    assert_kernel(steps, {"T_alloc": "OK", "T_ranges": "OK", "T_destroy": "OK", "O_alloc": "OK"})
    assert steps["O_alloc"]["id"] == "1"


async def test_killed_client_leaves_no_context(daemon, cbuild) -> None:
    """SIGKILL in the middle of an ioctl loop: the context and its objects go away."""
    exe = cbuild("iommufd_rules")
    for delay in (0.0, 0.003, 0.02):
        proc = await trio.lowlevel.open_process([str(exe), str(node(daemon)), "loop"], stdout=subprocess.PIPE)
        try:
            out = b""
            with trio.fail_after(10):
                while b"STEP looping" not in out:
                    chunk = await proc.stdout.receive_some(4096)
                    assert chunk, out
                    out += chunk
            assert len(daemon.system.contexts) == 1
            (ctx,) = daemon.system.contexts
            assert len(ctx.live_objects()) >= 2  # the two it holds, maybe one in flight
            await trio.sleep(delay)
        finally:
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
        assert proc.returncode == -signal.SIGKILL
        await wait_until(lambda: not daemon.system.contexts, what="context of the killed client released")
        assert ctx.closed
        assert ctx.live_objects() == []
        assert daemon.system.pinned_pages() == 0
