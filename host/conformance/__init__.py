"""Conformance: ``vtick conformance host``, ``vtick conformance guest`` and ``vtick fuzz``.

A room of its own (issue 11).  The cases are pure generators (``case``, ``hostcases``,
``guestcases``); the runners at the edge talk to a real host or guest over real Pair0
sockets (``runner``, ``guestrunner``, ``fuzz``); ``report`` writes TAP, JSON, JUnit XML
and one HTML page.  Nothing here imports ``vtick.guest``: the runner plays guest peers
built on ``vtick.proto`` alone, as another implementer's client would.
"""
