"""File layouts shared by the exporter (writer) and the runtime backends (reader): one module
per target. Device-safe: nothing here imports torch, the reference model or the exporter."""
