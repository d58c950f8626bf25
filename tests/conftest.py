"""Suite-wide settings.

Hypothesis runs derandomized by default, so the suite is deterministic (the same examples
on every run and in CI); ``pytest --hypothesis-profile=explore`` searches with fresh
randomness and more examples.  No deadline: the machine is shared and noisy.
"""

from hypothesis import settings

settings.register_profile("deterministic", derandomize=True, deadline=None)
settings.register_profile("explore", deadline=None, max_examples=1000)
settings.load_profile("deterministic")
