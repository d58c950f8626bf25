"""Host device models.  Each registers its handlers in a Machine's dispatch tables."""
