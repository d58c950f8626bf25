"""vtick host: the VMM process, its device models and the run launcher."""
