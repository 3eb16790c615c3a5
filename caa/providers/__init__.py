"""Cloud providers: contracts (`interfaces`), the registry, shared helpers and one module per cloud."""
