"""How one child is confined, as the server hands it out, and the Popen path that applies it.

The confinement itself (namespaces, mounts, uid, seccomp) is replchild/confine.py, which the
fork server runs in each child it forks. Where a child is started by exec instead (under
bubblewrap, or with the fork server off), Popen runs the same code between fork and exec.

Where the server may mount (root with CAP_SYS_ADMIN), the child also gets a mount namespace
of its own, in which /tmp, /var/tmp and /dev/shm are bind mounts of its session's private
directories (isolation.py prepares them and the list of mounts).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from replchild.confine import Confiner


@dataclass(frozen=True, slots=True)
class Confinement:
    """How one child is confined; None/False where a layer is off or unavailable."""

    uid: int | None = None
    gid: int | None = None
    new_netns: bool = False
    # The seccomp program (struct sock_filter instructions, as the kernel reads them).
    seccomp: bytes | None = None
    # Bind mounts (source, target, flags) made in a new mount namespace, in order; none:
    # the child shares the server's mounts.
    mounts: tuple[tuple[str, str, int], ...] = ()
    # The working directory, entered again once the mounts are made: the one Popen entered
    # lies in the covered tree, whose ".." leads where the child has no business.
    cwd: str = ""
    # Mounts to let go of once those above are made (other sessions' filesystems).
    detach: str = ""

    def confiner(self) -> Confiner:
        """The callable that applies this confinement to a child of this process."""
        return Confiner(
            parent=os.getpid(),
            uid=self.uid,
            gid=self.gid,
            new_netns=self.new_netns,
            seccomp=self.seccomp,
            mounts=self.mounts,
            cwd=self.cwd,
            detach=self.detach,
        )


def make_preexec(confinement: Confinement) -> Callable[[], None]:
    """The function Popen runs in the forked child; everything it needs is prepared here."""
    return confinement.confiner()
