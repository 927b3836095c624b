"""The board families this package adds to labbench's catalog (the `labbench.devices` entry point)."""
