"""Target hidden-state cache: the format contract (`format`), the sharded writer and the mmap reader (DESIGN.md §5)."""
