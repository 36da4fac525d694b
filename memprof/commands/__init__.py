"""One module per CLI verb (``run``, ``report``, ``advise``, ``estimate``, ``gpus``), each
defining a click command named ``command``; shared helpers live in :mod:`.common`."""
