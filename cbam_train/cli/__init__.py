"""The command line and everything Hydra: composing conf/, one-line errors, overrides, launchers, -m sweeps."""
