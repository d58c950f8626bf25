"""``vtick chaos`` and ``vtick analyze``: faults on a seeded schedule, one history per run,
and checkers for every invariant of ``docs/design.md`` section 6 (``docs/chaos.md``).

Jepsen's shape, kept in separate modules: the nemesis only plans faults (``nemesis``,
pure), the orchestrator at the edge runs the processes and applies them
(``orchestrator``, trio), the history is the single record of what happened
(``history``), and the checkers read nothing but the history (``checkers``, pure), so a
stored run is re-checked by ``vtick analyze``.
"""
