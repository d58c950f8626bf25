"""vtick wire protocol: the CDDL schema, the codec, the link layer and shared time math."""
