"""Durable service state (``Store``) over SQLite or PostgreSQL; see ``balancer.store.base``."""

from balancer.store.base import (
    FINAL_MIGRATION_STATES,
    MIG_FIELDS,
    MIGRATIONS,
    REC_FIELDS,
    Fenced,
    Lease,
    NewRecommendation,
    Store,
)
from balancer.store.sql import Database, StoreError, is_url, redact

__all__ = ["FINAL_MIGRATION_STATES", "MIG_FIELDS", "MIGRATIONS", "REC_FIELDS", "Database",
           "Fenced", "Lease", "NewRecommendation", "Store", "StoreError", "is_url", "redact"]
