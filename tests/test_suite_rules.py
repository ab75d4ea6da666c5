"""The leak check itself must work, or every other test's promise of 'no orphans' is hollow."""

import subprocess

import procs


def test_an_orphaned_grandchild_is_seen_as_a_leftover():
    # The shell exits at once, orphaning `sleep`; as subreaper we inherit it.
    subprocess.run(["sh", "-c", "sleep 30 >/dev/null 2>&1 &"], check=True)
    left = procs.leftovers(grace=0.2)
    assert any("sleep 30" in cmd for cmd in left.values())
    procs.kill_all(list(left))
    assert procs.leftovers(grace=0.2) == {}
