"""Lightning glue: DataModules and LightningModules that wrap the pure-torch pieces."""
