"""numpy dm_env memory environments, batched stepping, registry and adapters."""
