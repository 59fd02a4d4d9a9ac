"""The kernels' sm_90 machine code, read with no GPU: ``attncc inspect``.

:func:`profile` compiles every kernel a case launches, specialised exactly as the
launch specialises it (:mod:`attncc.machine.launch`), reads each one's loops from
its SASS (:mod:`attncc.machine.sass`) and estimates its efficiency from the plan's
exact tile mix (:mod:`attncc.machine.model`, Note [Issue model]).
"""

from attncc.machine.profile import KernelProfile, LoopProfile, Profile, profile, tile_ratio

__all__ = ["KernelProfile", "LoopProfile", "Profile", "profile", "tile_ratio"]
