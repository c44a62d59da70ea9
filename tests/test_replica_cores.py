"""CoreShare: a replica's batch gets the node's cores divided by the model replicas busy at that moment."""

import os
import subprocess
import sys
import time

import pytest
import torch

from serve_app.deployments.replica_cores import STALE_AFTER_S, CoreShare


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def other_replica():
    """A live process standing for another model replica of the node."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield process.pid
    process.kill()
    process.wait()


def test_a_replica_working_alone_takes_every_core_and_leaves_no_mark(tmp_path, restore_threads):
    share = CoreShare(4, tmp_path)
    with share.working() as threads:
        assert threads == 4 and torch.get_num_threads() == 4
        assert share.busy_batches() == 1
    assert list(tmp_path.iterdir()) == []


def test_busy_batches_split_the_cores_and_a_dead_or_stale_mark_does_not_count(tmp_path, restore_threads,
                                                                                 other_replica):
    share = CoreShare(4, tmp_path)
    (tmp_path / str(other_replica)).touch()  # another replica is running a batch
    with share.working() as threads:
        assert threads == 2 and torch.get_num_threads() == 2
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / dead.stdout.strip()).touch()  # a replica killed mid-batch left its mark
    stale = tmp_path / str(os.getppid())  # a live process, but a mark older than any batch: a reused process id
    stale.touch()
    os.utime(stale, (time.time() - STALE_AFTER_S - 10,) * 2)
    (tmp_path / "not-a-pid").touch()
    with share.working() as threads:
        assert threads == 2  # itself and other_replica
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([str(other_replica), "not-a-pid"])


def test_three_busy_replicas_on_two_cores_get_one_thread_each(tmp_path, restore_threads, other_replica):
    (tmp_path / str(other_replica)).touch()
    (tmp_path / str(os.getppid())).touch()
    with CoreShare(2, tmp_path).working() as threads:
        assert threads == 1


def test_a_running_batch_follows_the_other_replicas_at_its_next_module_call(tmp_path, restore_threads,
                                                                            other_replica):
    from serve_app.deployments.replica_cores import RECHECK_S

    layer = torch.nn.Linear(4, 4)
    share = CoreShare(4, tmp_path)
    seen = []
    with share.working():
        layer(torch.zeros(1, 4))
        seen.append(torch.get_num_threads())
        (tmp_path / str(other_replica)).touch()  # another stage starts a batch while this one runs
        # Not a wait for an event: the marks are re-read at most every RECHECK_S of the clock, so letting that much
        # time pass is itself the condition (a sleep never returns early), whatever the machine's speed.
        time.sleep(RECHECK_S * 2)
        layer(torch.zeros(1, 4))
        seen.append(torch.get_num_threads())
        (tmp_path / str(other_replica)).unlink()  # and ends it
        time.sleep(RECHECK_S * 2)
        layer(torch.zeros(1, 4))
        seen.append(torch.get_num_threads())
    torch.set_num_threads(3)
    layer(torch.zeros(1, 4))  # outside a batch the hook changes nothing
    assert seen == [4, 2, 4] and torch.get_num_threads() == 3


def test_without_a_place_to_mark_a_batch_keeps_its_threads(tmp_path, restore_threads):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    torch.set_num_threads(1)
    with CoreShare(4, blocked / "busy").working() as threads:
        assert threads == 1 and torch.get_num_threads() == 1


def test_two_lanes_of_one_replica_count_as_two_batches(tmp_path, restore_threads):
    share = CoreShare(4, tmp_path)
    with share.working(0), share.working(1) as threads:
        assert threads == 2 and share.busy_batches() == 2
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([str(os.getpid()), f"{os.getpid()}.1"])
    assert list(tmp_path.iterdir()) == []
