"""Fleet learning: the global adapter trained across devices with Flower.

- :mod:`.updates` — numpy: validation of client updates, clipping, Gaussian noise, FedAvg / FedSA.
- :mod:`.dp` — (ε, δ) with ``dp_accounting``'s RDP accountant; noise calibration for a target ε.
- :mod:`.client` — a device's local update (train from the global adapter, return the delta).
- :mod:`.wire` — the records on the wire; :mod:`.apps` — the Flower ``client_app`` / ``server_app``.
- :mod:`.server` — the ServerApp's rounds (sampling, timeouts, validation, aggregation, SecAgg+, DP).
- :mod:`.run` — :func:`~.run.simulate` (Flower's simulation engine) and :func:`~.run.host_train`.
- :mod:`.deploy` — a SuperLink and SuperNodes on this machine, runs submitted with ``flwr run``.
- :mod:`.cli` — ``pocketpeft fleet``.

Nothing here is imported by ``import pocketpeft``; Flower loads only when a run starts.
"""
