"""derta: Decoupled Refusal Training (DeRTa) on Ray. The library imports without starting Ray or torch."""
__version__ = "0.1.0"
