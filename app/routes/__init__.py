"""The HTTP routes, one router per concern: `public` (health, metrics, the client bundle), `generate`."""
