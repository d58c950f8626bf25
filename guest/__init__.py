"""vtick guest: one vCPU process running a model of the guest kernel paths."""
