"""Measurement: the storage ledger, module and phase tracking, and the profiling session."""
