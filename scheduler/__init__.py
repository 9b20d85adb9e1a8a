"""The scheduler: proposals, validation, policy and git lineage."""
