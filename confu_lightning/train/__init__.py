"""Pure training math the LightningModules call: the TTT unroll, losses and metrics (DESIGN.md §4, §6)."""
