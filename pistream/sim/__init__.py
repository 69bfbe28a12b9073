"""A PI Web API simulator: REST and channels on one loopback port, with deterministic values.

``model`` (the ground truth: tags and their events, and what a client must write for each), ``pitime``
(wire timestamps, time parameters), ``payloads`` (JSON shapes, wire ``Quirks``), ``rest`` (routing and
answers), ``channel`` (what a channel pushes), ``websocket`` (frames, wsproto), ``connection`` (HTTP/1.1,
h11), ``auth`` (Basic, Bearer, the OIDC token endpoint, the rate limit), ``faults`` (fault injection and
delivery quirks), ``server`` (``Simulator``, ``serve``), ``command`` (``pistream simulate``),
``groundtruth`` (comparing a table with the model), ``blast`` (a load generator for benchmarks).
"""
