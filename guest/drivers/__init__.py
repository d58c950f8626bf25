"""Clock-event device drivers, one per timer mode of DESIGN.md section 4."""
