"""labbench: a hardware-in-the-loop test bench for embedded machine learning."""

__version__ = "0.1.0"
