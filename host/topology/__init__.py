"""Topologies across machines (issue 12): the topology file (``spec``), the per-machine
agent (``agent``) and the controller's handles to it (``remote``), network namespaces
standing in for machines (``netns``), the run of a topology (``controller``), its
preflight (``check``), TLS certificates (``certs``) and the host's per-link clock
tracking (``clocktrack``).  docs/topology.md is the user's guide."""
