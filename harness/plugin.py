"""cart-hil pytest plugin (placeholder until the plugin lands)."""
