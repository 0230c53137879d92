"""Top-level pytest configuration of the cart-hil repository.

The harness's pytest plugin is registered through the `pytest11` entry point (`cart_hil`), so
the same fixtures and options work from any checkout that installed the package. Here only
what is specific to this repository: run output and virtual-rack state are never collected.
"""

collect_ignore = ["reports", ".venv"]
