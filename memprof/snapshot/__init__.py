"""PyTorch's own memory formats: the memory_viz snapshot pickle and the Chrome trace.

:mod:`~memprof.snapshot.memory_viz` writes a profile as the snapshot that
``torch.cuda.memory._dump_snapshot`` produces, :mod:`~memprof.snapshot.chrome_trace` as
trace-event JSON for Perfetto, and :mod:`~memprof.snapshot.load` reads a snapshot back into a
:class:`~memprof.profile.Profile`. The frame conventions they share live in
:mod:`~memprof.snapshot.frames`.
"""
