"""The Small2Large library: the layers below the pipeline's scripts (see docs/architecture.md)."""
