"""Callbacks for the training loops most people run: the Hugging Face ``Trainer``
(:mod:`memprof.integrations.transformers`) and Lightning (:mod:`memprof.integrations.lightning`).

Each module imports its framework only when it is imported itself; ``import memprof`` imports
neither.
"""
