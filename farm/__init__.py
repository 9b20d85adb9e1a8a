"""researchfarm's shared core: settings, database models and sessions, state machine, git lineage.

Every service imports this package; it imports no service.
"""

__version__ = "0.1.0"
