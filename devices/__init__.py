"""The board-family catalog, one YAML file per family; installed as the package data labbench.devices."""
