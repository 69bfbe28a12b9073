"""A PI Web API simulator: REST and channels on one loopback port, with deterministic values.

``model`` (the ground truth: tags and their events), ``pitime`` (wire timestamps, time parameters),
``payloads`` (JSON shapes), ``rest`` (routing and answers), ``channel`` (what a channel pushes),
``websocket`` (frames, wsproto), ``connection`` (HTTP/1.1, h11), ``server`` (``Simulator``, ``serve``),
``command`` (``pistream simulate``), ``groundtruth`` (comparing a table with the model).
"""
