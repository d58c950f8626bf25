"""Live migration of a running VM between host processes (issue 13).

:mod:`vtick.host.migration.state` is the pure state layer: what a VM's devices hold,
saved into the CDDL ``vm-state`` map and restored on a destination Machine.
"""

from vtick.host.migration.state import (
    STATE_VERSION,
    MigrationError,
    decode_state,
    encode_state,
    restore_vm,
    save_vm,
    tsc_model_for,
)

__all__ = [
    "STATE_VERSION",
    "MigrationError",
    "decode_state",
    "encode_state",
    "restore_vm",
    "save_vm",
    "tsc_model_for",
]
